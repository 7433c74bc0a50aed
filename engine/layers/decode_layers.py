"""A step's whole stack of decoder layers in one C++ call (`ettrl_kernels._C.decode_layers`, csrc/decode_layers.cpp).

The Python layer loop (llama.py) calls eight C++ ops a layer, and the Python around them is a measurable share of a
decode step (docs/benchmarks.md). This calls the same ops with the same arguments in the same order, so it gives
the same bits (tests/test_decode_layers.py). It applies where every matmul weight is in panels (AVX-512 BF16
CPUs), the fused ops are on and the step runs on the paged C++ kernels (decodes, prefill pieces or both, as the
attention backend planned them); everything else (other CPUs, CUDA, the torch attention) takes the Python loop.
"""
import torch

from engine.extension import extension, extension_op
from engine.layers import fused_ops
from engine.layers.packed_linear import Panels

_OP = extension_op("decode_layers")
LAYOUT = "llama"  # the decoder layer the C++ stack computes: llama.py's (Llama, Qwen2, Qwen3 flags)


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def pointer_table(model) -> torch.Tensor | None:
    """int64 [num_layers, 14]: each layer's weights and KV cache in csrc/decode_layers.h's order, or None where the
    fused path does not apply to this model. A model class opts in by declaring `fused_decode_layout = LAYOUT` in
    its own body: a subclass that changes any layer's math does not inherit the C++ path by accident."""
    if vars(type(model)).get("fused_decode_layout") != LAYOUT:
        return None
    attn = model.layers[0].self_attn.attn
    if _OP is None or attn is None or not getattr(attn, "takes_qkv", False) or getattr(attn, "kernel", None) is None:
        return None
    rows = []
    for i, layer in enumerate(model.layers):
        att, mlp = layer.self_attn, layer.mlp
        packed = (att.qkv_packed, att.o_packed, mlp.gate_up_packed, mlp.down_packed)
        q_norm, k_norm = _qk_norms(att)
        vectors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight, att.qkv_bias, att.o_bias,
                   mlp.gate_up_bias, mlp.down_bias, q_norm, k_norm]
        if (not all(isinstance(p, Panels) for p in packed) or not (mlp.fused and layer.input_layernorm.fused)
                or att.attn is not attn or att.layer_idx != i
                or not all(v is None or v.is_contiguous() for v in vectors)):
            return None
        rows.append([_address(layer.input_layernorm.weight), att.qkv_packed.data.data_ptr(), _address(att.qkv_bias),
                     _address(q_norm), _address(k_norm), att.o_packed.data.data_ptr(), _address(att.o_bias),
                     _address(layer.post_attention_layernorm.weight), mlp.gate_up_packed.data.data_ptr(),
                     _address(mlp.gate_up_bias), mlp.down_packed.data.data_ptr(), _address(mlp.down_bias),
                     attn.k_slots[i].data_ptr(), attn.v_slots[i].data_ptr()])
    table = torch.tensor(rows, dtype=torch.int64)
    if table.shape[1] != extension().decode_layer_pointers():
        raise RuntimeError(f"decode_layers: {table.shape[1]} pointers a layer here, "
                           f"{extension().decode_layer_pointers()} in ettrl_kernels._C: rebuild the extension")
    return table


def _qk_norms(att) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The per-head q and k RMSNorm weights (Qwen3), or (None, None)."""
    return (None, None) if att.q_norm is None else (att.q_norm.weight, att.k_norm.weight)


def run(model, table: torch.Tensor, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(last layer's MLP output, residual stream) as the Python loop returns them, or None if this step is not
    planned for the paged C++ kernels (the caller then runs the loop)."""
    a, attn = model.args, model.layers[0].self_attn.attn
    plan = attn.plan_
    t = x.shape[0]
    if plan is None or plan.block_tables is None or not x.is_contiguous():
        return None
    first = model.layers[0].self_attn
    q_norm, k_norm = _qk_norms(first)
    fused_ops._check_rope_step(t, x.dtype, attn.k_slots[0], attn.v_slots[0], plan.slot_mapping, rope.positions,
                               rope.table.cos, rope.table.sin, a.num_kv_heads, a.head_dim, q_norm, k_norm)
    q_width, kv_width = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    residual, h = torch.empty_like(x), torch.empty_like(x)
    qkv, q, out = x.new_empty(t, q_width + 2 * kv_width), x.new_empty(t, q_width), x.new_empty(t, q_width)
    gate_up, act = x.new_empty(t, 2 * a.intermediate_size), x.new_empty(t, a.intermediate_size)
    _OP(table.data_ptr(), a.num_layers, x.data_ptr(), residual.data_ptr(), h.data_ptr(), qkv.data_ptr(),
        q.data_ptr(), out.data_ptr(), gate_up.data_ptr(), act.data_ptr(), t, a.hidden_size, a.intermediate_size,
        a.num_heads, a.num_kv_heads, a.head_dim, a.rms_norm_eps, 1e-6 if first.q_norm is None else first.q_norm.eps,
        plan.slot_mapping.data_ptr(), rope.positions.data_ptr(), rope.table.cos.data_ptr(),
        rope.table.sin.data_ptr(), plan.block_tables.data_ptr(), plan.kv_lens.data_ptr(),
        _address(plan.q_starts), plan.batch, plan.num_decode, plan.block_tables.shape[1], attn.block_size, attn.scale,
        x.dtype == torch.bfloat16, torch.get_num_threads())
    return x, residual
