"""What both gradient backends share: the optimizer, its learning-rate schedule and their checkpoint state."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ettrl.config import TrainerConfig


def cosine_with_warmup(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """lr multiplier: linear warm-up over warmup_ratio * total steps, then cosine decay to 0."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(params: Iterable[torch.Tensor], tcfg: TrainerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay)


def trained_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class OptimizerState:
    """What a checkpoint keeps of a backend besides the weights: its optimizer's and scheduler's state."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def advance_schedule(self) -> None:
        self.scheduler.step()
