#include "paged_attention.h"

#include "bf16.h"
#include "fast_exp.h"
#include "parallel_ranges.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12 flags its own intrinsics headers (the undefined-vector idiom) under -Wall
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

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
template <typename T, int64_t D>
__attribute__((always_inline)) inline void attend(const DecodeAttentionArgs& a, int64_t b, Scratch& s) {
  const int64_t heads = a.num_heads, group = a.num_heads / a.num_kv_heads, len = a.kv_lens[b];
  const int64_t d = D > 0 ? D : a.head_dim;
  const int64_t row = a.num_kv_heads * d;  // elements of one slot
  const T* q = static_cast<const T*>(a.q) + b * heads * d;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const int64_t* table = a.block_tables + b * a.table_width;
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
  T* out = static_cast<T*>(a.out) + b * heads * d;
  for (int64_t j = 0; j < heads * d; ++j) store(out, j, s.acc[j]);
}

template <typename T>
__attribute__((always_inline)) inline void attend_range(const DecodeAttentionArgs& a, int64_t begin, int64_t end) {
  Scratch s;
  s.q.resize(a.num_heads * a.head_dim);
  s.acc.resize(a.num_heads * a.head_dim);
  s.row.resize(a.num_kv_heads * a.head_dim);
  switch (a.head_dim) {  // the head sizes of Llama, Qwen2/2.5 and Qwen3 models, then any other
    case 64:
      for (int64_t b = begin; b < end; ++b) attend<T, 64>(a, b, s);
      break;
    case 128:
      for (int64_t b = begin; b < end; ++b) attend<T, 128>(a, b, s);
      break;
    default:
      for (int64_t b = begin; b < end; ++b) attend<T, 0>(a, b, s);
  }
}

// The same loops compiled for three instruction sets; the widest the CPU has is picked at run time.
#define ETTRL_RANGE_FN(name, target_attr)                                                        \
  target_attr void name(const DecodeAttentionArgs& a, int64_t begin, int64_t end) {              \
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

#if defined(__x86_64__)
#define ETTRL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

ETTRL_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
ETTRL_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Lane l of the result is the sum of the 16 lanes of v[l]: 45 shuffles and adds for 16 dot products instead of a
// 4-level reduction each (the per-key horizontal sums that bound the portable kernel).
ETTRL_AVX512 inline __m512 sum_lanes_16(const __m512* v) {
  __m512 s[8], t[4], u[2];
  for (int i = 0; i < 8; ++i)  // 512 -> 2 x 128 bits: chunks (c0 + c2, c1 + c3) of v[i] and of v[i + 8]
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // one 128-bit chunk (4 partial sums) each of v[i], v[i + 8], v[i + 4], v[i + 12]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[i], s[i + 4], 0x88), _mm512_shuffle_f32x4(s[i], s[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(t[i], t[i + 2]), _mm512_unpackhi_ps(t[i], t[i + 2]));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, w);
}

// Keys (or values) 0 .. len - 1 of KV head g as fp32 rows of D in `rows`, zero rows up to a multiple of 16.
template <typename T, int64_t D>
ETTRL_AVX512 inline void load_head(const T* cache, const int64_t* table, int64_t block_shift, int64_t row, int64_t g,
                                   int64_t len, float* rows) {
  const int64_t mask = (int64_t{1} << block_shift) - 1;
  for (int64_t key = 0; key < len; ++key) {
    const int64_t slot = (table[key >> block_shift] << block_shift) | (key & mask);
    const T* src = cache + slot * row + g * D;
    for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(rows + key * D + c, load16(src + c));
  }
  for (int64_t key = len; key % 16; ++key)
    for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(rows + key * D + c, _mm512_setzero_ps());
}

// attend() for D in {64, 128} with AVX-512: KV head by KV head, its keys and values converted to fp32 once and
// used by every query head of the group; the scores of 16 keys come out of one sum_lanes_16, and each head's
// output accumulates in registers.
template <typename T, int64_t D>
ETTRL_AVX512 void attend_avx512(const DecodeAttentionArgs& a, int64_t b, Scratch& s) {
  constexpr int64_t C = D / 16;
  const int64_t heads = a.num_heads, group = a.num_heads / a.num_kv_heads, len = a.kv_lens[b];
  const int64_t row = a.num_kv_heads * D, padded = (len + 15) / 16 * 16;
  const int64_t block_shift = __builtin_ctzll(static_cast<uint64_t>(a.block_size));
  const T* q = static_cast<const T*>(a.q) + b * heads * D;
  T* out = static_cast<T*>(a.out) + b * heads * D;
  const int64_t* table = a.block_tables + b * a.table_width;
  s.scores.resize(group * padded);  // the scores of one KV head's query heads
  s.row.resize(padded * D);
  float* rows = s.row.data();
  for (int64_t j = 0; j < heads * D; ++j) s.q[j] = load(q, j) * a.scale;

  for (int64_t g = 0; g < a.num_kv_heads; ++g) {
    load_head<T, D>(static_cast<const T*>(a.k_cache), table, block_shift, row, g, len, rows);
    for (int64_t i = g * group; i < (g + 1) * group; ++i) {
      __m512 qv[C], acc[16];
      for (int64_t c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(s.q.data() + i * D + 16 * c);
      float* p = s.scores.data() + (i - g * group) * padded;
      for (int64_t k0 = 0; k0 < len; k0 += 16) {
        const float* tile = rows + k0 * D;
        for (int64_t l = 0; l < 16; ++l) {
          acc[l] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(tile + l * D));
          for (int64_t c = 1; c < C; ++c) acc[l] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(tile + l * D + 16 * c), acc[l]);
        }
        _mm512_storeu_ps(p + k0, sum_lanes_16(acc));
      }
      softmax_in_place(p, len);
    }
    load_head<T, D>(static_cast<const T*>(a.v_cache), table, block_shift, row, g, len, rows);
    for (int64_t i = g * group; i < (g + 1) * group; ++i) {
      const float* p = s.scores.data() + (i - g * group) * padded;
      __m512 acc[C];
      for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t l = 0; l < len; ++l) {
        const __m512 pl = _mm512_set1_ps(p[l]);
        for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(pl, _mm512_loadu_ps(rows + l * D + 16 * c), acc[c]);
      }
      float buf[D];
      for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(buf + 16 * c, acc[c]);
      for (int64_t j = 0; j < D; ++j) store(out + i * D, j, buf[j]);
    }
  }
}

