"""`entropy_sample`: sample a token per row and report its logprob and the row's full-vocab entropy in one pass.

Semantics (every backend):
- x = logits.float() * (1 / T) per row; T == 0 means greedy (argmax) and logprob/entropy use T = 1.
- logprob = log_softmax(x)[token], entropy = -sum softmax(x) * log_softmax(x) over the full vocabulary: the
  policy's own distribution, before top-k / top-p / exclusion.
- Allowed set: tokens other than `exclude`, then top-k (top_k <= 0 or >= V: off), then top-p over the top-k
  renormalised distribution (top_p >= 1: off): the smallest set of highest logits whose mass reaches top_p.
  Truncation is a threshold on the logit, so tokens tied with the last kept one are kept too.
- token = argmax over the allowed set of x + g(seed, seq_id, position, token) (Gumbel-max; see noise.py).
"""
from __future__ import annotations

import torch

from ettrl_kernels.backend import implementation, resolve_backend
from ettrl_kernels.sampling_common import (
    Param,
    RowParams,
    SampleResult,
    check_finite_rows,
    row_params,
    truncation_thresholds,
)

__all__ = ["entropy_sample", "Param", "RowParams", "SampleResult", "row_params", "truncation_thresholds",
           "check_finite_rows"]


def entropy_sample(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = -1, top_p: Param = 1.0,
                   seeds: Param = 0, seq_ids: Param | None = None, positions: Param = 0, exclude: Param | None = None,
                   backend: str = "auto") -> SampleResult:
    """Sample one token per row of logits [B, V] (float32 or bfloat16).

    backend (ettrl_kernels/backend.py's table): "auto" (Triton for CUDA tensors; on the CPU the C++ op for float32
    logits without top-k/top-p, ettrl_kernels/sampling_cpu.py, else torch), "torch", "cpp" or "triton"; a backend
    that cannot run the logits raises a ValueError. Every parameter is a python scalar or a per-row tensor [B].
    seq_ids defaults to the row index, which makes the noise depend on row order: pass real sequence ids for
    batch-invariant sampling. The noise is a pure function of (seed, seq_id, position, token), so vary `positions`
    (or seeds) between calls.
    Returns (tokens int64 [B], logprobs float32 [B], entropies float32 [B]).
    """
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be a [B, V] float32/bfloat16 tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    logits = logits.detach()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    params = row_params(logits, temperature, top_k, top_p, seeds, seq_ids, positions, exclude)
    name = resolve_backend("entropy_sample", backend, logits, params.truncated)
    return implementation("entropy_sample", name)(logits, params)
