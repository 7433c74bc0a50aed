#include "paged_attention.h"

#include "bf16.h"
#include "cpu_features.h"
#include "fast_exp.h"
#include "parallel_ranges.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace ettrl {
namespace {

__attribute__((always_inline)) inline void softmax_in_place(float* p, int64_t len) {
  float m = p[0];
#pragma omp simd reduction(max : m)
  for (int64_t l = 0; l < len; ++l) m = std::max(m, p[l]);
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t l = 0; l < len; ++l) {
    p[l] = exp_fast(p[l] - m);
    total += p[l];
  }
  const float inv = 1.f / total;
#pragma omp simd
  for (int64_t l = 0; l < len; ++l) p[l] *= inv;
}

// Scratch of one worker: the scaled queries of a sequence, their scores over all its keys, the output sums.
struct Scratch {
  std::vector<float> q, scores, acc, row;
};

// One sequence, all heads: exact softmax(q k^T * scale) v. Each key (and value) row of all KV heads is read once,
// front to back, and converted to fp32 once; every query head of its group then uses it. D > 0 fixes the head
// size at compile time (the dot products then end in a short shuffle tree instead of a scalar loop).
// One query row: its query [heads, d], the block table and number of keys it sees, where its output goes.
struct QueryRow {
  int64_t q;  // row index into q and out
  const int64_t* table;
  int64_t len;
};

template <typename T, int64_t D, typename Args>
__attribute__((always_inline)) inline void attend(const Args& a, const QueryRow& r, Scratch& s) {
  const int64_t heads = a.num_heads, group = a.num_heads / a.num_kv_heads, len = r.len;
  const int64_t d = D > 0 ? D : a.head_dim;
  const int64_t row = a.num_kv_heads * d;  // elements of one slot
  const T* q = static_cast<const T*>(a.q) + r.q * heads * d;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const int64_t* table = r.table;
  s.scores.resize(heads * len);
  for (int64_t j = 0; j < heads * d; ++j) s.q[j] = load(q, j) * a.scale;
  float* rf = s.row.data();

  for (int64_t l0 = 0; l0 < len; l0 += a.block_size) {  // block by block: no division per key
    const T* k = kc + table[l0 / a.block_size] * a.block_size * row;
    for (int64_t l = l0; l < std::min(len, l0 + a.block_size); ++l, k += row) {
#pragma omp simd
      for (int64_t e = 0; e < row; ++e) rf[e] = load(k, e);
      for (int64_t i = 0; i < heads; ++i) {
        const float* qi = s.q.data() + i * d;
        const float* ki = rf + (i / group) * d;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t e = 0; e < d; ++e) dot += qi[e] * ki[e];
        s.scores[i * len + l] = dot;
      }
    }
  }
  for (int64_t i = 0; i < heads; ++i) softmax_in_place(s.scores.data() + i * len, len);

  std::fill(s.acc.begin(), s.acc.end(), 0.f);
  for (int64_t l0 = 0; l0 < len; l0 += a.block_size) {
    const T* v = vc + table[l0 / a.block_size] * a.block_size * row;
    for (int64_t l = l0; l < std::min(len, l0 + a.block_size); ++l, v += row) {
#pragma omp simd
      for (int64_t e = 0; e < row; ++e) rf[e] = load(v, e);
      for (int64_t i = 0; i < heads; ++i) {
        const float p = s.scores[i * len + l];
        const float* vi = rf + (i / group) * d;
        float* acc = s.acc.data() + i * d;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) acc[e] += p * vi[e];
      }
    }
  }
  T* out = static_cast<T*>(a.out) + r.q * heads * d;
  for (int64_t j = 0; j < heads * d; ++j) store(out, j, s.acc[j]);
}

// Row b of a decode step is sequence b; row r of a prefill step belongs to the sequence whose rows hold it.
inline QueryRow query_row(const DecodeAttentionArgs& a, int64_t b) {
  return {b, a.block_tables + b * a.table_width, a.kv_lens[b]};
}
inline QueryRow query_row(const PrefillAttentionArgs& a, int64_t r) {
  const int64_t b = std::upper_bound(a.q_starts, a.q_starts + a.batch + 1, r) - a.q_starts - 1;
  return {r, a.block_tables + b * a.table_width, a.kv_lens[b] - (a.q_starts[b + 1] - r) + 1};
}

