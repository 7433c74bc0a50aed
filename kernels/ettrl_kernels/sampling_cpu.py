"""`entropy_sample` through the C++ extension (`ettrl_kernels._C.entropy_sample`): CPU float32 logits, no top-k / top-p.

One call does the whole batch in a few passes over each row while it sits in cache, where the torch path runs a
dozen vocabulary-wide ops (several times faster: docs/benchmarks.md). Same semantics and noise as
the torch path, which stays the reference: the statistics agree to float rounding and the tokens are the same
except where two scores tie within the last bits of their `log`s (as for the Triton kernel).
"""
import torch

from ettrl_kernels.extension import extension_op
from ettrl_kernels.sampling_common import RowParams


def cpp_kernel():
    """ettrl_kernels._C.entropy_sample, or None where the extension is not built."""
    return extension_op("entropy_sample")


def applies(logits: torch.Tensor, params: RowParams) -> bool:
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and not params.truncated
            and cpp_kernel() is not None)


def entropy_sample_cpu(logits: torch.Tensor, params: RowParams):
    """(tokens, logprobs, entropies), or None if a row has NaN/+inf logits or no allowed token (the torch path
    then raises its error for it)."""
    batch, vocab = logits.shape
    logits = logits.contiguous()
    inv_temp = params.inv_temp.contiguous()
    greedy = params.greedy.to(torch.uint8)
    keys = params.keys.to(torch.int32).contiguous()
    exclude = params.exclude.to(torch.int64).contiguous()
    tokens = torch.empty(batch, dtype=torch.int64)
    logprobs = torch.empty(batch, dtype=torch.float32)
    entropies = torch.empty(batch, dtype=torch.float32)
    cpp_kernel()(logits.data_ptr(), inv_temp.data_ptr(), greedy.data_ptr(), keys.data_ptr(), exclude.data_ptr(),
                 tokens.data_ptr(), logprobs.data_ptr(), entropies.data_ptr(), batch, vocab,
                 torch.get_num_threads())
    if batch and int(tokens.min()) < 0:
        return None
    return tokens, logprobs, entropies
