"""Where gradients are applied: plain torch (one process) or DeepSpeed ZeRO (multi-process).

Both expose the same small interface: `.model`, `.forward(fn)` (fn(model), the micro-batch's forward with
gradients: DeepSpeed runs it inside its engine), `.backward(loss)`, `.step() -> (grad_norm, lr)` (one optimizer
step: one per mini-batch), `.advance_schedule()` (the learning rate moves once per rollout batch, as verl's),
`.full_state_dict()`, `.state_dict()` / `.load_state_dict()`, `.rank`, `.world_size`, `.all_reduce_sum(x)`.
"""
from __future__ import annotations


def make_backend(model, tcfg, total_steps: int, micro_batches_per_step: int):
    if tcfg.backend == "torch":
        from ettrl.backends.torch_backend import TorchBackend

        return TorchBackend(model, tcfg, total_steps)
    from ettrl.backends.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(model, tcfg, total_steps, micro_batches_per_step)
