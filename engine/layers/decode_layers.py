"""A step's whole stack of decoder layers in one C++ call (`ettrl_kernels._C.decode_layers`, csrc/decode_layers.cpp).

The Python layer loop (engine/models/llama.py) calls eight C++ ops a layer, and the Python around them is a
measurable share of a decode step (docs/benchmarks.md). This calls the same ops with the same arguments in the same
order, so it gives the same bits (tests/test_decode_layers.py). It applies where every matmul weight is in panels
(AVX-512 BF16 CPUs), the fused ops are on and the step runs on the paged C++ kernels (decodes, prefill pieces or
both, as the attention backend planned them); everything else (other CPUs, CUDA, the torch attention) takes the
Python loop, and `FusedDecodeStats` counts the steps of each path and why (the first step of each reason is logged).

The contract with C++ is by name: each field of `_C.DecodeLayerWeights` (one layer's tensors) and of
`_C.DecodeStepArgs` (the rest of a step) is filled from a table here under the same name, and a field one side has
and the other lacks, or a layer parameter no field reads, raises an error that names it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from engine.extension import extension, extension_op
from engine.layers import fused_ops
from engine.layers.packed_linear import Panels

if TYPE_CHECKING:  # annotations only
    from engine.attention.base import AttentionBackend, PagedKV
    from engine.layers.rope import StepRope

log = logging.getLogger(__name__)
_OP = extension_op("decode_layers")
LAYOUT = "llama"  # the decoder layer the C++ stack computes: llama.py's (Llama, Qwen2, Qwen3 flags)

# DecodeLayerWeights field -> the decoder layer's tensor it points at (an attribute path; None where the layer has none)
NORMS = {"input_norm": "input_layernorm.weight", "post_norm": "post_attention_layernorm.weight",
         "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
# DecodeLayerWeights field -> the matmul's attribute prefix: `{prefix}_packed` (panels) is the field, `{prefix}_bias`
# the field `{field}_bias`; the panels are a copy of `{prefix}_weight`
MATMULS = {"qkv": "self_attn.qkv", "o": "self_attn.o", "gate_up": "mlp.gate_up", "down": "mlp.down"}
CACHES = ("k_cache", "v_cache")  # from the attention backend's pool

# why a step took the Python layer loop (FusedDecodeStats.loop_steps keys; other reasons name what they found)
OFF = "fused_decode is off (EngineConfig.fused_decode=False)"
NO_EXTENSION = "ettrl_kernels._C has no decode_layers (the C++ extension is not built)"
NO_BACKEND = "no attention backend (the engine is asleep)"
FUSED_OPS_OFF = "the fused ops are off (EngineConfig.fused_ops=False)"
NOT_PANELS = ("the matmul weights are not in panels (pack_weights=False, matmul_kernel other than 'panel', or a CPU "
              "without AVX-512 BF16)")
TORCH_STEP = "the step was planned for the torch attention path (no paged C++ kernel for it)"


class StackArgs(Protocol):
    """What the stack reads of a model's parsed config (llama.ModelArgs)."""
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float


