"""The interface every paged-attention backend implements; registry.py picks one by name or by device and dtype.

A backend owns nothing but views of the engine's KV pool (k_cache, v_cache: [num_layers, num_blocks, block_size,
kv_heads, head_dim]). Each step the model runner calls `plan` once with the batch's layout; then every decoder
layer calls the backend once (`__call__`, or `attend_qkv` where `takes_qkv` is set) to write its new keys and
values into the pool and attend over everything the sequence holds, its own new tokens included (causal).
"""
from abc import ABC, abstractmethod

import torch


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
               config) -> "AttentionBackend":
        """The backend over this KV pool for an engine of `config` (EngineConfig: backends read their switches).
        Raises BackendUnavailable when it cannot start on this machine."""
        return cls(k_cache, v_cache, num_heads, scale)

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

    def attend_qkv(self, layer: int, qkv: torch.Tensor, rope, q_norm=None, k_norm=None) -> torch.Tensor:
        """Only where takes_qkv: the same as __call__ from the layer's qkv projection [T, (heads + 2 kv_heads) D],
        its StepRope (engine/layers/rope.py) and q/k RMSNorms (Qwen3; else None), which the backend applies."""
        raise NotImplementedError(f"{type(self).__name__} does not take qkv (takes_qkv is False)")
