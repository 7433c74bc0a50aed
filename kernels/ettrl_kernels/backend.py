"""Backend choice shared by the kernels: Triton on CUDA tensors, torch elsewhere."""
import contextlib
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Return "torch" or "triton" for `backend` ("auto" | "torch" | "triton") and the tensor's device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and torch.cuda.is_available() else "torch"
    if backend == "triton" and not tensor.is_cuda and not triton_interpreted():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                         "triton, as the tests do); use backend='torch' on the CPU")
    return backend


def device_guard(tensor: torch.Tensor):
    """Context in which a Triton launch runs on the tensor's GPU: Triton launches on the *current* device, which
    for tensors on cuda:1 (or any non-current GPU) is the wrong one. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
