// Attention straight from the paged KV pool (CPU), keys and values read in place through the block tables, so
// nothing is gathered into a padded batch first: decode (one new query token per sequence) and prefill (any number
// of new tokens per sequence, causal). Every query row gets the result a decode of its position gets, bit for bit,
// so a token's attention does not depend on how its sequence's prefill was split or batched.
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

struct PrefillAttentionArgs {
  const void* q;              // [rows, num_heads, head_dim]: the new tokens of all sequences, in order
  const void* k_cache;        // [num_slots, num_kv_heads, head_dim] (slot = block * block_size + offset)
  const void* v_cache;        // same layout as k_cache
  void* out;                  // [rows, num_heads, head_dim], dtype of q
  const int64_t* block_tables;  // [batch, table_width]
  const int64_t* q_starts;      // [batch + 1]: sequence b's rows are [q_starts[b], q_starts[b + 1])
  const int64_t* kv_lens;       // [batch] keys per sequence, its new tokens included (they are the last keys)
  int64_t batch, num_heads, num_kv_heads, head_dim, table_width, block_size;
  float scale;
  bool bf16;
  int num_threads;
};

// Query head i attends with KV head i / (num_heads / num_kv_heads), as Hugging Face's repeat_kv does.
void paged_decode_attention(const DecodeAttentionArgs& args);

// Row r of sequence b (its new token at position kv_lens[b] - (q_starts[b + 1] - r)) attends to keys
// [0, that position], exactly as paged_decode_attention does for one query with that many keys.
void paged_prefill_attention(const PrefillAttentionArgs& args);

// The AVX-512 kernel (paged_attention_avx512.cpp: 16-key tiles, online softmax, shared prefixes read once) on up
// to `workers` threads; false, having done nothing, where it does not apply (head size, block size, no x86-64).
bool paged_decode_attention_avx512(const DecodeAttentionArgs& args, int workers);

// The same with q.k from vdpbf16ps for bf16 caches (paged_attention_avx512_bf16.cpp); false for fp32 caches, other
// shapes, or a build without AVX512_BF16 support. Call it only where the CPU has AVX512_BF16.
bool paged_decode_attention_avx512_bf16(const DecodeAttentionArgs& args, int workers);

// The prefill counterparts of the two (the same tiles and fold per query row).
bool paged_prefill_attention_avx512(const PrefillAttentionArgs& args, int workers);
bool paged_prefill_attention_avx512_bf16(const PrefillAttentionArgs& args, int workers);

}  // namespace ettrl
