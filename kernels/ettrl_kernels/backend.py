"""Backend choice shared by the kernels: Triton on CUDA tensors, torch elsewhere."""
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
