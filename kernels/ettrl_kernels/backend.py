"""Kernel backends by name: which implementation each name runs for each kernel, and where it can run.

    backend  entropy_sample                          token_stats          runs on
    triton   sampling_triton.entropy_sample_triton   TokenStatsTriton     CUDA tensors (or TRITON_INTERPRET=1)
    cpp      sampling_cpu.entropy_sample_cpu         -                    CPU float32 logits, no top-k / top-p,
                                                                          the C++ extension built
    torch    sampling_torch.entropy_sample_torch     TokenStatsTorch      anything (the reference)

"auto" takes the first backend of the table that has the kernel and that auto picks for the inputs: Triton for
CUDA tensors where CUDA is available, then the C++ op wherever it can run, then torch. A backend named for inputs
it cannot run raises a ValueError that says why and what to name instead. Implementations are imported when first
chosen (Triton only where it runs).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ettrl_kernels.extension import extension_op

KERNELS = ("entropy_sample", "token_stats")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _runs_anywhere(logits: torch.Tensor, truncated: bool) -> str | None:
    return None


def _triton_refusal(logits: torch.Tensor, truncated: bool) -> str | None:
    if logits.is_cuda or triton_interpreted():
        return None
    return "it needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton, as the tests do)"


def _cpp_refusal(logits: torch.Tensor, truncated: bool) -> str | None:
    if not logits.is_cpu:
        return f"it samples CPU tensors, the logits are on {logits.device}"
    if logits.dtype != torch.float32:
        return f"it takes float32 logits, got {logits.dtype}"
    if truncated:
        return "it does no top-k / top-p"
    if extension_op("entropy_sample") is None:
        return "the C++ extension is not built (python setup.py build_ext --inplace)"
    return None


def _triton_auto(logits: torch.Tensor, truncated: bool) -> bool:
    return logits.is_cuda and torch.cuda.is_available()


def _cpp_auto(logits: torch.Tensor, truncated: bool) -> bool:
    return _cpp_refusal(logits, truncated) is None


def _always(logits: torch.Tensor, truncated: bool) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    name: str
    kernels: dict[str, str]  # kernel name -> "module:attribute" of its implementation
    refusal: Callable[[torch.Tensor, bool], str | None]  # (logits, truncated) -> why it cannot run them, or None
    auto: Callable[[torch.Tensor, bool], bool]  # (logits, truncated) -> whether "auto" picks it


BACKENDS: dict[str, Backend] = {b.name: b for b in (  # in auto's order of preference
    Backend("triton", {"entropy_sample": "ettrl_kernels.sampling_triton:entropy_sample_triton",
                       "token_stats": "ettrl_kernels.token_stats_triton:TokenStatsTriton"},
            _triton_refusal, _triton_auto),
    Backend("cpp", {"entropy_sample": "ettrl_kernels.sampling_cpu:entropy_sample_cpu"}, _cpp_refusal, _cpp_auto),
    Backend("torch", {"entropy_sample": "ettrl_kernels.sampling_torch:entropy_sample_torch",
                      "token_stats": "ettrl_kernels.token_stats_torch:TokenStatsTorch"},
            _runs_anywhere, _always),
)}


_NAMES = {kernel: ("auto", *(name for name, b in BACKENDS.items() if kernel in b.kernels)) for kernel in KERNELS}


def backend_names(kernel: str) -> tuple[str, ...]:
    """The names `kernel`'s backend= takes: "auto" and every backend that implements it."""
    if kernel not in _NAMES:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return _NAMES[kernel]


def resolve_backend(kernel: str, backend: str, logits: torch.Tensor, truncated: bool = False) -> str:
    """The backend that runs `kernel` on these logits: `backend` itself if it can run them, or auto's choice.
    `truncated`: some row samples with top-k or top-p (entropy_sample)."""
    names = backend_names(kernel)
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    if backend == "auto":
        return next(name for name in names[1:] if BACKENDS[name].auto(logits, truncated))
    why = BACKENDS[backend].refusal(logits, truncated)
    if why is not None:
        raise ValueError(f"backend={backend!r} cannot run {kernel} on these logits: {why}; name backend='torch' "
                         f"(any logits) or 'auto'")
    return backend


@functools.cache
def implementation(kernel: str, backend: str) -> Any:
    """The function (or autograd Function) that `backend` runs for `kernel`, imported on first use."""
    module, attribute = BACKENDS[backend].kernels[kernel].split(":")
    return getattr(importlib.import_module(module), attribute)


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context in which a Triton launch runs on the tensor's GPU: Triton launches on the *current* device, which
    for tensors on cuda:1 (or any non-current GPU) is the wrong one. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
