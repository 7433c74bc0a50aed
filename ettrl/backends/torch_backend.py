"""One process, CPU or one GPU: torch AdamW, cosine schedule with warm-up, gradient-norm clipping.

Parameters that are not fp32 (a bf16 or fp16 model) train through fp32 master weights: each backward adds the
parameter's gradient into its master's fp32 gradient, the optimizer updates the masters, and the model gets
their rounding. Without them an AdamW step of ~lr (5e-7 in the paper) is below bf16 spacing and most weights
never change.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

from ettrl.backends.common import OptimizerState, cosine_with_warmup, make_optimizer, trained_parameters

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ettrl.config import TrainerConfig

T = TypeVar("T")


class TorchBackend(OptimizerState):
    rank, world_size = 0, 1

    def __init__(self, model: PreTrainedModel, tcfg: TrainerConfig, total_steps: int) -> None:
        self.model = model
        self.grad_clip = tcfg.grad_clip
        self.params = trained_parameters(model)
        self.master: list[torch.Tensor] | None = None
        if any(p.dtype != torch.float32 for p in self.params):
            self.master = [p.detach().float().clone() for p in self.params]
            for p, m in zip(self.params, self.master):
                p.register_post_accumulate_grad_hook(_accumulate_into(m))
        self.optimizer = make_optimizer(self.master or self.params, tcfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           cosine_with_warmup(total_steps, tcfg.warmup_ratio))

    def forward(self, fn: Callable[[PreTrainedModel], T]) -> T:
        return fn(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, float]:
        """One optimizer step; the learning-rate schedule moves in advance_schedule()."""
        updated = self.master or self.params
        grad_norm = torch.nn.utils.clip_grad_norm_(updated, self.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m)
        return float(grad_norm), lr

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.master is not None:
            state["master"] = [m.detach().clone() for m in self.master]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.master is not None:
            if "master" not in state:
                raise RuntimeError("the checkpoint has no fp32 master weights for this non-fp32 model; resume with "
                                   "the model.dtype it was trained with")
            with torch.no_grad():
                for m, saved in zip(self.master, state["master"]):
                    m.copy_(saved)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def barrier(self) -> None:
        pass


def _accumulate_into(master: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A hook that moves a parameter's gradient into its fp32 master's (summed in fp32 over micro-batches)."""

    def hook(param: torch.Tensor) -> None:
        assert param.grad is not None, "a post-accumulate-grad hook runs once the gradient is there"
        grad = param.grad.float()
        master.grad = grad if master.grad is None else master.grad.add_(grad)
        param.grad = None

    return hook
