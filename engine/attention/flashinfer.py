"""Paged attention on CUDA with FlashInfer's batch prefill / decode wrappers (same interface as torch_paged).

NOT YET RUN ON A GPU: written against flashinfer-python 0.6.18.post1's source (BatchPrefillWithPagedKVCacheWrapper
and BatchDecodeWithPagedKVCacheWrapper, NHD layout, K and V caches passed as a tuple of
[num_pages, page_size, kv_heads, head_dim] tensors; plan() arguments checked against 0.5.3 and 0.6.18).
New K/V are written with index_copy_ at their slots, as on the CPU. FlashInfer's causal mask aligns each
sequence's queries with the end of its keys, which is what a prefill over a cached prefix needs.

Both wrappers run FA2 (`backend="fa2"`): prefill's default "auto" picks FA3 on sm_90, whose JIT build needs
headers a CUDA toolkit may lack (curand_kernel.h) and compiles ~4x slower; with FA2 prefill and tensor-core decode
share one JIT module per (dtype, head_dim). Both plans take the same fixed KV split size (in pages): the split of
a sequence's keys, and so the order of its softmax reduction, no longer depends on the batch (batch invariance).

Usable means installed, recent enough, a dtype it has kernels for and importable (a `--no-deps` install lacks
apache-tvm-ffi: `flashinfer_usable`); building the backend then plans one tiny decode and prefill batch, which
JIT-compiles its kernels (nvcc and ninja; flashinfer finds the toolkit through CUDA_HOME or `which nvcc`) and
raises BackendUnavailable when that fails. In auto mode the registry then falls back to the torch attention with
a warning; a named flashinfer backend fails at construction with that message.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import re
from typing import TYPE_CHECKING, Any

import torch

from engine.attention.base import AttentionBackend, BackendUnavailable

if TYPE_CHECKING:  # annotations only: the config names the backends
    from engine.config import EngineConfig

MIN_VERSION = (0, 5, 3)       # oldest release whose decode plan() arguments (fixed_split_size, ...) were checked
PINNED_VERSION = "0.6.18.post1"  # the release this file was written against (setup.py's `cuda` extra)
TVM_FFI_VERSION = "0.1.15.post2"  # apache-tvm-ffi, flashinfer 0.6.18's runtime dependency
DTYPES = (torch.float16, torch.bfloat16)  # flashinfer has no float32 attention kernels
WORKSPACE_BYTES = 256 * 2**20
SPLIT_TOKENS = 2048           # KV split size in tokens (fixed: batch-invariant), converted to pages
BACKEND = "fa2"               # FlashInfer's kernel family for both wrappers (see above)


def _version_tuple(text: str) -> tuple[int, ...]:
    """"0.6.18.post1" -> (0, 6, 18); unparsable versions compare as (0,)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g or 0) for g in match.groups()) if match else (0,)


