"""EAR's Adv-Res and Adv-Clip as verl advantage estimators ("ettrl_res", "ettrl_clip"), on ettrl.advantages.

verl calls an estimator as fn(token_level_rewards, response_mask, index=uid per row, config=algorithm config) and
takes (advantages, returns), both [rows, response_length]. Both estimators score a row by its summed reward, take
GRPO advantages per uid group as verl's own "grpo" does (std with n - 1; a group of one: mean 0, std 1), reshape
them with ettrl.advantages, and spread them over the row's response tokens. Rows whose response_mask is all zero
(EttrlAgentLoopManager's fillers for trees that could not fork) take no part in their group's statistics and get 0.

Parameters come from `algorithm.ettrl` (res_alpha, res_beta, res_direction, clip_beta), defaults from
ettrl.advantages.AdvantageConfig; `algorithm.norm_adv_by_std_in_grpo=False` (Dr. GRPO) is refused.

Adv-Res also needs each response's mean token entropy, and verl 0.9.1's compute_advantage passes an estimator no
per-row data beyond the rewards, the mask and the uid. So "ettrl_res" reads the rollout's per-token entropies
("rollout_entropies", which EttrlAgentLoopManager returns) from the DataProto of the compute_advantage call that
invoked it (its caller's frame): the second and last place this integration reaches into verl's internals (the
first is plugin._register_rollout), pinned by verl's version and by tests/test_verl_units.py.
"""
from __future__ import annotations

import inspect
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from ettrl.advantages import AdvantageConfig, compute_advantages

if TYPE_CHECKING:  # annotations only (Any where verl is not installed)
    from verl.trainer.config import AlgoConfig

    # verl passes its AlgoConfig (or the algorithm section as a DictConfig); tests pass a dict
    AlgorithmConfig: TypeAlias = AlgoConfig | Mapping[str, Any]
Uids = np.ndarray | Sequence[Hashable]  # each row's group id (verl: an object array of uids)

ENTROPY_KEY = "rollout_entropies"
PARAMS = ("res_alpha", "res_beta", "res_direction", "clip_beta")


def advantage_config(shaping: str, config: AlgorithmConfig | None) -> AdvantageConfig:
    if config is not None and not _get(config, "norm_adv_by_std_in_grpo", True):
        raise ValueError("ettrl_res / ettrl_clip reshape GRPO advantages normalised by the group's std; "
                         "algorithm.norm_adv_by_std_in_grpo=False (Dr. GRPO) is not supported")
    params: dict[str, Any] = dict(_get(config, "ettrl", None) or {}) if config is not None else {}
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} under algorithm.ettrl; known: {list(PARAMS)}")
    return AdvantageConfig(shaping=shaping, std="bessel", **params)


def estimate(shaping: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Uids,
             config: AlgorithmConfig | None = None, response_entropies: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row advantages from the real rows of each uid group, spread over the response tokens."""
    cfg = advantage_config(shaping, config)
    real = (response_mask.sum(-1) > 0).nonzero().flatten().tolist()
    scores = token_level_rewards.sum(-1).float()
    advantages = torch.zeros_like(scores)
    if real:
        entropies = None if response_entropies is None else response_entropies[real]
        a = compute_advantages(scores[real], cfg, groups=[index[i] for i in real], response_entropies=entropies)
        advantages[real] = a.to(advantages.dtype)
    spread = advantages.unsqueeze(-1) * response_mask
    return spread, spread


def mean_response_entropy(token_entropies: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's response tokens (the trainer's Response.entropy); 0 for a row without any."""
    mask = response_mask.float()
    return (token_entropies.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def ettrl_clip(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Uids,
               config: AlgorithmConfig | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """EAR Adv-Clip: clip(A, -clip_beta, clip_beta) on GRPO advantages."""
    return estimate("clip", token_level_rewards, response_mask, index, config)


def ettrl_res(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Uids,
              config: AlgorithmConfig | None = None,
              response_entropies: torch.Tensor | Sequence[float] | None = None, **kwargs: Any
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """EAR Adv-Res: A_i * clip(1 + (Hbar - H_i) / Hbar, 1 - res_alpha, 1 + res_beta), H_i the response's mean
    token entropy. `response_entropies` ([rows]) when a caller has them; else from verl's compute_advantage."""
    if response_entropies is None:
        response_entropies = mean_response_entropy(_entropies_of_caller(), response_mask)
    return estimate("res", token_level_rewards, response_mask, index, config,
                    torch.as_tensor(response_entropies, dtype=torch.float32))


def _entropies_of_caller() -> torch.Tensor:
    frame = inspect.currentframe()
    try:
        parent = frame.f_back if frame is not None else None
        caller = parent.f_back if parent is not None else None  # ettrl_res's caller
        data = caller.f_locals.get("data") if caller is not None and caller.f_code.co_name == "compute_advantage" \
            else None
        batch = getattr(data, "batch", None)
        if batch is None or ENTROPY_KEY not in batch.keys():
            raise ValueError(f"ettrl_res needs each response's token entropies: verl's compute_advantage must see "
                             f"'{ENTROPY_KEY}' in the batch, which EttrlAgentLoopManager returns (set "
                             f"actor_rollout_ref.rollout.agent.agent_loop_manager_class="
                             f"ettrl.integrations.verl.EttrlAgentLoopManager), or pass response_entropies=; "
                             f"ettrl_clip needs none")
        return batch[ENTROPY_KEY]
    finally:
        del frame


def _get(config: AlgorithmConfig, key: str, default: Any) -> Any:
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


ESTIMATORS = {"ettrl_res": ettrl_res, "ettrl_clip": ettrl_clip}
