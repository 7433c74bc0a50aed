"""How much of a GPU the KV pool may take: vLLM's `gpu_memory_utilization` (the fraction of the GPU's total memory
this engine may hold: weights, activations and KV pool) turned into bytes for the pool, and whether what sleep mode
gave back is still free when the engine wakes up.

NOT YET RUN ON A GPU: the arithmetic is tested on the CPU with given numbers; `cuda_kv_budget` and
`device_free_bytes` read them from torch.cuda.mem_get_info.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # annotations only
    from engine.models.registry import ModelArgsLike

ACTIVATION_MARGIN = 2.0                 # allocator rounding and temporaries the estimate does not name
ATTENTION_WORKSPACE_BYTES = 256 * 2**20  # flashinfer's workspace (engine/attention/flashinfer.py)


class Weights(Protocol):
    """What these sums read of a model: its parameters and buffers (a torch.nn.Module, a registry.Model)."""

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]: ...


def module_bytes(module: Weights) -> int:
    """Bytes of the module's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def parameter_bytes(module: Weights) -> int:
    """Bytes of the module's parameters (what sleep level 2 offloads; buffers stay on the device)."""
    return sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in module.parameters()}.values())


def activation_bytes(args: ModelArgsLike, max_num_batched_tokens: int, max_num_seqs: int, dtype: torch.dtype) -> int:
    """Peak activation estimate of one step: per-token hidden states, qkv, attention output and MLP, plus the
    fp32 logits and the sampler's buffers of the decode batch."""
    element = torch.empty((), dtype=dtype).element_size()
    per_token = (3 * args.hidden_size + (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
                 + args.num_heads * args.head_dim + 3 * args.intermediate_size) * element
    tokens = max(max_num_batched_tokens, max_num_seqs)
    logits = 3 * max_num_seqs * args.vocab_size * 4
    return int(ACTIVATION_MARGIN * (tokens * per_token + logits)) + ATTENTION_WORKSPACE_BYTES


def kv_budget_bytes(total: int, free: int, utilization: float, weights: int, activations: int) -> int:
    """Bytes for the KV pool: utilization * total minus what the engine already holds (weights) and will need
    (activations). Raises a clear error when that is nothing, or more than the GPU has free."""
    allowed = utilization * total
    budget = int(allowed - weights - activations)
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={utilization} lets this engine hold {gib(allowed)} of the GPU's "
                         f"{gib(total)}, which its weights ({gib(weights)}) and activations ({gib(activations)}) "
                         f"already fill: raise gpu_memory_utilization or set kv_cache_memory_gb")
    if budget + activations > free:
        raise ValueError(f"gpu_memory_utilization={utilization} asks for a {gib(budget)} KV pool (plus "
                         f"{gib(activations)} of activations) but only {gib(free)} of the GPU are free (other "
                         f"tensors of this process or other processes hold the rest): lower "
                         f"gpu_memory_utilization or set kv_cache_memory_gb")
    return budget


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def cuda_kv_budget(device: torch.device, utilization: float, weights: int, activations: int) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return kv_budget_bytes(total, free, utilization, weights, activations)


class DeviceMemoryError(RuntimeError):
    """The device lacks the free memory the engine needs (at wake_up); the message says how much and what to do."""


def device_free_bytes(device: torch.device) -> int | None:
    """Free bytes of a CUDA device (after returning the allocator's cached blocks); None on the CPU (not checked)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def check_wake_up(free: int | None, what: dict[str, int]) -> None:
    """Raises DeviceMemoryError when `what` (name -> bytes that wake_up is about to allocate, or must leave room
    for) does not fit in `free`. Memory that was free at start-up may be held now: a trainer's optimizer state
    appears after the first sleep."""
    need = sum(what.values())
    if free is None or need <= free:
        return
    parts = " + ".join(f"{name} {gib(n)}" for name, n in what.items())
    raise DeviceMemoryError(f"wake_up needs {gib(need)} of GPU memory ({parts}) but only {gib(free)} are free: "
                            f"other tensors hold what sleep() gave back. Free them (del, torch.cuda.empty_cache()) "
                            f"and call wake_up() again (the engine stays asleep), or start the engine with a lower "
                            f"gpu_memory_utilization or kv_cache_memory_gb")
