"""DeepSpeed ZeRO 1/2/3 data parallelism (NCCL on GPUs, gloo on CPU), launched with deepspeed or torchrun.

The optimizer is torch's AdamW and the schedule the same cosine-with-warm-up as the torch backend; the backend
steps the schedule itself once per rollout batch (advance_schedule), not DeepSpeed at each optimizer step, so
that a rollout batch's mini-batches share one learning rate as in verl. Gradient clipping is set explicitly in
the DeepSpeed config. A mini-batch's micro-batches are one DeepSpeed gradient-accumulation cycle (their number
per rank is fixed by the config; short trees are padded to keep it), and the trainer scales
each micro-batch loss itself, so backward runs with `scale_wrt_gas=False`. Every micro-batch's forward runs
through the engine's forward (`forward(fn)`): ZeRO-3 counts its micro-steps there, and without that count it
overwrote each micro-batch's gradient with the next one's instead of summing them.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from ettrl.backends.common import OptimizerState, cosine_with_warmup, make_optimizer, trained_parameters

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ettrl.config import TrainerConfig

T = TypeVar("T")


def init_distributed(device: str = "auto") -> tuple[int, int]:
    import deepspeed

    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device != "cpu"
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl" if use_nccl else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


class _Forward(torch.nn.Module):
    """The module the engine wraps: engine(fn) runs fn(model) inside the engine's forward."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[PreTrainedModel], T]) -> T:
        return fn(self.model)


class DeepSpeedBackend(OptimizerState):
    def __init__(self, model: PreTrainedModel, tcfg: TrainerConfig, total_steps: int,
                 micro_batches_per_step: int) -> None:
        import deepspeed

        init_distributed("cuda" if next(model.parameters()).is_cuda else "cpu")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.micro_batches = micro_batches_per_step
        optimizer = make_optimizer(trained_parameters(model), tcfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                           cosine_with_warmup(total_steps, tcfg.warmup_ratio))
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": micro_batches_per_step,
            "gradient_clipping": tcfg.grad_clip,
            "zero_optimization": {"stage": tcfg.zero_stage},
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=_Forward(model), optimizer=optimizer,
                                                                 config=config)
        self.model = self.engine.module.model
        self.stage = tcfg.zero_stage
        self._micro = 0
        self._lr = optimizer.param_groups[0]["lr"]

    def forward(self, fn: Callable[[PreTrainedModel], T]) -> T:
        return self.engine(fn)

    def backward(self, loss: torch.Tensor) -> None:
        if self._micro == 0:
            self._lr = self.scheduler.get_last_lr()[0]
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # applies the update only at the accumulation boundary
        self._micro += 1

    def step(self) -> tuple[float, float]:
        if self._micro != self.micro_batches:
            raise RuntimeError(f"a DeepSpeed step needs exactly {self.micro_batches} micro-batches per rank, "
                               f"got {self._micro}")
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return float(norm if norm is not None else 0.0), self._lr

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        if self.stage < 3:
            return {name: p.detach() for name, p in params.items()}
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().clone() for name, p in params.items()}

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()
