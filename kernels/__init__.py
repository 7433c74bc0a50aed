"""Fused sampling and token-statistics kernels (Triton on CUDA, torch elsewhere)."""
