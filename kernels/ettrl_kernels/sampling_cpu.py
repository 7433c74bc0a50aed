"""`entropy_sample` through the C++ extension (`ettrl_kernels._C.entropy_sample`): CPU float32 logits, no top-k / top-p.

One call does the whole batch in a few passes over each row while it sits in cache, where the torch path runs a
dozen vocabulary-wide ops (several times faster: docs/benchmarks.md). Same semantics and noise as
the torch path, which stays the reference: the statistics agree to float rounding and the tokens are the same
except where two scores tie within the last bits of their `log`s (as for the Triton kernel).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ettrl_kernels.extension import extension_op
from ettrl_kernels.sampling_common import RowParams, SampleResult, check_finite_rows


def cpp_kernel() -> Callable[..., None] | None:
    """ettrl_kernels._C.entropy_sample, or None where the extension is not built."""
    return extension_op("entropy_sample")


def entropy_sample_cpu(logits: torch.Tensor, params: RowParams) -> SampleResult:
    """(tokens, logprobs, entropies); rows with NaN/+inf logits or no allowed token raise the torch path's errors."""
    kernel = cpp_kernel()
    if kernel is None:
        raise RuntimeError("the C++ extension is not built (python setup.py build_ext --inplace)")
    batch, vocab = logits.shape
    logits = logits.contiguous()
    inv_temp = params.inv_temp.contiguous()
    greedy = params.greedy.to(torch.uint8)
    keys = params.keys.to(torch.int32).contiguous()
    exclude = params.exclude.to(torch.int64).contiguous()
    tokens = torch.empty(batch, dtype=torch.int64)
    logprobs = torch.empty(batch, dtype=torch.float32)
    entropies = torch.empty(batch, dtype=torch.float32)
    kernel(logits.data_ptr(), inv_temp.data_ptr(), greedy.data_ptr(), keys.data_ptr(), exclude.data_ptr(),
           tokens.data_ptr(), logprobs.data_ptr(), entropies.data_ptr(), batch, vocab, torch.get_num_threads())
    if batch and int(tokens.min()) < 0:
        _refuse_declined_rows(logits, params, tokens < 0)
    return tokens, logprobs, entropies


def _refuse_declined_rows(logits: torch.Tensor, params: RowParams, declined: torch.Tensor) -> None:
    """The op marks a row it cannot sample with token -1: NaN/+inf logits, or no allowed token with nonzero
    probability. Raise what the torch path raises for them."""
    max_x = (logits * params.inv_temp[:, None]).amax(1)
    check_finite_rows(max_x, torch.where(declined, float("-inf"), 0.0))
    raise RuntimeError(f"the C++ sampler declined rows {declined.nonzero().flatten().tolist()[:8]} with finite "
                       "logits and an allowed token")
