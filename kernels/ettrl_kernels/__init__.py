"""Fused sampling and token-statistics kernels (Triton on CUDA; C++ or torch on the CPU).

    tokens, logprobs, entropies = ettrl_kernels.entropy_sample(logits, temperature=0.6, top_k=-1, top_p=1.0,
                                                               seeds=seed, seq_ids=seq_ids, positions=positions,
                                                               exclude=None, backend="auto")   # | torch | cpp | triton
    logprobs, entropies = ettrl_kernels.token_stats(logits, targets, temperature=1.0, backend="auto")

Both report the policy's own full-vocabulary distribution softmax(logits / T) (docs/algorithms.md section 3);
sampling noise is a pure function of (seed, seq_id, position, token) (noise.py), identical on every backend.
backend.py's table names the backends (torch, cpp, triton), which kernels each implements and where each runs.
"""
from ettrl_kernels.backend import BACKENDS, backend_names, resolve_backend
from ettrl_kernels.sampling import entropy_sample
from ettrl_kernels.token_stats import token_stats

__all__ = ["entropy_sample", "token_stats", "resolve_backend", "backend_names", "BACKENDS"]
