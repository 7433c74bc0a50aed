"""The C++ fused layer ops of `ettrl_kernels._C` (csrc/fused_ops.cpp) for CPU tensors in fp32 or bf16.

At decode shapes a layer's RMSNorms, residual adds, rotary embedding, KV-cache write and SiLU are ~20 torch ops
that each cost more to dispatch than to compute; these three calls replace them (docs/benchmarks.md has the
engine's history). They round where the torch modules round, so the torch code in engine/models/llama.py,
rope.py and engine/attention/torch_paged.py is their reference (tests/test_fused_ops.py) and their fallback.
The extension takes raw pointers: the checks on dtype, device, shape and contiguity are here.
"""
from __future__ import annotations

from typing import Any, overload

import torch

from engine.extension import extension, extension_op

FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _ops() -> Any:
    """ettrl_kernels._C where it has the fused ops, else None."""
    return extension() if extension_op("rope_and_cache") is not None else None


def fused_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype in FUSED_DTYPES and _ops() is not None


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, dim: int | None = None) -> None:
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or (dim is not None and t.dim() != dim):
        raise ValueError(f"{name}: need a contiguous CPU {dtype} tensor{f' of {dim} dims' if dim else ''}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")


@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None) -> torch.Tensor: ...


@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(x) * weight; with `residual`: residual += x in place, returns
    (rms_norm(residual) * weight, residual)."""
    x = x.contiguous()
    _check("rms_norm x", x, x.dtype, 2)
    _check("rms_norm weight", weight, x.dtype, 1)
    rows, dim = x.shape
    if weight.numel() != dim:
        raise ValueError(f"rms_norm: weight has {weight.numel()} features, x has {dim}")
    if residual is not None:
        _check("rms_norm residual", residual, x.dtype, 2)
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} vs x {tuple(x.shape)}")
    out = torch.empty_like(x)
    _ops().residual_rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
                             out.data_ptr(), rows, dim, eps, x.dtype == torch.bfloat16, torch.get_num_threads())
    return out if residual is None else (out, residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] for gate_up [rows, 2 I]."""
    gate_up = gate_up.contiguous()
    _check("silu_and_mul gate_up", gate_up, gate_up.dtype, 2)
    rows, width = gate_up.shape
    out = gate_up.new_empty(rows, width // 2)
    _ops().silu_and_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, gate_up.dtype == torch.bfloat16,
                        torch.get_num_threads())
    return out


def rope_and_cache(qkv: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, slot_mapping: torch.Tensor,
                   positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int, q_norm: torch.Tensor | None = None,
                   k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6,
                   step_checked: bool = False) -> torch.Tensor:
    """Rotated queries [T, num_heads, head_dim]; the rotated keys and the values go into their cache slots.

    qkv: [T, (num_heads + 2 num_kv_heads) head_dim] (q | k | v per row); k_slots, v_slots: [slots, kv_heads * head_dim]
    of one layer; slot_mapping, positions: int64 [T]; cos_table, sin_table: fp32 [max_positions, head_dim / 2];
    q_norm, k_norm: per-head RMSNorm weights [head_dim] applied before the rotation (Qwen3), or None.
    step_checked: every argument but qkv passed these checks earlier in this step (an earlier layer's call with the
    same step tensors and a cache and norms of the same shape), so only qkv is checked.
    """
    t, dtype = qkv.shape[0], qkv.dtype
    _check("rope_and_cache qkv", qkv, dtype, 2)
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"rope_and_cache: qkv has {qkv.shape[1]} features, expected "
                         f"({num_heads} + 2 x {num_kv_heads}) x {head_dim} with an even head_dim")
    if not step_checked:
        check_rope_step(t, dtype, k_slots, v_slots, slot_mapping, positions, cos_table, sin_table, num_kv_heads,
                         head_dim, q_norm, k_norm)
    q = qkv.new_empty(t, num_heads, head_dim)
    _ops().rope_and_cache(qkv.data_ptr(), q.data_ptr(), k_slots.data_ptr(), v_slots.data_ptr(), slot_mapping.data_ptr(),
                          positions.data_ptr(), cos_table.data_ptr(), sin_table.data_ptr(),
                          0 if q_norm is None else q_norm.data_ptr(), 0 if k_norm is None else k_norm.data_ptr(),
                          norm_eps, t, num_heads, num_kv_heads, head_dim, dtype == torch.bfloat16,
                          torch.get_num_threads())
    return q


def check_rope_step(t: int, dtype: torch.dtype, k_slots: torch.Tensor, v_slots: torch.Tensor,
                    slot_mapping: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                    sin_table: torch.Tensor, num_kv_heads: int, head_dim: int, q_norm: torch.Tensor | None,
                    k_norm: torch.Tensor | None) -> None:
    """rope_and_cache's checks of everything a step's layers share (all but qkv), for `t` tokens of `dtype`; a
    ValueError that names the argument."""
    for name, cache in (("k_slots", k_slots), ("v_slots", v_slots)):
        _check(f"rope_and_cache {name}", cache, dtype, 2)
        if cache.shape[1] != num_kv_heads * head_dim:
            raise ValueError(f"rope_and_cache: {name} rows hold {cache.shape[1]} values, not {num_kv_heads * head_dim}")
    for name, index in (("slot_mapping", slot_mapping), ("positions", positions)):
        _check(f"rope_and_cache {name}", index, torch.int64, 1)
        if index.numel() != t:
            raise ValueError(f"rope_and_cache: {name} has {index.numel()} entries for {t} tokens")
    for name, table in (("cos_table", cos_table), ("sin_table", sin_table)):
        _check(f"rope_and_cache {name}", table, torch.float32, 2)
        if table.shape[1] != head_dim // 2:
            raise ValueError(f"rope_and_cache: {name} must be [max_positions, {head_dim // 2}]")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None:
            _check(f"rope_and_cache {name}", w, dtype, 1)
    if (q_norm is None) != (k_norm is None):
        raise ValueError("rope_and_cache: give both q_norm and k_norm or neither")
