"""Advantages: GRPO group normalisation and the entropy-based reshaping variants (docs/algorithms.md 2, 5, 6).

    grpo_advantages(rewards, group_size=None, groups=None) -> [N]
    adv_res(advantages, response_entropies, ...)           EAR Adv-Res, [N]
    adv_clip(advantages, beta)                             EAR Adv-Clip, [N]
    entropy_term(advantages, token_entropies, ...)         Cheng et al. per-token bonus, [N, T]
    compute_advantages(rewards, AdvantageConfig, ...)      the combination the trainer picks by config

The shapings are named by SHAPINGS: "none" (plain GRPO), "res" (Adv-Res), "clip" (Adv-Clip), the names the config
(algo.reshape) and the methods table (ettrl/methods.py) use.

Groups are given either as a constant `group_size` (consecutive responses, N divisible by it) or as a group
id per response (`groups`: any hashable ids, e.g. prompt ids, or an integer tensor); with neither, all
responses form one group.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

Values = Sequence[float] | torch.Tensor  # one value per response
GroupIds = Sequence[Hashable] | torch.Tensor  # a group id per response

SHAPINGS = ("none", "res", "clip")
RES_DIRECTIONS = ("equations", "prose")
STDS = ("population", "bessel")


@dataclass
class AdvantageConfig:
    shaping: str = "none"       # "none" (GRPO) | "res" (Adv-Res) | "clip" (Adv-Clip)
    res_alpha: float = 0.2      # Adv-Res: Y clipped to [1 - res_alpha, 1 + res_beta]
    res_beta: float = 0.2
    res_direction: str = "equations"  # Adv-Res: "equations" (Eqs. 12-14) or "prose" (the text after Eq. 14)
    clip_beta: float = 2.0      # Adv-Clip: A clipped to [-clip_beta, clip_beta]
    entropy_alpha: float = 0.0  # per-token entropy term (Cheng et al.; paper value 0.4); 0 turns it off
    entropy_kappa: float = 2.0
    eps: float = 1e-6
    std: str = "population"     # GRPO std: "population" (docs/algorithms.md 2) or "bessel" (n - 1, as verl/TTRL)

    def __post_init__(self) -> None:
        if self.shaping not in SHAPINGS:
            raise ValueError(f"shaping must be one of {SHAPINGS}, got {self.shaping!r}")
        if self.res_direction not in RES_DIRECTIONS:
            raise ValueError(f"res_direction must be one of {RES_DIRECTIONS}, got {self.res_direction!r}")
        if self.std not in STDS:
            raise ValueError(f"std must be one of {STDS}, got {self.std!r}")


def _as_tensor(values: Values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32) if not torch.is_tensor(values) else values.float()
    if t.dim() != 1:
        raise ValueError(f"{name} must be one value per response (1-D), got shape {tuple(t.shape)}")
    return t


def _group_index(n: int, group_size: int | None, groups: GroupIds | None, device: torch.device) -> torch.Tensor:
    """Dense group id (0..G-1) per response."""
    if group_size is not None and groups is not None:
        raise ValueError("pass either group_size or groups, not both")
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"groups must have one id per response ({n}), got {len(groups)}")
        if torch.is_tensor(groups):
            return torch.unique(groups.to(device), return_inverse=True)[1]
        dense: dict[Hashable, int] = {}
        return torch.tensor([dense.setdefault(g, len(dense)) for g in groups], dtype=torch.long, device=device)
    if group_size is None:
        return torch.zeros(n, dtype=torch.long, device=device)
    if group_size <= 0 or n % group_size:
        raise ValueError(f"{n} responses cannot be split into groups of {group_size}")
    return torch.arange(n, device=device) // group_size


def _group_sum_count(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of `values` over each response's group and the group's size, both gathered back to [N]."""
    n_groups = int(index.max()) + 1 if index.numel() else 0
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    counts = torch.zeros_like(sums).index_add_(0, index, torch.ones_like(values))
    return sums[index], counts[index]


