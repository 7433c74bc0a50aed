"""The interface every paged-attention backend implements; registry.py picks one by name or by device and dtype.

A backend owns nothing but views of the engine's KV pool (k_cache, v_cache: [num_layers, num_blocks, block_size,
kv_heads, head_dim]). Each step the model runner calls `plan` once with the batch's layout; then every decoder
layer calls the backend once (`__call__`, or `attend_qkv` where `takes_qkv` is set) to write its new keys and
values into the pool and attend over everything the sequence holds, its own new tokens included (causal).

A backend that runs the paged C++ kernels with rope fused (cpu_paged) also hands the fused layer stack
(engine/layers/decode_layers.py) what it needs by name: the pool (`paged_kv`) and each step's plan (`decode_plan`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only
    from engine.config import EngineConfig
    from engine.layers.rope import StepRope
    from engine.models.llama import RMSNorm


@dataclass(frozen=True)
class PagedKV:
    """The KV pool as the paged C++ kernels read it."""
    k_slots: torch.Tensor  # [num_layers, num_blocks * block_size, kv_heads * head_dim]: row = a token's slot
    v_slots: torch.Tensor
    block_size: int
    scale: float           # of the attention scores (head_dim ** -0.5)


@dataclass(frozen=True)
class DecodePlan:
    """One step as the paged C++ kernels take it: the sequences with one new token (decodes) first, then the others
    (prefill pieces), their new tokens' rows in that order."""
    slot_mapping: torch.Tensor      # int64 [T]: the pool slot of each new token
    block_tables: torch.Tensor      # int64 [B, table_width]
    kv_lens: torch.Tensor           # int64 [B]: keys per sequence, its new tokens included
    q_starts: torch.Tensor | None   # int64 [B - num_decode + 1]: rows of the prefill pieces from the first of them;
                                    # None when every sequence decodes
    batch: int
    num_decode: int


class BackendUnavailable(RuntimeError):
    """A backend that passed why_unsupported() cannot start after all (its kernels did not build or load); the
    message says what is missing. In auto mode the registry tries the next backend."""


class AttentionBackend(ABC):
    name: str = ""            # its registry name (EngineConfig.attention_backend)
    takes_qkv: bool = False   # the model calls attend_qkv with the layer's fused qkv projection, unrotated

    @classmethod
    def why_unsupported(cls, device: torch.device, dtype: torch.dtype) -> str:
        """Why this backend cannot serve a KV cache of `dtype` on `device` ("" when it can)."""
        return ""

    @classmethod
    def supports(cls, device: torch.device, dtype: torch.dtype) -> bool:
        return not cls.why_unsupported(torch.device(device), dtype)

    @classmethod
    def create(cls, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float,
               config: EngineConfig) -> AttentionBackend:
        """The backend over this KV pool for an engine of `config` (EngineConfig: backends read their switches).
        Raises BackendUnavailable when it cannot start on this machine."""
        return cls(k_cache, v_cache, num_heads, scale)  # type: ignore[call-arg]  # subclasses take the pool

    @abstractmethod
    def plan(self, query_lens: list[int], kv_lens: list[int], block_tables: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
        """Once per step, before any layer. Per sequence: query_lens new tokens, kv_lens keys after them (new ones
        included); block_tables int64 [B, max_blocks] padded with 0; slot_mapping int64 [T]: the pool slot
        (block * block_size + offset) of each new token, sequences concatenated."""

    @abstractmethod
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, heads, D] (rotated), k, v [T, kv_heads, D] of the new tokens: writes k and v at their slots of
        `layer`'s cache, returns the attention output [T, heads * D]."""

    def attend_qkv(self, layer: int, qkv: torch.Tensor, rope: StepRope, q_norm: RMSNorm | None = None,
                   k_norm: RMSNorm | None = None) -> torch.Tensor:
        """Only where takes_qkv: the same as __call__ from the layer's qkv projection [T, (heads + 2 kv_heads) D],
        its StepRope (engine/layers/rope.py) and q/k RMSNorms (Qwen3; else None), which the backend applies."""
        raise NotImplementedError(f"{type(self).__name__} does not take qkv (takes_qkv is False)")

    def paged_kv(self) -> PagedKV | None:
        """The pool, where this backend runs the paged C++ kernels with rope, q/k norms and the cache write fused
        (what the fused layer stack needs); else None, and `why_not_paged` says why."""
        return None

    def why_not_paged(self) -> str:
        """Why paged_kv is None ("" where it is not)."""
        return f"the {self.name} attention backend does not run the paged C++ kernels (cpu_paged does)"

    def decode_plan(self) -> DecodePlan | None:
        """This step (after `plan`) as the paged C++ kernels take it; None where it does not run on them."""
        return None
