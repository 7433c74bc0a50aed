"""Paged attention on CUDA with FlashInfer's batch prefill / decode wrappers (same interface as attention_torch).

UNTESTED here: written from FlashInfer's documented API (BatchPrefillWithPagedKVCacheWrapper and
BatchDecodeWithPagedKVCacheWrapper, NHD layout, K and V caches passed as a tuple of
[num_pages, page_size, kv_heads, head_dim] tensors). New K/V are written with index_copy_ at their slots, as on
the CPU. FlashInfer's causal mask aligns each sequence's queries with the end of its keys, which is what a
prefill over a cached prefix needs.
"""
import flashinfer
import torch

from engine.attention.base import AttentionBackend

WORKSPACE_BYTES = 256 * 2**20


class FlashInferPagedAttention(AttentionBackend):
    name = "flashinfer"

    @classmethod
    def why_unsupported(cls, device, dtype):
        return "" if torch.device(device).type == "cuda" else "flashinfer runs on CUDA devices only"

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, scale: float):
        """k_cache, v_cache: [num_layers, num_blocks, block_size, kv_heads, head_dim] on a CUDA device."""
        self.k_cache, self.v_cache = k_cache, v_cache
        self.num_layers, num_blocks, self.block_size, self.kv_heads, self.head_dim = k_cache.shape
        self.k_slots = k_cache.view(self.num_layers, num_blocks * self.block_size, self.kv_heads, self.head_dim)
        self.v_slots = v_cache.view(self.num_layers, num_blocks * self.block_size, self.kv_heads, self.head_dim)
        self.num_heads, self.scale = num_heads, scale
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=k_cache.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=num_heads // self.kv_heads >= 4)
        self.slot_mapping = None
        self.is_decode = True

    def plan(self, query_lens: list[int], kv_lens: list[int], block_tables: torch.Tensor, slot_mapping: torch.Tensor):
        device = block_tables.device
        bs = self.block_size
        pages = [-(-n // bs) for n in kv_lens]
        kv_indptr = torch.tensor([0, *pages], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        used = torch.arange(block_tables.shape[1], device=device) < torch.tensor(pages, device=device)[:, None]
        kv_indices = block_tables[used].to(torch.int32)
        last_page_len = torch.tensor([n - (p - 1) * bs for n, p in zip(kv_lens, pages)], dtype=torch.int32,
                                     device=device)
        common = dict(q_data_type=self.k_cache.dtype, kv_data_type=self.k_cache.dtype, sm_scale=self.scale)
        self.slot_mapping = slot_mapping
        self.is_decode = max(query_lens) == 1
        if self.is_decode:
            self.decode.plan(kv_indptr, kv_indices, last_page_len, self.num_heads, self.kv_heads, self.head_dim,
                             bs, pos_encoding_mode="NONE", **common)
        else:
            qo_indptr = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
            self.prefill.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, self.num_heads, self.kv_heads,
                              self.head_dim, bs, causal=True, **common)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, D]; k, v: [T, kv_heads, D]. Returns [T, heads * D]."""
        self.k_slots[layer].index_copy_(0, self.slot_mapping, k)
        self.v_slots[layer].index_copy_(0, self.slot_mapping, v)
        cache = (self.k_cache[layer], self.v_cache[layer])
        wrapper = self.decode if self.is_decode else self.prefill
        out = wrapper.run(q.contiguous(), cache)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