def _group_mean(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over each response's group, gathered back to [N]."""
    sums, counts = _group_sum_count(values, index)
    return sums / counts


def grpo_advantages(rewards: Values, group_size: int | None = None, groups: GroupIds | None = None,
                    eps: float = 1e-6, std: str = "population") -> torch.Tensor:
    """A_i = (R_i - mean(R)) / (std(R) + eps) per group. Equal rewards give exactly 0.

    std "population" divides the squared deviations by n; "bessel" by n - 1, as verl's
    compute_grpo_outcome_advantage (TTRL), which also scores a group of one response as mean 0, std 1.
    """
    if std not in STDS:
        raise ValueError(f"std must be one of {STDS}, got {std!r}")
    r = _as_tensor(rewards, "rewards")
    index = _group_index(len(r), group_size, groups, r.device)
    if std == "population":
        centered = r - _group_mean(r, index)
        return centered / (_group_mean(centered.square(), index).sqrt() + eps)
    sums, counts = _group_sum_count(r, index)
    single = counts == 1
    centered = torch.where(single, r, r - sums / counts)
    squares = _group_sum_count(centered.square(), index)[0]
    sd = torch.where(single, torch.ones_like(r), (squares / (counts - 1).clamp(min=1)).sqrt())
    return centered / (sd + eps)


def adv_res(advantages: Values, response_entropies: Values, group_size: int | None = None,
            groups: GroupIds | None = None, alpha: float = 0.2, beta: float = 0.2,
            direction: str = "equations") -> torch.Tensor:
    """EAR Adv-Res: A_i * clip(Y_i, 1 - alpha, 1 + beta), Y_i = 1 + (Hbar - H_i) / Hbar, Hbar = group mean.

    Direction (docs/algorithms.md section 5, Decision): the default, "equations", implements the paper's Eqs. 12-14,
    so a response more uncertain than its group (H_i > Hbar) gets a smaller |A| and a more confident one a larger
    |A|. The prose after Eq. 14 describes the opposite ("the advantage is amplified when response entropy exceeds
    the average"); direction="prose" gives that: Y_i = 1 + (H_i - Hbar) / Hbar. A group with Hbar == 0 is left
    unscaled.
    """
    if direction not in RES_DIRECTIONS:
        raise ValueError(f"direction must be one of {RES_DIRECTIONS}, got {direction!r}")
    a = _as_tensor(advantages, "advantages")
    h = _as_tensor(response_entropies, "response_entropies").to(a.device)
    if h.shape != a.shape:
        raise ValueError(f"{len(a)} advantages but {len(h)} response entropies")
    h_bar = _group_mean(h, _group_index(len(h), group_size, groups, h.device))
    safe_bar = torch.where(h_bar > 0, h_bar, torch.ones_like(h_bar))
    relative = (h_bar - h) / safe_bar if direction == "equations" else (h - h_bar) / safe_bar
    y = torch.where(h_bar > 0, 1 + relative, torch.ones_like(h))
    return y.clamp(1 - alpha, 1 + beta) * a


def adv_clip(advantages: Values, beta: float = 2.0) -> torch.Tensor:
    """EAR Adv-Clip: clip(A, -beta, beta)."""
    return _as_tensor(advantages, "advantages").clamp(-beta, beta)


def entropy_term(advantages: Values | Sequence[Sequence[float]],
                 token_entropies: torch.Tensor | Sequence[Sequence[float]], alpha: float = 0.4,
                 kappa: float = 2.0) -> torch.Tensor:
    """Per-token A'_t = A + min(alpha * H_t, |A| / kappa) (Cheng et al.), H_t detached.

    The bonus is >= 0 and at most |A| / kappa, so with kappa >= 1 it never flips the sign of A (a negative A
    only shrinks towards 0). `advantages` is [N] or [N, T]; `token_entropies` is [N, T]. Returns [N, T].
    """
    if kappa < 1:
        raise ValueError(f"kappa must be >= 1 so the entropy term cannot flip the sign of A, got {kappa}")
    h = torch.as_tensor(token_entropies, dtype=torch.float32).detach()
    a = torch.as_tensor(advantages, dtype=torch.float32).to(h.device)
    if h.dim() != 2 or a.dim() not in (1, 2) or a.shape[0] != h.shape[0]:
        raise ValueError(f"need advantages [N] or [N, T] and token_entropies [N, T], got {tuple(a.shape)} "
                         f"and {tuple(h.shape)}")
    a = a.unsqueeze(1) if a.dim() == 1 else a
    return a + torch.minimum(alpha * h, a.abs() / kappa)


def compute_advantages(rewards: Values, config: AdvantageConfig | None = None, group_size: int | None = None,
                       groups: GroupIds | None = None, response_entropies: Values | None = None,
                       token_entropies: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO advantages reshaped by `config.shaping`, then the optional per-token entropy term.

    Returns [N] per-response advantages, or [N, T] per-token ones when config.entropy_alpha > 0.
    E.g. ETTRL = ETMR rollouts + AdvantageConfig(shaping="res").
    """
    config = config or AdvantageConfig()
    a = grpo_advantages(rewards, group_size, groups, config.eps, config.std)
    if config.shaping == "res":
        if response_entropies is None:
            raise ValueError("shaping 'res' needs response_entropies (mean token entropy per response)")
        a = adv_res(a, response_entropies, group_size, groups, config.res_alpha, config.res_beta,
                    config.res_direction)
    elif config.shaping == "clip":
        a = adv_clip(a, config.clip_beta)
    if config.entropy_alpha > 0:
        if token_entropies is None:
            raise ValueError("entropy_alpha > 0 needs token_entropies [N, T]")
        a = entropy_term(a, token_entropies, config.entropy_alpha, config.entropy_kappa)
    return a
