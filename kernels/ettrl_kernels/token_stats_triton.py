"""Triton forward/backward for `token_stats`: one program per row, tiles over V, no softmax kept."""
from typing import Any

import torch
import triton
import triton.language as tl

from ettrl_kernels.backend import device_guard
from ettrl_kernels.triton_online import online_entropy_update


@triton.jit
def _token_stats_forward(logits_ptr, stride, vocab, targets_ptr, inv_temp_ptr, logprob_ptr, entropy_ptr,
                         lse_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    inv_temp = tl.load(inv_temp_ptr + row)
    neg_inf = float("-inf")
    m = tl.full([], neg_inf, tl.float32)
    z = tl.zeros([], tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < vocab, other=neg_inf).to(tl.float32) * inv_temp
        m, z, s = online_entropy_update(m, z, s, x)
    log_z = tl.log(z)
    lse = m + log_z
    target_x = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, log_z - s / z)
    tl.store(logprob_ptr + row, target_x - lse)


@triton.jit
def _token_stats_backward(logits_ptr, grad_ptr, stride, grad_stride, vocab, targets_ptr, inv_temp_ptr, lse_ptr,
                          grad_out_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    grad_row_ptr = grad_ptr + row.to(tl.int64) * grad_stride
    inv_temp = tl.load(inv_temp_ptr + row)
    lse = tl.load(lse_ptr + row)
    target = tl.load(targets_ptr + row)
    scale = tl.load(grad_out_ptr + row) * inv_temp
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < vocab
        x = tl.load(row_ptr + offs, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        grad = scale * (tl.where(offs == target, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(grad_row_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)


class TokenStatsTriton(torch.autograd.Function):
    BLOCK = 2048

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor,
                inv_temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, vocab = logits.shape
        logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
        entropies = torch.empty_like(logprobs)
        lse = torch.empty_like(logprobs)
        block = min(TokenStatsTriton.BLOCK, triton.next_power_of_2(vocab))
        if rows:
            with device_guard(logits):
                _token_stats_forward[(rows,)](logits, logits.stride(0), vocab, targets, inv_temp, logprobs, entropies,
                                              lse, BLOCK=block)
        ctx.save_for_backward(logits, targets, inv_temp, lse)
        ctx.mark_non_differentiable(entropies)
        return logprobs, entropies

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor,
                 grad_entropies: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets, inv_temp, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = torch.empty_like(logits)
        block = min(TokenStatsTriton.BLOCK, triton.next_power_of_2(vocab))
        if rows:
            with device_guard(logits):
                _token_stats_backward[(rows,)](logits, grad, logits.stride(0), grad.stride(0), vocab, targets,
                                               inv_temp, lse, grad_logprobs.float().contiguous(), BLOCK=block)
        return grad, None, None
