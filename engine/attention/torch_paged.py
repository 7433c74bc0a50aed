"""Paged attention on the CPU with torch: one varlen batch (prefill, decode or both) per step.

The KV pool of a layer is [num_blocks, block_size, kv_heads, head_dim]. `plan` builds, once per step, the index
tensors every layer shares: the cache slot of each new token, and for each sequence the slots of all its keys
padded to the longest sequence. Each layer then writes its new K/V with one index_copy_, gathers the batch's
keys and values with one index_select each, and runs one scaled_dot_product_attention over the padded batch.
Query heads are grouped by their KV head ([B, kv_heads, q_len * group, D]), so GQA needs no repeated K/V.

Steps of fp32/bf16 caches go to the C++ kernels instead (`cpu_paged`), which read keys and values in place through
the block tables: no gather, no padding, no mask. `paged_decode_attention` takes the sequences with one new token
(faster than gather + SDPA at decode shapes: docs/benchmarks.md); with AVX-512 it works in 16-key tiles with an
online softmax and reads a prefix that several sequences share (same leading blocks: the n samples of a prompt, a
tree's branches) once for all of them, bit-identical to reading it per sequence (csrc/paged_attention_avx512.cpp).
`paged_prefill_attention` takes the rest (prompts, prefill chunks, recomputation) and gives each new token exactly
what a decode of its position gives, so a token's attention, and with row-invariant matmuls its logits and KV, do
not depend on how its prompt was split into chunks, on a cached prefix, or on the rest of the batch. The torch path
stays the reference for both.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, DecodePlan, PagedKV
from engine.extension import extension_op
from engine.layers import fused_ops

if TYPE_CHECKING:  # annotations only
    from engine.config import EngineConfig
    from engine.layers.rope import StepRope
    from engine.models.llama import RMSNorm


@dataclass
class StepPlan:
    slot_mapping: torch.Tensor   # [T] cache slot of each new token
    kv_slots: torch.Tensor | None  # [B * max_kv] slots of each sequence's keys, padded with slot 0 (torch path)
    mask: torch.Tensor | None      # bool, [B, 1, rows, max_kv]: True where a query may attend (torch path)
    batch: int
    max_q: int
    max_kv: int
    decode: bool                 # every sequence has exactly one new token
    q_index: torch.Tensor | None = None    # [B * max_q] row of each padded query in the flat batch (T = padding)
    out_index: torch.Tensor | None = None  # [T] padded row of each real query
    block_tables: torch.Tensor | None = None  # C++ kernels: [B, max_blocks] int64
    kv_lens: torch.Tensor | None = None       # C++ kernels: [B] int64
    num_decode: int = 0                       # C++ kernels: leading sequences with one new token (decode kernel)
    q_starts: torch.Tensor | None = None      # prefill kernel: [B - num_decode + 1] int64, rows of the others


def decode_kernel(cache: torch.Tensor, name: str = "paged_decode_attention") -> Callable[..., Any] | None:
    """ettrl_kernels._C.paged_decode_attention (or another of its paged kernels, by name) where it applies to this
    cache (CPU, fp32 or bf16), else None."""
    if cache.device.type != "cpu" or cache.dtype not in (torch.float32, torch.bfloat16):
        return None
    return extension_op(name)


class TorchPagedAttention(AttentionBackend):
    """Gather + SDPA on any device; with use_decode_kernel / fuse_rope, the C++ CPU kernels where they apply."""
    name = "torch"

    @classmethod
    def create(cls, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float,
               config: EngineConfig) -> TorchPagedAttention:
        """The pure torch path (the reference): no C++ kernel, whatever the device."""
        return cls(k_cache, v_cache, num_heads, scale, use_decode_kernel=False, fuse_rope=False)

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float,
                 use_decode_kernel: bool = True, fuse_rope: bool = True):
        """k_cache, v_cache: [num_layers, num_blocks, block_size, kv_heads, head_dim].

        fuse_rope: take each layer's fused qkv projection (`attend_qkv`) and apply rope, q/k norms and the cache
        write in one C++ pass (engine/layers/fused_ops.py) where it applies (CPU, fp32 or bf16)."""
        self.num_layers, num_blocks, self.block_size, self.kv_heads, self.head_dim = k_cache.shape
        self.k_slots = k_cache.view(self.num_layers, num_blocks * self.block_size, self.kv_heads * self.head_dim)
        self.v_slots = v_cache.view(self.num_layers, num_blocks * self.block_size, self.kv_heads * self.head_dim)
        self.num_heads = num_heads
        self.group = num_heads // self.kv_heads
        self.scale = scale
        self.uses_kernels = use_decode_kernel
        self.kernel = decode_kernel(k_cache) if use_decode_kernel else None
        self.prefill_kernel = decode_kernel(k_cache, "paged_prefill_attention") if self.kernel else None
        self.takes_qkv = fuse_rope and fused_ops.fused_supported(k_cache.device, k_cache.dtype)
        self.plan_: StepPlan | None = None
        # (plan, StepRope) whose step tensors the fused rope op has checked
        self._rope_checked: tuple[StepPlan, StepRope] | None = None

    def plan(self, query_lens: list[int], kv_lens: list[int], block_tables: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
        """block_tables: int64 [B, max_blocks] padded with 0; kv_lens count the new tokens too."""
        device = block_tables.device
        batch, max_q, max_kv = len(kv_lens), max(query_lens), max(kv_lens)
        if self.kernel is not None and (max_q == 1 or self.prefill_kernel is not None):
            tables = block_tables.to(torch.int64).contiguous()
            lens = torch.tensor(kv_lens, dtype=torch.int64)
            num_decode = next((i for i, n in enumerate(query_lens) if n != 1), batch)
            rows = [0, *accumulate(query_lens[num_decode:])]
            starts = None if num_decode == batch else torch.tensor(rows, dtype=torch.int64)
            self.plan_ = StepPlan(slot_mapping, None, None, batch, max_q, max_kv, max_q == 1, block_tables=tables,
                                  kv_lens=lens, num_decode=num_decode, q_starts=starts)
            return
        nblocks = -(-max_kv // self.block_size)
        offsets = torch.arange(self.block_size, device=device)
        slots = (block_tables[:, :nblocks, None] * self.block_size + offsets).view(batch, -1)[:, :max_kv]
        kv_len = torch.tensor(kv_lens, device=device)
        key_pos = torch.arange(max_kv, device=device)
        decode = max_q == 1
        if decode:
            mask = (key_pos < kv_len[:, None]).view(batch, 1, 1, max_kv)
            self.plan_ = StepPlan(slot_mapping, slots.reshape(-1), mask, batch, 1, max_kv, True)
            return
        q_len = torch.tensor(query_lens, device=device)
        q_row = torch.arange(max_q, device=device)
        q_pos = kv_len[:, None] - q_len[:, None] + q_row                     # absolute position of each query
        valid = q_row < q_len[:, None]                                       # [B, max_q]
        mask = (key_pos <= q_pos[:, :, None]) | (~valid[:, :, None] & (key_pos == 0))  # padding rows see key 0
        mask = mask.repeat_interleave(self.group, dim=1).unsqueeze(1)         # rows ordered (query, group)
        starts = torch.cumsum(q_len, 0) - q_len
        q_index = torch.where(valid, starts[:, None] + q_row, slot_mapping.numel()).view(-1)
        out_index = valid.view(-1).nonzero().squeeze(1)
        self.plan_ = StepPlan(slot_mapping, slots.reshape(-1), mask, batch, max_q, max_kv, False, q_index, out_index)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, D]; k, v: [T, kv_heads, D] (new tokens). Returns [T, heads * D]."""
        hkv, d, p = self.kv_heads, self.head_dim, self._current_plan()
        self.k_slots[layer].view(-1, hkv, d).index_copy_(0, p.slot_mapping, k)
        self.v_slots[layer].view(-1, hkv, d).index_copy_(0, p.slot_mapping, v)
        return self._attend(layer, q)

    def attend_qkv(self, layer: int, qkv: torch.Tensor, rope: StepRope, q_norm: RMSNorm | None = None,
                   k_norm: RMSNorm | None = None) -> torch.Tensor:
        """The same as __call__ from the layer's qkv projection [T, (heads + 2 kv_heads) D] and its StepRope.
        The step's shared tensors (slots, positions, rope tables; caches and norms alike in every layer) are
        checked in the first layer of a step only."""
        step = (self._current_plan(), rope)
        checked = self._rope_checked is not None and all(a is b for a, b in zip(step, self._rope_checked))
        q = fused_ops.rope_and_cache(qkv, self.k_slots[layer], self.v_slots[layer], step[0].slot_mapping,
                                     rope.positions, rope.table.cos, rope.table.sin, self.num_heads, self.kv_heads,
                                     self.head_dim, None if q_norm is None else q_norm.weight,
                                     None if k_norm is None else k_norm.weight,
                                     1e-6 if q_norm is None else q_norm.eps, step_checked=checked)
        self._rope_checked = step
        return self._attend(layer, q)

    def _current_plan(self) -> StepPlan:
        assert self.plan_ is not None, "plan() the step first"
        return self.plan_
    def paged_kv(self) -> PagedKV | None:
        return None if self.why_not_paged() else PagedKV(self.k_slots, self.v_slots, self.block_size, self.scale)

    def why_not_paged(self) -> str:
        if not self.uses_kernels:
            return f"the {self.name} attention backend runs no C++ kernel (the reference; cpu_paged does)"
        if self.kernel is None:
            return (f"no paged C++ kernel for a {self.k_slots.dtype} KV cache on {self.k_slots.device} (CPU, fp32 or "
                    "bf16, and the extension built)")
        if not self.takes_qkv:
            return "rope and the cache write are not fused into the attention (EngineConfig.fused_ops=False)"
        return ""

    def decode_plan(self) -> DecodePlan | None:
        p = self.plan_
        if p is None or p.block_tables is None or p.kv_lens is None:
            return None
        return DecodePlan(p.slot_mapping, p.block_tables, p.kv_lens, p.q_starts, p.batch, p.num_decode)

    def _attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of the queries [T, heads, D] over the cache, their own keys included (already written)."""
        p = self._current_plan()
        t, hkv, d, g = q.shape[0], self.kv_heads, self.head_dim, self.group
        k_slots, v_slots = self.k_slots[layer], self.v_slots[layer]
        if p.block_tables is not None:
            return self._paged_kernels(layer, q)
        assert p.kv_slots is not None, "the torch path's plan gathers the keys by slot"
        keys = k_slots.index_select(0, p.kv_slots).view(p.batch, p.max_kv, hkv, d).transpose(1, 2)
        values = v_slots.index_select(0, p.kv_slots).view(p.batch, p.max_kv, hkv, d).transpose(1, 2)
        if p.decode:
            out = F.scaled_dot_product_attention(q.view(p.batch, hkv, g, d), keys, values, attn_mask=p.mask,
                                                 scale=self.scale)
            return out.reshape(t, hkv * g * d)
        assert p.q_index is not None and p.out_index is not None, "a prefill plan pads the queries"
        padded = torch.cat([q, q.new_zeros(1, *q.shape[1:])]).index_select(0, p.q_index)
        padded = padded.view(p.batch, p.max_q, hkv, g, d).transpose(1, 2).reshape(p.batch, hkv, p.max_q * g, d)
        out = F.scaled_dot_product_attention(padded, keys, values, attn_mask=p.mask, scale=self.scale)
        out = out.view(p.batch, hkv, p.max_q, g, d).transpose(1, 2).reshape(p.batch * p.max_q, hkv * g * d)
        return out.index_select(0, p.out_index)

    def _paged_kernels(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The decode kernel for the leading one-token sequences, the prefill kernel for the others."""
        p = self._current_plan()
        assert p.block_tables is not None and p.kv_lens is not None, "planned for the C++ kernels"
        k_slots, v_slots = self.k_slots[layer], self.v_slots[layer]
        if q.dtype != k_slots.dtype:
            raise TypeError(f"queries are {q.dtype} but the KV cache is {k_slots.dtype}")
        q = q.contiguous()
        out = torch.empty_like(q)
        width, bf16, threads = p.block_tables.shape[1], q.dtype == torch.bfloat16, torch.get_num_threads()
        shape = (self.num_heads, self.kv_heads, self.head_dim, width, self.block_size, self.scale, bf16, threads)
        d = p.num_decode
        if d:
            assert self.kernel is not None, "planned for the C++ kernels"
            self.kernel(q.data_ptr(), k_slots.data_ptr(), v_slots.data_ptr(), out.data_ptr(),
                        p.block_tables.data_ptr(), p.kv_lens.data_ptr(), d, *shape)
        if d < p.batch:
            assert self.prefill_kernel is not None and p.q_starts is not None, "planned for the prefill kernel"
            self.prefill_kernel(q[d:].data_ptr(), k_slots.data_ptr(), v_slots.data_ptr(), out[d:].data_ptr(),
                                p.block_tables[d:].data_ptr(), p.q_starts.data_ptr(), p.kv_lens[d:].data_ptr(),
                                p.batch - d, *shape)
        return out.view(q.shape[0], -1)


class CpuPagedAttention(TorchPagedAttention):
    """The CPU backend: decode steps in the C++ paged decode kernel, rope + q/k norms + cache write fused
    (EngineConfig.fused_ops); the torch path for what they do not cover (prefill, other dtypes, no extension)."""
    name = "cpu_paged"

    @classmethod
    def why_unsupported(cls, device: torch.device, dtype: torch.dtype) -> str:
        return "" if torch.device(device).type == "cpu" else f"it runs on the CPU only, not {device}"

    @classmethod
    def create(cls, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float,
               config: EngineConfig) -> CpuPagedAttention:
        return cls(k_cache, v_cache, num_heads, scale, use_decode_kernel=True, fuse_rope=config.fused_ops)
