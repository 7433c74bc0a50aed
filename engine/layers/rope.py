"""Rotary position embeddings (HF's rotate-half convention) with default, linear and llama3 frequency scaling."""
import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    s = scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, s)
    raise NotImplementedError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables in fp32 for every position; `lookup` gathers one step's rows once for all layers."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 device: torch.device | str):
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos = freqs.cos().to(device)
        self.sin = freqs.sin().to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns cos and sign-folded sin, [T, 1, head_dim], in the activation dtype like HF."""
        cos, sin = self.cos[positions].to(dtype), self.sin[positions].to(dtype)
        return torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]. HF's x * cos + rotate_half(x) * sin, with rotate_half(x) * sin written as
    roll(x) * (-sin, sin): the same products and sums, so the same rounding."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class StepRope:
    """One step's positions with the rotary tables; all layers share it. The gathered cos/sin of the torch path are
    built on first use only, so the fused CPU path (which reads the tables itself) never pays for them."""

    def __init__(self, rope: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype):
        # checked where it costs no device sync; on a GPU the engine's max_model_len check already covers it
        on_cpu = positions.device.type == "cpu"
        if positions.numel() and on_cpu and int(positions.max()) >= rope.cos.shape[0]:
            raise IndexError(f"position {int(positions.max())} is past the rotary table "
                             f"({rope.cos.shape[0]} positions)")
        self.table, self.positions, self.dtype = rope, positions, dtype
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos_sin is None:
            self._cos_sin = self.table.lookup(self.positions, self.dtype)
        return self._cos_sin
