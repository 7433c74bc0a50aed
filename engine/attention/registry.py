"""Paged-attention backends by name. EngineConfig.attention_backend picks one; "auto" takes the first of
AUTO_ORDER that supports the device and KV dtype and starts (`create_backend`: a backend whose kernels do not
build, BackendUnavailable, gives way to the next with a warning; a named one raises).

Backends are imported only when considered or chosen (a module path per name), so a CPU machine never imports
flashinfer. Adding one: a subclass of base.AttentionBackend in its own module, and a line in BACKENDS.
"""
from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

import torch

from engine.attention.base import AttentionBackend, BackendUnavailable

if TYPE_CHECKING:  # annotations only: the config imports NAMES from here
    from engine.config import EngineConfig

BACKENDS = {  # name -> "module:class"
    "flashinfer": "engine.attention.flashinfer:FlashInferPagedAttention",  # CUDA, fp16 / bf16
    "cpu_paged": "engine.attention.torch_paged:CpuPagedAttention",       # CPU: the C++ decode kernel + fused rope
    "torch": "engine.attention.torch_paged:TorchPagedAttention",          # any device: gather + SDPA (reference)
}
AUTO_ORDER = ("flashinfer", "cpu_paged", "torch")
NAMES = ("auto", *BACKENDS)


def backend_class(name: str) -> type[AttentionBackend]:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(NAMES)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def select_backend(name: str, device: torch.device, dtype: torch.dtype,
                   skip: dict[str, str] | None = None) -> type[AttentionBackend]:
    """The backend class for EngineConfig.attention_backend `name` and a KV cache of `dtype` on `device`.
    skip: auto mode's candidates that failed to start, with why (they are passed over)."""
    device = torch.device(device)
    if name != "auto":
        cls, why = _usable(name, device, dtype)
        if why or cls is None:  # no class comes with a reason
            raise ValueError(f"attention_backend={name!r} cannot serve a {dtype} KV cache on {device}: {why}; "
                             f"use attention_backend='auto' or one of {list(NAMES)}")
        return cls
    reasons = dict(skip or {})
    for candidate in AUTO_ORDER:
        if candidate in reasons or device.type != "cuda" and candidate == "flashinfer":
            continue  # failed to start, or not even imported: it serves CUDA only
        cls, reasons[candidate] = _usable(candidate, device, dtype)
        if cls is not None and not reasons[candidate]:
            if device.type == "cuda" and candidate != "flashinfer":
                warnings.warn(f"using the {candidate} paged attention on {device}: {reasons['flashinfer']}",
                              stacklevel=2)
            return cls
    raise ValueError(f"no attention backend serves a {dtype} KV cache on {device}: {reasons}")


def create_backend(name: str, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float,
                   config: EngineConfig, device: torch.device | None = None) -> AttentionBackend:
    """The backend over this KV pool (engine/attention/base.py: create). device: where the pool lives (default:
    the pool's own device). A named backend that cannot start raises ValueError with its reason; in auto mode it
    gives way to the next candidate."""
    device = torch.device(device if device is not None else k_cache.device)
    failed: dict[str, str] = {}
    while True:
        cls = select_backend(name, device, k_cache.dtype, failed)
        try:
            return cls.create(k_cache, v_cache, num_heads, scale, config)
        except BackendUnavailable as e:
            if name != "auto":
                raise ValueError(f"attention_backend={name!r} cannot start on {device}: {e}; use "
                                 f"attention_backend='auto' or one of {list(NAMES)}") from e
            failed[cls.name] = str(e)


def _usable(name: str, device: torch.device, dtype: torch.dtype) -> tuple[type[AttentionBackend] | None, str]:
    """(the class, "") or (the class or None, why it cannot serve this cache)."""
    try:
        cls = backend_class(name)
    except ImportError as error:
        return None, f"its module does not import ({error})"
    return cls, cls.why_unsupported(device, dtype)