template <typename T, typename Args>
__attribute__((always_inline)) inline void attend_range(const Args& a, int64_t begin, int64_t end) {
  Scratch s;
  s.q.resize(a.num_heads * a.head_dim);
  s.acc.resize(a.num_heads * a.head_dim);
  s.row.resize(a.num_kv_heads * a.head_dim);
  switch (a.head_dim) {  // the head sizes of Llama, Qwen2/2.5 and Qwen3 models, then any other
    case 64:
      for (int64_t b = begin; b < end; ++b) attend<T, 64>(a, query_row(a, b), s);
      break;
    case 128:
      for (int64_t b = begin; b < end; ++b) attend<T, 128>(a, query_row(a, b), s);
      break;
    default:
      for (int64_t b = begin; b < end; ++b) attend<T, 0>(a, query_row(a, b), s);
  }
}

// The same loops compiled for two instruction sets; the widest the CPU has is picked at run time.
#define ETTRL_RANGE_FN(name, target_attr)                                                        \
  template <typename Args>                                                                       \
  target_attr void name(const Args& a, int64_t begin, int64_t end) {                             \
    if (a.bf16)                                                                                  \
      attend_range<uint16_t>(a, begin, end);                                                     \
    else                                                                                         \
      attend_range<float>(a, begin, end);                                                        \
  }
#if defined(__x86_64__) || defined(__i386__)
ETTRL_RANGE_FN(range_avx2, __attribute__((target("avx2,fma"))))
#endif
ETTRL_RANGE_FN(range_default, )
#undef ETTRL_RANGE_FN

constexpr int64_t kElementsPerThread = 1 << 19;

template <typename Args>
using RangeFn = void (*)(const Args&, int64_t, int64_t);

template <typename Args>
RangeFn<Args> pick_range_fn() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return range_avx2<Args>;
#endif
  return range_default<Args>;
}

bool avx512_allowed() { return !env_flag("ETTRL_NO_AVX512") && has_avx512(); }

bool avx512_bf16_allowed() { return avx512_allowed() && !env_flag("ETTRL_NO_AVX512_BF16") && has_avx512_bf16(); }

}  // namespace

void paged_decode_attention(const DecodeAttentionArgs& a) {
  if (a.batch < 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads || a.head_dim <= 0 || a.block_size <= 0)
    throw std::invalid_argument("paged_decode_attention: bad shapes (num_heads must be a multiple of num_kv_heads)");
  for (int64_t b = 0; b < a.batch; ++b)
    if (a.kv_lens[b] < 1 || a.kv_lens[b] > a.table_width * a.block_size)
      throw std::invalid_argument("paged_decode_attention: kv_len outside [1, table_width * block_size]");
  int64_t keys = 0;
  for (int64_t b = 0; b < a.batch; ++b) keys += a.kv_lens[b];
  // waking a second thread costs microseconds: only worth it with enough keys to share out
  const int64_t useful = 1 + keys * a.num_kv_heads * a.head_dim / kElementsPerThread;
  const int workers = static_cast<int>(std::min<int64_t>(a.num_threads, useful));
  static const bool avx512 = avx512_allowed(), avx512_bf16 = avx512_bf16_allowed();
  if (avx512_bf16 && paged_decode_attention_avx512_bf16(a, workers)) return;
  if (avx512 && paged_decode_attention_avx512(a, workers)) return;
  static const RangeFn<DecodeAttentionArgs> range = pick_range_fn<DecodeAttentionArgs>();
  parallel_ranges(a.batch, workers, [&](int64_t b, int64_t e) { range(a, b, e); });
}

void paged_prefill_attention(const PrefillAttentionArgs& a) {
  if (a.batch < 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads || a.head_dim <= 0 || a.block_size <= 0 ||
      a.q_starts[0] != 0)
    throw std::invalid_argument("paged_prefill_attention: bad shapes (num_heads must be a multiple of num_kv_heads)");
  int64_t work = 0;  // query-key pairs, about
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t rows = a.q_starts[b + 1] - a.q_starts[b];
    if (rows < 1 || rows > a.kv_lens[b] || a.kv_lens[b] > a.table_width * a.block_size)
      throw std::invalid_argument("paged_prefill_attention: need 1 <= rows <= kv_len <= table_width * block_size");
    work += rows * (a.kv_lens[b] - rows / 2);
  }
  const int64_t useful = 1 + work * a.num_kv_heads * a.head_dim / kElementsPerThread;
  const int workers = static_cast<int>(std::min<int64_t>(a.num_threads, useful));
  static const bool avx512 = avx512_allowed(), avx512_bf16 = avx512_bf16_allowed();
  if (avx512_bf16 && paged_prefill_attention_avx512_bf16(a, workers)) return;
  if (avx512 && paged_prefill_attention_avx512(a, workers)) return;
  static const RangeFn<PrefillAttentionArgs> range = pick_range_fn<PrefillAttentionArgs>();
  parallel_ranges(a.q_starts[a.batch], workers, [&](int64_t b, int64_t e) { range(a, b, e); });
}

}  // namespace ettrl