def installed_version() -> str | None:
    """flashinfer's version from its distribution metadata (no import: importing it is slow), or None."""
    for name in ("flashinfer-python", "flashinfer"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def flashinfer_usable(device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
    """(True, "") when this backend can serve a KV cache of `dtype` on `device`, else (False, why not)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"flashinfer runs on CUDA devices only, not {device.type}"
    if dtype not in DTYPES:
        return False, f"flashinfer has no {dtype} attention kernels (float16 and bfloat16 only)"
    version = installed_version()
    if version is None:
        return False, f"flashinfer is not installed (pip install flashinfer-python=={PINNED_VERSION})"
    if _version_tuple(version) < MIN_VERSION:
        return False, (f"flashinfer {version} is older than {'.'.join(map(str, MIN_VERSION))}, whose plan() "
                       f"arguments this backend uses (pip install flashinfer-python=={PINNED_VERSION})")
    return _importable(version)


def _importable(version: str) -> tuple[bool, str]:
    try:
        importlib.import_module("flashinfer")
    except Exception as e:  # noqa: BLE001 - any failure to import means: not usable, and say why
        hint = ""
        if isinstance(e, ImportError) and "tvm_ffi" in str(e):
            hint = (f"; flashinfer needs apache-tvm-ffi (pip install apache-tvm-ffi=={TVM_FFI_VERSION}, or beside a "
                    f"--no-deps install of flashinfer: pip install --no-index --no-deps --target DIR its wheel)")
        return False, f"flashinfer {version} is installed but does not import ({type(e).__name__}: {e}){hint}"
    return True, ""


def split_plan_args(block_size: int) -> dict[str, Any]:
    """Arguments of both plans (decode and prefill, FA2) that make their split of the keys independent of the
    batch: a fixed split size in pages."""
    return {"fixed_split_size": max(1, SPLIT_TOKENS // block_size)}


class FlashInferPagedAttention(AttentionBackend):
    name = "flashinfer"

    @classmethod
    def why_unsupported(cls, device: torch.device, dtype: torch.dtype) -> str:
        return flashinfer_usable(device, dtype)[1]

    @classmethod
    def create(cls, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float,
               config: EngineConfig) -> FlashInferPagedAttention:
        """The backend, once it has planned one tiny decode and prefill batch (its first plans JIT-build the
        kernels): BackendUnavailable says what is missing when that fails."""
        backend = cls(k_cache, v_cache, num_heads, scale)
        try:
            backend.plan_tiny_batches()
        except RuntimeError as e:
            raise BackendUnavailable(str(e)) from e
        return backend

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float):
        """k_cache, v_cache: [num_layers, num_blocks, block_size, kv_heads, head_dim] on a CUDA device."""
        usable, why = flashinfer_usable(k_cache.device, k_cache.dtype)
        if not usable:
            raise BackendUnavailable(f"FlashInferPagedAttention: {why}")
        import flashinfer

        self.k_cache, self.v_cache = k_cache, v_cache
        self.num_layers, num_blocks, self.block_size, self.kv_heads, self.head_dim = k_cache.shape
        self.k_slots = k_cache.view(self.num_layers, num_blocks * self.block_size, self.kv_heads, self.head_dim)
        self.v_slots = v_cache.view(self.num_layers, num_blocks * self.block_size, self.kv_heads, self.head_dim)
        self.num_heads, self.scale = num_heads, scale
        # flashinfer: "must be initialized to 0 for its first use" (its split-k counters live there)
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=k_cache.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=BACKEND)
        # tensor cores for every group size: only that path takes a fixed split size
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True,
                                                                    backend=BACKEND)
        self.slot_mapping: torch.Tensor | None = None  # set by each plan()
        self.is_decode = True

    def plan_tiny_batches(self) -> None:
        """Plans a one-token decode and a two-token prefill over block 0 (nothing is written): builds or loads the
        JIT module, and fails here, with what is missing, rather than at the first step."""
        device = self.k_cache.device
        for tokens in (1, 2):
            pages = -(-tokens // self.block_size)
            self.plan([tokens], [tokens], torch.zeros(1, pages, dtype=torch.int64, device=device),
                      torch.arange(tokens, device=device))

    def plan(self, query_lens: list[int], kv_lens: list[int], block_tables: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
        """The index tensors flashinfer reads on the host (indptr, last page lengths) are built there. The page
        list is gathered on the device from the block tables by an index built on the host from the lengths
        alone (one non-blocking copy): no boolean mask, whose gather would wait for the device."""
        bs = self.block_size
        pages = [-(-n // bs) for n in kv_lens]
        kv_indptr = torch.tensor([0, *pages], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        kv_indices = block_tables.reshape(-1).index_select(0, page_positions(pages, block_tables)).to(torch.int32)
        last_page_len = torch.tensor([n - (p - 1) * bs for n, p in zip(kv_lens, pages)], dtype=torch.int32)
        common = {"q_data_type": self.k_cache.dtype, "kv_data_type": self.k_cache.dtype, "sm_scale": self.scale,
                  **split_plan_args(bs)}
        self.slot_mapping = slot_mapping
        self.is_decode = max(query_lens) == 1
        try:
            if self.is_decode:
                self.decode.plan(kv_indptr, kv_indices, last_page_len, self.num_heads, self.kv_heads,
                                 self.head_dim, bs, pos_encoding_mode="NONE", **common)
            else:
                qo_indptr = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
                self.prefill.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, self.num_heads, self.kv_heads,
                                  self.head_dim, bs, causal=True, **common)
        except Exception as e:  # its first plan() JIT-builds kernels: say what that needs and how to avoid it
            step = "decode" if self.is_decode else "prefill"
            raise RuntimeError(f"flashinfer {installed_version()} failed to plan a {step} step "
                               f"({type(e).__name__}: {e}); its first plan() compiles kernels, which needs nvcc "
                               f"and ninja (flashinfer finds the CUDA toolkit through CUDA_HOME or `which nvcc`); "
                               f"attention_backend='torch' avoids flashinfer") from e

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, D]; k, v: [T, kv_heads, D]. Returns [T, heads * D]."""
        assert self.slot_mapping is not None, "plan() the step first"
        self.k_slots[layer].index_copy_(0, self.slot_mapping, k)
        self.v_slots[layer].index_copy_(0, self.slot_mapping, v)
        cache = (self.k_cache[layer], self.v_cache[layer])
        wrapper = self.decode if self.is_decode else self.prefill
        out = wrapper.run(q.contiguous(), cache)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


def page_positions(pages: list[int], block_tables: torch.Tensor) -> torch.Tensor:
    """Where each sequence's first pages[i] entries sit in the flattened [B, width] block tables, built on the host
    and sent in one pinned, non-blocking copy to the tables' device."""
    width = block_tables.shape[1]
    positions = torch.tensor([i * width + j for i, n in enumerate(pages) for j in range(n)], dtype=torch.int64)
    if block_tables.device.type == "cuda":
        positions = positions.pin_memory().to(block_tables.device, non_blocking=True)
    return positions
