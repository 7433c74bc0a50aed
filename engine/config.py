"""Engine configuration: one dataclass, validated on construction."""
from dataclasses import dataclass

import torch

from engine.attention.registry import NAMES as ATTENTION_BACKENDS

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def default_device() -> str:
    """"cuda" where torch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class EngineConfig:
    """The engine's settings (LLM(model, **fields); `python -m engine.serve` has a flag for each)."""
    model: str
    """A registry name (engine/model_files.py), a Hugging Face hub id or a local model directory."""
    dtype: str = "bfloat16"
    """Weights, activations and KV cache: bfloat16, float16, float32, or auto (the checkpoint's torch_dtype)."""
    device: str = "auto"
    """auto: cuda where torch sees a GPU, else cpu."""
    block_size: int = 16
    """Tokens per KV block (a power of two)."""
    num_kv_blocks: int | None = None
    """Exact KV pool size in blocks; else kv_cache_tokens; else kv_cache_memory_gb."""
    kv_cache_tokens: int | None = None
    """KV pool size in tokens."""
    kv_cache_memory_gb: float | None = None
    """Explicit KV bytes (win over gpu_memory_utilization); CPU default 1 GiB."""
    gpu_memory_utilization: float = 0.9
    """CUDA: fraction of the GPU's total memory this engine may hold (weights + activations + KV pool), as in
    vLLM."""
    max_num_seqs: int = 256
    """Decode budget: sequences per step."""
    max_num_batched_tokens: int | None = None
    """Tokens per step (decodes first, then prefill pieces); without chunked prefill, prompt tokens per prefill
    step. None: 256 on the CPU, 8192 on CUDA."""
    enable_chunked_prefill: bool = True
    """Decodes and prompt pieces share steps (scheduler.py)."""
    long_prefill_token_threshold: int | None = None
    """A prompt longer than this takes at most this many tokens of a step while anything else runs or waits, and
    its pieces end at multiples of it; 0: no cap (pieces of max_num_batched_tokens). None: 16 on the CPU, 512 on
    CUDA."""
    decode_share: float = 0.6
    """A prompt longer than max_num_batched_tokens prefills beside running decodes in pieces spaced (by measured
    step times) so that the decodes keep at least this share of the wall time: they slow to no less than about this
    fraction of their pace, the long prompt's first token comes later. 0: no spacing. Chunked prefill only."""
    max_model_len: int | None = None
    """Longest sequence (prompt + completion); default: the model's max_position_embeddings."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of prompts' common prefixes (radix tree)."""
    pack_weights: bool = True
    """CPU: keep a blocked copy of each matmul weight (panels for panel_linear, or oneDNN's; faster decode
    matmuls, twice the memory)."""
    fused_ops: bool = True
    """CPU: C++ passes for RMSNorm + residual, rope + KV write, SiLU * up."""
    fused_decode: bool = True
    """CPU: a step's whole layer stack (decodes and prefill pieces) in one C++ call where it applies (weights in
    panels, fused_ops, cpu_paged attention)."""
    attention_backend: str = "auto"
    """engine/attention/registry.py: auto, flashinfer (CUDA), cpu_paged, torch."""
    matmul_kernel: str = "auto"
    """CPU matmuls: auto (measured once per machine, stored in the cache dir: engine/layers/matmul_choice.py), panel,
    onednn or torch."""
    batch_invariant: bool = True
    """auto picks only kernels whose row results do not depend on the batch (panel_linear); False also allows
    oneDNN (AMX) and MKL."""

    def __post_init__(self):
        if self.device == "auto":
            self.device = default_device()
        cuda = str(self.device).startswith("cuda")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if cuda else 256
        if self.long_prefill_token_threshold is None:
            self.long_prefill_token_threshold = min(512 if cuda else 16, self.max_num_batched_tokens)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        for name in ("num_kv_blocks", "kv_cache_tokens", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.matmul_kernel not in ("auto", "panel", "onednn", "torch"):
            raise ValueError(f"matmul_kernel must be 'auto', 'panel', 'onednn' or 'torch', got {self.matmul_kernel!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if not 0 <= self.decode_share < 1:
            raise ValueError(f"decode_share must be in [0, 1) (0: no spacing), got {self.decode_share}")
        if not 0 <= self.long_prefill_token_threshold <= self.max_num_batched_tokens:
            raise ValueError(f"long_prefill_token_threshold must be in [0, max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}] (0: no cap), got {self.long_prefill_token_threshold}")