ETTRL_AVX512 void range_avx512(const DecodeAttentionArgs& a, int64_t begin, int64_t end) {
  const bool specialised = (a.head_dim == 64 || a.head_dim == 128) && (a.block_size & (a.block_size - 1)) == 0;
  if (!specialised) return a.bf16 ? attend_range<uint16_t>(a, begin, end) : attend_range<float>(a, begin, end);
  Scratch s;
  s.q.resize(a.num_heads * a.head_dim);
  for (int64_t b = begin; b < end; ++b) {
    if (a.head_dim == 64)
      a.bf16 ? attend_avx512<uint16_t, 64>(a, b, s) : attend_avx512<float, 64>(a, b, s);
    else
      a.bf16 ? attend_avx512<uint16_t, 128>(a, b, s) : attend_avx512<float, 128>(a, b, s);
  }
}
#undef ETTRL_AVX512
#endif

constexpr int64_t kElementsPerThread = 1 << 19;

using RangeFn = void (*)(const DecodeAttentionArgs&, int64_t, int64_t);

RangeFn pick_range_fn() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(__x86_64__)
  const char* no_avx512 = std::getenv("ETTRL_NO_AVX512");  // tests of the portable kernel on an AVX-512 machine
  const bool allowed = no_avx512 == nullptr || *no_avx512 == '\0' || *no_avx512 == '0';
  if (allowed && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return range_avx512;
#endif
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return range_avx2;
#endif
  return range_default;
}

}  // namespace

void paged_decode_attention(const DecodeAttentionArgs& a) {
  if (a.batch < 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads || a.head_dim <= 0 || a.block_size <= 0)
    throw std::invalid_argument("paged_decode_attention: bad shapes (num_heads must be a multiple of num_kv_heads)");
  for (int64_t b = 0; b < a.batch; ++b)
    if (a.kv_lens[b] < 1 || a.kv_lens[b] > a.table_width * a.block_size)
      throw std::invalid_argument("paged_decode_attention: kv_len outside [1, table_width * block_size]");
  static const RangeFn range = pick_range_fn();
  const int64_t tasks = a.batch;
  int64_t keys = 0;
  for (int64_t b = 0; b < a.batch; ++b) keys += a.kv_lens[b];
  // waking a second thread costs microseconds: only worth it with enough keys to share out
  const int64_t useful = 1 + keys * a.num_kv_heads * a.head_dim / kElementsPerThread;
  parallel_ranges(tasks, std::min<int64_t>(a.num_threads, useful), [&](int64_t b, int64_t e) { range(a, b, e); });
}

}  // namespace ettrl