class StackModel(Protocol):
    """A model the stack can run: llama.CausalLM's attributes it reads (its layers by NORMS and MATMULS paths)."""
    fused_decode: bool

    @property
    def args(self) -> StackArgs:
        """The parsed config."""

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The decoder layers, first first."""

    @property
    def embed_tokens(self) -> torch.Tensor:
        """The embedding table (its device and dtype are the model's)."""


@dataclass
class FusedDecodeStats:
    """How a model's steps ran: `fused_steps` through the C++ stack, `loop_steps` through the Python layer loop by
    reason. `last_reason` is why the last step took the loop ("" if it ran fused). The first step of each reason is
    logged (INFO, logger engine.layers.decode_layers)."""
    fused_steps: int = 0
    loop_steps: dict[str, int] = field(default_factory=dict)
    last_reason: str = ""

    def record(self, reason: str) -> None:
        """One step: fused ("") or the loop, for `reason`."""
        self.last_reason = reason
        if not reason:
            self.fused_steps += 1
            return
        seen = self.loop_steps.get(reason, 0)
        if not seen:
            log.info("fused decode stack off: %s; steps take the Python layer loop", reason)
        self.loop_steps[reason] = seen + 1


class DecodeStack:
    """A model's layers as the C++ stack takes them (built once per weights, fused ops and KV pool), and the step
    arguments that stay the same from step to step."""

    def __init__(self, model: StackModel, layers: list[dict[str, int]], attn: AttentionBackend, kv: PagedKV):
        ext = extension()
        if ext is None:
            raise RuntimeError(NO_EXTENSION)
        self.ext = ext
        _check_fields("DecodeLayerWeights", {*layers[0]}, ext.DecodeLayerWeights.fields)
        self.table = ext.DecodeLayerTable([_struct(ext.DecodeLayerWeights(), fields) for fields in layers])
        a, first = model.args, _find(type(model).__name__, 0, model.layers[0], "self_attn")
        self.attn, self.kv, self.model_args = attn, kv, a
        self.q_norm, self.k_norm = _qk_norms(first)
        self.constants = {"hidden": a.hidden_size, "inter": a.intermediate_size, "num_heads": a.num_heads,
                          "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim, "eps": a.rms_norm_eps,
                          "qk_norm_eps": 1e-6 if first.q_norm is None else first.q_norm.eps,
                          "block_size": kv.block_size, "scale": kv.scale}
        self.args = _struct(ext.DecodeStepArgs(), self.constants)
        self.step_fields_checked = False

    def run(self, x: torch.Tensor, rope: StepRope) -> tuple[torch.Tensor, torch.Tensor] | str:
        """(last layer's MLP output, residual stream) as the Python loop returns them, or why this step takes the
        loop."""
        op, plan = _OP, self.attn.decode_plan()
        if op is None:
            return NO_EXTENSION
        if plan is None:
            return TORCH_STEP
        if not x.is_contiguous():
            return "the step's embeddings are not contiguous"
        a, t = self.model_args, x.shape[0]
        fused_ops.check_rope_step(t, x.dtype, self.kv.k_slots[0], self.kv.v_slots[0], plan.slot_mapping,
                                  rope.positions, rope.table.cos, rope.table.sin, a.num_kv_heads, a.head_dim,
                                  self.q_norm, self.k_norm)
        q_width, kv_width = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        residual, h = torch.empty_like(x), torch.empty_like(x)
        qkv, q, out = x.new_empty(t, q_width + 2 * kv_width), x.new_empty(t, q_width), x.new_empty(t, q_width)
        gate_up, act = x.new_empty(t, 2 * a.intermediate_size), x.new_empty(t, a.intermediate_size)
        step = {"x": x.data_ptr(), "residual": residual.data_ptr(), "h": h.data_ptr(), "qkv": qkv.data_ptr(),
                "q": q.data_ptr(), "attn": out.data_ptr(), "gate_up": gate_up.data_ptr(), "act": act.data_ptr(),
                "tokens": t, "slots": plan.slot_mapping.data_ptr(), "positions": rope.positions.data_ptr(),
                "cos": rope.table.cos.data_ptr(), "sin": rope.table.sin.data_ptr(),
                "block_tables": plan.block_tables.data_ptr(), "kv_lens": plan.kv_lens.data_ptr(),
                "q_starts": _address(plan.q_starts), "batch": plan.batch, "num_decode": plan.num_decode,
                "table_width": plan.block_tables.shape[1], "bf16": x.dtype == torch.bfloat16,
                "num_threads": torch.get_num_threads()}
        if not self.step_fields_checked:
            _check_fields("DecodeStepArgs", {*self.constants, *step}, self.ext.DecodeStepArgs.fields)
            self.step_fields_checked = True
        op(self.table, _struct(self.args, step))
        return x, residual


def build(model: StackModel) -> DecodeStack | str:
    """The model's stack, or why its steps take the Python loop. A model class opts in by declaring
    `fused_decode_layout = LAYOUT` in its own body: a subclass that changes any layer's math does not inherit the C++
    path by accident. Raises RuntimeError, naming it, for a layer tensor the stack does not read or cannot find."""
    cls = type(model)
    if vars(cls).get("fused_decode_layout") != LAYOUT:
        return f"{cls.__name__} does not declare fused_decode_layout = {LAYOUT!r}"
    device = model.embed_tokens.device
    if device.type != "cpu":
        return f"the model is on {device} (the C++ stack runs on the CPU)"
    if _OP is None:
        return NO_EXTENSION
    attn: AttentionBackend | None = _find(cls.__name__, 0, model.layers[0], "self_attn.attn")
    if attn is None:
        return NO_BACKEND
    kv = attn.paged_kv()
    if kv is None:
        return attn.why_not_paged()
    ext = extension()
    if not hasattr(ext, "DecodeLayerWeights"):
        raise RuntimeError(f"decode_layers: {getattr(ext, '__file__', 'ettrl_kernels._C')} predates the named "
                           "DecodeLayerWeights / DecodeStepArgs contract: rebuild it (python setup.py build_ext "
                           "--inplace)")
    layers = []
    for i, layer in enumerate(model.layers):
        fields = layer_fields(cls.__name__, i, layer, attn, kv)
        if isinstance(fields, str):
            return fields
        layers.append(fields)
    return DecodeStack(model, layers, attn, kv)


def layer_fields(model_name: str, i: int, layer: torch.nn.Module, attn: AttentionBackend,
                 kv: PagedKV) -> dict[str, int] | str:
    """DecodeLayerWeights field -> address for layer `i`, or why the layer cannot run in the stack. Raises
    RuntimeError, naming it, for a tensor the stack reads that the layer lacks or a parameter it has that the stack
    does not read."""
    def find(path: str) -> Any:
        return _find(model_name, i, layer, path)

    vectors = {name: find(path) for name, path in NORMS.items()}
    vectors.update({f"{name}_bias": find(f"{prefix}_bias") for name, prefix in MATMULS.items()})
    panels = {name: find(f"{prefix}_packed") for name, prefix in MATMULS.items()}
    for prefix in MATMULS.values():
        find(f"{prefix}_weight")  # what the panels copy: named in the error if it was renamed
    read = {*NORMS.values(), *(f"{p}_{kind}" for p in MATMULS.values() for kind in ("weight", "bias"))}
    unread = sorted(name for name, _ in layer.named_parameters() if name not in read)
    if unread:
        raise RuntimeError(f"decode_layers: {model_name}.layers[{i}] has {unread}, which the C++ stack does not read: "
                           "add a field to DecodeLayerWeights (csrc/decode_layers.h) and to NORMS or MATMULS in "
                           "engine/layers/decode_layers.py, or drop fused_decode_layout from the model class")
    if not (find("mlp.fused") and find("input_layernorm.fused")):
        return FUSED_OPS_OFF
    if find("self_attn.attn") is not attn or find("self_attn.layer_idx") != i:
        return f"layers[{i}] does not attend through the model's attention backend as layer {i}"
    if not all(isinstance(p, Panels) for p in panels.values()):
        return NOT_PANELS
    fields = {name: p.data.data_ptr() for name, p in panels.items()}
    for name, t in vectors.items():
        if t is not None and not t.is_contiguous():
            return f"layers[{i}]'s {name} is not contiguous"
        fields[name] = _address(t)
    fields["k_cache"], fields["v_cache"] = kv.k_slots[i].data_ptr(), kv.v_slots[i].data_ptr()
    return fields


def _find(model_name: str, i: int, layer: torch.nn.Module, path: str) -> Any:
    """layer.<path>; None where a part of it is None (a bias or norm the model does not have)."""
    obj: Any = layer
    for part in path.split("."):
        if obj is None:
            return None
        if not hasattr(obj, part):
            raise RuntimeError(f"decode_layers: {model_name}.layers[{i}] has no {path} (renamed?): the C++ stack "
                               "reads it; update NORMS or MATMULS in engine/layers/decode_layers.py")
        obj = getattr(obj, part)
    return obj


def _check_fields(struct: str, filled: set[str], declared: tuple[str, ...]) -> None:
    if filled != set(declared):
        raise RuntimeError(f"decode_layers: ettrl_kernels._C.{struct} has fields {sorted(set(declared) - filled)} "
                           f"that engine/layers/decode_layers.py does not fill, and lacks "
                           f"{sorted(filled - set(declared))}: rebuild the extension (python setup.py build_ext "
                           "--inplace) or update both sides")


def _struct(struct: Any, fields: dict[str, Any]) -> Any:
    """The pybind11 struct with each field set by name (an unknown name raises AttributeError naming it)."""
    for name, value in fields.items():
        setattr(struct, name, value)
    return struct


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _qk_norms(att: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The per-head q and k RMSNorm weights (Qwen3), or (None, None)."""
    return (None, None) if att.q_norm is None else (att.q_norm.weight, att.k_norm.weight)
