"""Where gradients are applied: plain torch (one process) or DeepSpeed ZeRO (multi-process).

Both implement `TrainBackend`: `.model`, `.forward(fn)` (fn(model), the micro-batch's forward with gradients:
DeepSpeed runs it inside its engine), `.backward(loss)`, `.step() -> (grad_norm, lr)` (one optimizer step: one per
mini-batch), `.advance_schedule()` (the learning rate moves once per rollout batch, as verl's),
`.full_state_dict()`, `.state_dict()` / `.load_state_dict()`, `.rank`, `.world_size`, `.all_reduce_sum(x)`,
`.barrier()`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ettrl.config import TrainerConfig

T = TypeVar("T")


class TrainBackend(Protocol):
    model: PreTrainedModel  # the policy being trained (unwrapped)
    rank: int
    world_size: int

    def forward(self, fn: Callable[[PreTrainedModel], T]) -> T:
        """fn(model): a micro-batch's forward with gradients."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> tuple[float, float]:
        """One optimizer step: (gradient norm before clipping, learning rate it used)."""
        ...

    def advance_schedule(self) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def all_reduce_sum(self, values: list[float]) -> list[float]: ...

    def barrier(self) -> None: ...


def make_backend(model: PreTrainedModel, tcfg: TrainerConfig, total_steps: int,
                 micro_batches_per_step: int) -> TrainBackend:
    if tcfg.backend == "torch":
        from ettrl.backends.torch_backend import TorchBackend

        return TorchBackend(model, tcfg, total_steps)
    from ettrl.backends.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(model, tcfg, total_steps, micro_batches_per_step)
