// Decode attention with AVX-512: 16-key tiles, online softmax, and one pass over a prefix that several
// sequences share (cascade attention).
//
// Every sequence's result is a left fold of tile_update() over its key tiles 0, 16, 32, ... from the empty state.
// Sequences whose block tables start with the same physical blocks (the n samples of one prompt, the branches of
// a tree) read the same keys there, so the fold over those shared tiles runs once per group: each tile is loaded
// and converted to fp32 once and updates every member's state (phase 1); then each sequence continues the fold over
// its own tiles (phase 2). The operations a sequence sees are the same whether or not it is grouped, so the
// output does not depend on what else is in the batch, bit for bit.
//
// A tile's keys and values (16 slots of all KV heads, read front to back) stay in L1 while every query head uses
// them; a sequence's own blocks come cold from memory, so they are prefetched two tiles ahead. It replaced a
// two-pass kernel (each head's keys converted whole, then softmax, then values; paged_attention.cpp keeps that
// form for CPUs without AVX-512) and is faster (docs/benchmarks.md).
//
// The tile code lives in decode_attention_tiles.h, compiled here for AVX-512 F/BW/VL/DQ and again in
// paged_attention_avx512_bf16.cpp, where bf16 keys are not converted at all: q.k comes from vdpbf16ps on the rows.
#include "paged_attention.h"

#if defined(__x86_64__)
#define ETTRL_TILE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define ETTRL_TILE_DOT_BF16 0
#include "decode_attention_tiles.h"

namespace ettrl {
bool paged_decode_attention_avx512(const DecodeAttentionArgs& a, int workers) {
  return decode_tiles<false>(a, workers);
}
bool paged_prefill_attention_avx512(const PrefillAttentionArgs& a, int workers) {
  return prefill_tiles<false>(a, workers);
}
}  // namespace ettrl

#else

namespace ettrl {
bool paged_decode_attention_avx512(const DecodeAttentionArgs&, int) { return false; }
bool paged_prefill_attention_avx512(const PrefillAttentionArgs&, int) { return false; }
}  // namespace ettrl

#endif
