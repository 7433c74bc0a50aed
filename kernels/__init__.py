"""Fused sampling and token-statistics kernels (Triton on CUDA, torch elsewhere)."""
from kernels.backend import resolve_backend
from kernels.sampling import entropy_sample
from kernels.token_stats import token_stats

__all__ = ["entropy_sample", "token_stats", "resolve_backend"]
