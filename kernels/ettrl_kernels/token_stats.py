"""`token_stats`: logprob of target tokens (differentiable) and full-vocab entropy (no gradient) for training.

For logits [T, V], targets [T] and temperature T (scalar or per row): x = logits.float() * (1 / T),
logprob = log_softmax(x)[target], entropy = -sum softmax(x) * log_softmax(x). Both backends work in vocab
tiles with online max / sum-exp accumulators, keep only per-row statistics for backward, and never hold a
full softmax: memory is O(T x tile) besides the gradient itself.
"""
from __future__ import annotations

import torch

from ettrl_kernels.backend import implementation, resolve_backend


def token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logprobs float32 [T], differentiable w.r.t. logits; entropies float32 [T], detached).

    backend (ettrl_kernels/backend.py's table): "auto" (Triton for CUDA tensors, else torch), "torch" or "triton"."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be a [T, V] float tensor, got {logits.dtype} {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if targets.shape != (rows,):
        raise ValueError(f"targets must have shape [{rows}], got {tuple(targets.shape)}")
    targets = targets.to(device=logits.device, dtype=torch.int64)
    if rows and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must be token ids in [0, {vocab})")
    temp = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(rows)
    if bool((temp <= 0).any()):
        raise ValueError("temperature must be > 0")
    inv_temp = (1.0 / temp).contiguous()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    function = implementation("token_stats", resolve_backend("token_stats", backend, logits))
    logprobs, entropies = function.apply(logits, targets, inv_temp)
    if rows and bool(entropies.isnan().any()):
        raise ValueError("token_stats: logits contain NaN or +inf (or a row is all -inf)")
    return logprobs, entropies
