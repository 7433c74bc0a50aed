"""What a rollout batch (a step) holds: how many steps a run has, which prompts each step rolls out, and how
many optimizer steps (mini-batches) it takes. Pure functions of the config, so a resumed run is exact and a
config's step count can be checked without a model."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ettrl.config import TrainerConfig


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (per step, per prompt)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def step_count(tcfg: TrainerConfig, n_problems: int) -> int:
    """trainer.max_steps, or the epochs over the problems: ceil(epochs x problems / prompts_per_step), or with
    trainer.drop_last epochs x floor(problems / prompts_per_step) as TTRL's dataloader (drop_last=True)."""
    if tcfg.max_steps:
        return tcfg.max_steps
    per = tcfg.prompts_per_step
    if tcfg.drop_last:
        if n_problems < per:
            raise ValueError(f"trainer.drop_last with {n_problems} problems and trainer.prompts_per_step={per} "
                             f"leaves no step; lower prompts_per_step or turn drop_last off")
        return tcfg.epochs * (n_problems // per)
    return math.ceil(tcfg.epochs * n_problems / per)


def step_prompts(step: int, n_problems: int, tcfg: TrainerConfig, seed: int) -> list[int]:
    """Prompt indices of a step: a seeded shuffle per epoch. Without drop_last the epochs run end to end (a step
    may span two); with it each epoch is floor(n / per) whole steps and its last partial batch is dropped."""
    per = tcfg.prompts_per_step
    if tcfg.drop_last:
        epoch, pos = divmod(step, n_problems // per)
        perm = _epoch_order(n_problems, seed, epoch)
        return [int(i) for i in perm[pos * per : (pos + 1) * per]]
    out = []
    for g in range(step * per, (step + 1) * per):
        epoch, pos = divmod(g, n_problems)
        out.append(int(_epoch_order(n_problems, seed, epoch)[pos]))
    return out


def mini_batches_per_step(tcfg: TrainerConfig) -> int:
    """Optimizer steps per rollout batch and PPO epoch: prompts_per_step / mini_batch_prompts (0: one)."""
    return tcfg.prompts_per_step // tcfg.mini_batch_prompts if tcfg.mini_batch_prompts else 1


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
