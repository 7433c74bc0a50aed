// The AVX-512 decode attention for bf16 caches on CPUs with AVX512_BF16 (Zen 4, Cooper Lake, Sapphire Rapids
// and later): the tiles of decode_attention_tiles.h with q.k from vdpbf16ps on the bf16 query and key rows as
// stored, so keys are never converted to fp32 (values still are: p.v stays an fp32 FMA). The dot products differ
// from the fp32 path in rounding only (each vdpbf16ps adds two exact bf16 products per lane, then the scale);
// a sequence's output stays the same alone or in any batch, as on the fp32 path.
#include "paged_attention.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 10 || defined(__clang__))
#define ETTRL_TILE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#define ETTRL_TILE_DOT_BF16 1
#include "decode_attention_tiles.h"

namespace ettrl {
bool paged_decode_attention_avx512_bf16(const DecodeAttentionArgs& a, int workers) {
  return decode_tiles<true>(a, workers);
}
bool paged_prefill_attention_avx512_bf16(const PrefillAttentionArgs& a, int workers) {
  return prefill_tiles<true>(a, workers);
}
}  // namespace ettrl

#else

namespace ettrl {
bool paged_decode_attention_avx512_bf16(const DecodeAttentionArgs&, int) { return false; }
bool paged_prefill_attention_avx512_bf16(const PrefillAttentionArgs&, int) { return false; }
}  // namespace ettrl

#endif
