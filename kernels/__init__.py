"""Fused sampling and token-statistics kernels (Triton on CUDA, torch elsewhere)."""
from kernels.backend import resolve_backend
from kernels.sampling import entropy_sample

__all__ = ["entropy_sample", "resolve_backend"]
