// Decode attention straight from the paged KV pool (CPU): one new query token per sequence, keys and values
// read in place through the block table, so nothing is gathered into a padded batch first.
#pragma once

#include <cstdint>

namespace ettrl {

struct DecodeAttentionArgs {
  const void* q;              // [batch, num_heads, head_dim]
  const void* k_cache;        // [num_slots, num_kv_heads, head_dim] (slot = block * block_size + offset)
  const void* v_cache;        // same layout as k_cache
  void* out;                  // [batch, num_heads, head_dim], dtype of q
  const int64_t* block_tables;  // [batch, table_width]
  const int64_t* kv_lens;       // [batch] keys per sequence, the new token's included
  int64_t batch, num_heads, num_kv_heads, head_dim, table_width, block_size;
  float scale;
  bool bf16;                  // all tensors bfloat16 (else float32)
  int num_threads;
};

// Query head i attends with KV head i / (num_heads / num_kv_heads), as Hugging Face's repeat_kv does.
void paged_decode_attention(const DecodeAttentionArgs& args);

// The AVX-512 kernel (paged_attention_avx512.cpp: 16-key tiles, online softmax, shared prefixes read once) on up
// to `workers` threads; false, having done nothing, where it does not apply (head size, block size, no x86-64).
bool paged_decode_attention_avx512(const DecodeAttentionArgs& args, int workers);

// The same with q.k from vdpbf16ps for bf16 caches (paged_attention_avx512_bf16.cpp); false for fp32 caches, other
// shapes, or a build without AVX512_BF16 support. Call it only where the CPU has AVX512_BF16.
bool paged_decode_attention_avx512_bf16(const DecodeAttentionArgs& args, int workers);

}  // namespace ettrl
