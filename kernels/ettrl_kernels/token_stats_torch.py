"""Vocab-chunked torch implementation of `token_stats` (CPU path and reference for the Triton kernels)."""
from typing import Any

import torch

CHUNK = 8192


def online_stats(logits: torch.Tensor, inv_temp: torch.Tensor,
                 chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Row logsumexp and entropy of softmax(logits * inv_temp), one vocab chunk at a time."""
    rows = logits.shape[0]
    m = torch.full((rows,), float("-inf"), device=logits.device)
    z = torch.zeros(rows, device=logits.device)
    s = torch.zeros(rows, device=logits.device)
    for start in range(0, logits.shape[1], chunk):
        x = logits[:, start:start + chunk].float() * inv_temp[:, None]
        m_new = torch.maximum(m, x.amax(dim=1))
        m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp(m - m_ref)
        shifted = x.sub_(m_ref[:, None])
        e = shifted.exp()
        weighted = (e * shifted.clamp_(min=-3e38)).sum(1)
        s = (s + z * (torch.where(z > 0, m, m_ref) - m_ref)) * alpha + weighted
        z = z * alpha + e.sum(1)
        m = m_new
    log_z = z.log()
    return m + log_z, log_z - s / z


class TokenStatsTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor,
                inv_temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse, entropies = online_stats(logits.detach(), inv_temp)
        logprobs = logits.detach().gather(1, targets[:, None]).squeeze(1).float() * inv_temp - lse
        ctx.save_for_backward(logits, targets, inv_temp, lse)
        ctx.mark_non_differentiable(entropies)
        return logprobs, entropies

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor,
                 grad_entropies: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets, inv_temp, lse = ctx.saved_tensors
        scale = (grad_logprobs * inv_temp)[:, None]
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[1], CHUNK):
            x = logits[:, start:start + CHUNK].float() * inv_temp[:, None]
            grad[:, start:start + CHUNK] = x.sub_(lse[:, None]).exp_().mul_(-scale)
        target_x = logits.gather(1, targets[:, None]).float() * inv_temp[:, None]
        target_grad = scale * (1 - torch.exp(target_x - lse[:, None]))
        grad.scatter_(1, targets[:, None], target_grad.to(grad.dtype))
        return grad, None, None
