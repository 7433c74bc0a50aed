"""Paged-attention backends by name. EngineConfig.attention_backend picks one; "auto" takes the first of
AUTO_ORDER that supports the device and KV dtype.

Backends are imported only when considered or chosen (a module path per name), so a CPU machine never imports
flashinfer. Adding one: a subclass of base.AttentionBackend in its own module, and a line in BACKENDS.
"""
import importlib
import warnings

import torch

from engine.attention.base import AttentionBackend

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


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> type[AttentionBackend]:
    """The backend class for EngineConfig.attention_backend `name` and a KV cache of `dtype` on `device`."""
    device = torch.device(device)
    if name != "auto":
        cls, why = _usable(name, device, dtype)
        if why:
            raise ValueError(f"attention_backend={name!r} cannot serve a {dtype} KV cache on {device}: {why}; "
                             f"use attention_backend='auto' or one of {list(NAMES)}")
        return cls
    reasons = {}
    for candidate in AUTO_ORDER:
        if device.type != "cuda" and candidate == "flashinfer":
            continue  # not even imported: it serves CUDA only
        cls, reasons[candidate] = _usable(candidate, device, dtype)
        if not reasons[candidate]:
            if device.type == "cuda" and candidate != "flashinfer":
                warnings.warn(f"using the {candidate} paged attention on {device}: {reasons['flashinfer']}",
                              stacklevel=2)
            return cls
    raise ValueError(f"no attention backend serves a {dtype} KV cache on {device}: {reasons}")


def _usable(name: str, device: torch.device, dtype: torch.dtype) -> tuple[type[AttentionBackend] | None, str]:
    """(the class, "") or (the class or None, why it cannot serve this cache)."""
    try:
        cls = backend_class(name)
    except ImportError as error:
        return None, f"its module does not import ({error})"
    return cls, cls.why_unsupported(device, dtype)
