"""Llama / Qwen2 / Qwen3 decoder in one module, switched by config flags.

Llama: optional attention/MLP bias, llama3 rope scaling. Qwen2: bias on q/k/v. Qwen3: RMSNorm on q and k per head.
q/k/v and gate/up are fused into one matmul each; `hf_parameter_views` maps every Hugging Face parameter name to
the slice of the fused tensor that holds it, which is how both the loader and update_weights write weights.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import decode_layers, fused_ops
from engine.layers.decode_layers import DecodeStack, FusedDecodeStats
from engine.layers.packed_linear import Panels, linear, linear_fp32_out, pack
from engine.layers.rope import RotaryEmbedding, StepRope, apply_rope

if TYPE_CHECKING:  # annotations only: the attention backends name this module's norms
    from engine.attention.base import AttentionBackend

Packed = Panels | torch.Tensor | None  # a matmul weight packed for its kernel (packed_linear.pack), None: F.linear

VARIANTS = ("llama", "qwen2", "qwen3")  # what registry.py passes to ModelArgs.from_hf


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    torch_dtype: str | None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], kind: str = "llama") -> ModelArgs:
        """From a config.json; kind "llama" (optional biases, llama3 rope), "qwen2" (q/k/v bias) or "qwen3"
        (per-head q/k RMSNorm)."""
        if kind not in VARIANTS:
            raise ValueError(f"unknown llama variant {kind!r}; one of {VARIANTS}")
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        heads = cfg["num_attention_heads"]
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=kind,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bias,
            o_bias=bias and kind != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=kind == "qwen3",
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = _param(dim, dtype=dtype, device=device)
        self.eps = eps
        self.fused = False  # the C++ op (engine/layers/fused_ops.py), set by CausalLM.use_fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dim() == 2:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); the fused op updates `residual` in place."""
        if self.fused:
            return fused_ops.rms_norm(x, self.weight, self.eps, residual)
        residual = residual + x
        return self(residual), residual


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer_idx: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_size, self.kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        kw: dict[str, Any] = dict(dtype=dtype, device=device)
        self.qkv_weight = _param(self.q_size + 2 * self.kv_size, a.hidden_size, **kw)
        self.qkv_bias = _param(self.q_size + 2 * self.kv_size, **kw) if a.qkv_bias else None
        self.o_weight = _param(a.hidden_size, self.q_size, **kw)
        self.o_bias = _param(a.hidden_size, **kw) if a.o_bias else None
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps, **kw) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps, **kw) if a.qk_norm else None
        self.attn: AttentionBackend | None = None  # the engine's paged-attention backend, set by the model runner
        self.qkv_packed: Packed = None
        self.o_packed: Packed = None

    def pack_weights(self, enabled: bool, kernel: str | None = None) -> None:
        self.qkv_packed = pack(self.qkv_weight, self.qkv_bias, kernel) if enabled else None
        self.o_packed = pack(self.o_weight, self.o_bias, kernel) if enabled else None

    def forward(self, x: torch.Tensor, rope: StepRope) -> torch.Tensor:
        t, attn = x.shape[0], self.attn
        if attn is None:
            raise RuntimeError("no paged-attention backend: the model runner sets one (set_attention)")
        qkv = linear(x, self.qkv_weight, self.qkv_bias, self.qkv_packed)
        if getattr(attn, "takes_qkv", False):  # the backend applies rope (and q/k norms) and writes the cache
            out = attn.attend_qkv(self.layer_idx, qkv, rope, self.q_norm, self.k_norm)
            return linear(out, self.o_weight, self.o_bias, self.o_packed)
        cos, sin = rope.cos_sin()
        q = qkv[:, :self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:  # q and k are adjacent in qkv: rotate them with one set of ops
            qk = apply_rope(qkv[:, :self.q_size + self.kv_size].view(t, -1, self.head_dim), cos, sin)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        out = attn(self.layer_idx, q, k, v)
        return linear(out, self.o_weight, self.o_bias, self.o_packed)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(dtype=dtype, device=device)
        self.inter = a.intermediate_size
        self.gate_up_weight = _param(2 * a.intermediate_size, a.hidden_size, **kw)
        self.gate_up_bias = _param(2 * a.intermediate_size, **kw) if a.mlp_bias else None
        self.down_weight = _param(a.hidden_size, a.intermediate_size, **kw)
        self.down_bias = _param(a.hidden_size, **kw) if a.mlp_bias else None
        self.gate_up_packed: Packed = None
        self.down_packed: Packed = None
        self.fused = False

    def pack_weights(self, enabled: bool, kernel: str | None = None) -> None:
        self.gate_up_packed = pack(self.gate_up_weight, self.gate_up_bias, kernel) if enabled else None
        self.down_packed = pack(self.down_weight, self.down_bias, kernel) if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_weight, self.gate_up_bias, self.gate_up_packed)
        if self.fused:
            act = fused_ops.silu_and_mul(gate_up)
        else:
            act = F.silu(gate_up[:, :self.inter]) * gate_up[:, self.inter:]
        return linear(act, self.down_weight, self.down_bias, self.down_packed)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, layer_idx: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype, device)
        self.self_attn = Attention(a, layer_idx, dtype, device)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype, device)
        self.mlp = MLP(a, dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: StepRope
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next layer adds them (fused with its norm)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, rope)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    """forward(input_ids [T], positions [T], logits_indices [B]) -> fp32 logits [B, vocab]. Implements the model
    interface of registry.py."""
    fused_decode_layout = "llama"  # csrc/decode_layers.cpp computes exactly these layers (layers/decode_layers.py)

    def __init__(self, a: ModelArgs, dtype: torch.dtype, device: torch.device | str, max_positions: int) -> None:
        super().__init__()
        self.args = a
        self.embed_tokens = _param(a.vocab_size, a.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(a, i, dtype, device) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype, device)
        self.lm_head = self.embed_tokens if a.tie_word_embeddings else _param(a.vocab_size, a.hidden_size,
                                                                             dtype=dtype, device=device)
        self.rope = RotaryEmbedding(a.head_dim, max_positions, a.rope_theta, a.rope_scaling, device)
        self.lm_head_packed: Packed = None
        self.fused_decode = True  # steps run the layer stack in one C++ call where it applies
        self.fused_decode_stats = FusedDecodeStats()  # steps through the C++ stack, and through the loop by reason
        self._decode_stack: DecodeStack | str | None = None  # decode_layers.build's, on the first step after a change

    def _decoder_layers(self) -> Iterable[DecoderLayer]:
        """self.layers, typed (an nn.ModuleList holds modules)."""
        return cast("Iterable[DecoderLayer]", self.layers)

    def pack_weights(self, enabled: bool = True, kernel: str | None = None) -> None:
        """(Re)builds the packed copies of every matmul weight for `kernel` (packed_linear.pack; None: by CPU flag,
        the model runner passes matmul_choice's); call after writing weights."""
        for layer in self._decoder_layers():
            layer.self_attn.pack_weights(enabled, kernel)
            layer.mlp.pack_weights(enabled, kernel)
        self.lm_head_packed = pack(self.lm_head, None, kernel) if enabled else None
        self._decode_stack = None

    def use_fused_ops(self, enabled: bool = True) -> bool:
        """C++ RMSNorm + residual add and SiLU * up (engine/layers/fused_ops.py) where they apply: CPU, fp32 or bf16."""
        on = enabled and fused_ops.fused_supported(self.embed_tokens.device, self.embed_tokens.dtype)
        for m in self.modules():
            if isinstance(m, (RMSNorm, MLP)):
                m.fused = on
        self._decode_stack = None
        return on

    def set_attention(self, attn: AttentionBackend | None) -> None:
        for layer in self._decoder_layers():
            layer.self_attn.attn = attn
        self._decode_stack = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens)
        rope = StepRope(self.rope, positions, x.dtype)
        residual: torch.Tensor | None = None
        fused = self._fused_decode(x, rope)
        if fused is not None:
            x, residual = fused
        else:
            for layer in self.layers:
                x, residual = layer(x, residual, rope)
        assert residual is not None, "a model has at least one layer"
        x, _ = self.norm.add_and_norm(x[logits_indices], residual[logits_indices])
        return linear_fp32_out(x, self.lm_head, None, self.lm_head_packed)

    def _fused_decode(self, x: torch.Tensor, rope: StepRope) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The C++ stack's (output, residual), or None for the layer loop; counted in fused_decode_stats."""
        if not self.fused_decode:
            out: tuple[torch.Tensor, torch.Tensor] | str = decode_layers.OFF
        else:
            if self._decode_stack is None:  # rebuilt when weights, fused ops or the attention backend change
                self._decode_stack = decode_layers.build(self)
            stack = self._decode_stack
            out = stack if isinstance(stack, str) else stack.run(x, rope)
        self.fused_decode_stats.record(out if isinstance(out, str) else "")
        return None if isinstance(out, str) else out

    def hf_parameter_views(self) -> dict[str, torch.Tensor]:
        """Hugging Face name -> the tensor (or slice of a fused tensor) that stores it."""
        a = self.args
        views: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed_tokens,
                                          "model.norm.weight": self.norm.weight, "lm_head.weight": self.lm_head}
        q, kv, inter = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
        for i, layer in enumerate(self._decoder_layers()):
            p, att, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
            views[p + "input_layernorm.weight"] = layer.input_layernorm.weight
            views[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            for suffix, fused in (("weight", att.qkv_weight), ("bias", att.qkv_bias)):
                if fused is not None:
                    views[p + f"self_attn.q_proj.{suffix}"] = fused[:q]
                    views[p + f"self_attn.k_proj.{suffix}"] = fused[q:q + kv]
                    views[p + f"self_attn.v_proj.{suffix}"] = fused[q + kv:]
            for suffix, t in (("weight", att.o_weight), ("bias", att.o_bias)):
                if t is not None:
                    views[p + f"self_attn.o_proj.{suffix}"] = t
            if att.q_norm is not None and att.k_norm is not None:
                views[p + "self_attn.q_norm.weight"] = att.q_norm.weight
                views[p + "self_attn.k_norm.weight"] = att.k_norm.weight
            for suffix, fused in (("weight", mlp.gate_up_weight), ("bias", mlp.gate_up_bias)):
                if fused is not None:
                    views[p + f"mlp.gate_proj.{suffix}"] = fused[:inter]
                    views[p + f"mlp.up_proj.{suffix}"] = fused[inter:]
            for suffix, t in (("weight", mlp.down_weight), ("bias", mlp.down_bias)):
                if t is not None:
                    views[p + f"mlp.down_proj.{suffix}"] = t
        return views
