"""One process, CPU or one GPU: torch AdamW, cosine schedule with warm-up, gradient-norm clipping."""
from __future__ import annotations

import torch

from ettrl.backends import OptimizerState, cosine_with_warmup, make_optimizer


class TorchBackend(OptimizerState):
    rank, world_size = 0, 1

    def __init__(self, model, tcfg, total_steps: int):
        self.model = model
        self.grad_clip = tcfg.grad_clip
        self.optimizer = make_optimizer(model, tcfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(total_steps, tcfg.warmup_ratio))

    def forward(self, fn):
        return fn(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, float]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), lr

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def barrier(self) -> None:
        pass
