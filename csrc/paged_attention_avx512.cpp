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
// them; a sequence's own blocks come cold from memory, so they are prefetched two tiles ahead. Against the
// two-pass kernel before it (each head's keys converted whole, then softmax, then values; paged_attention.cpp
// keeps that form for CPUs without AVX-512): SmolLM2-135M bf16, 64 samples x 128 tokens of one 78-token prompt,
// attention 24.8 -> 18.1 ms a decode step (2 cores, medians of 3 alternating runs).
#include "paged_attention.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "bf16.h"
#include "fast_exp.h"
#include "parallel_ranges.h"

// GCC 12 flags its own intrinsics headers (the undefined-vector idiom of the _mm512_reduce_* helpers) under -Wall
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define ETTRL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

namespace ettrl {
namespace {

constexpr int64_t kTile = 16;            // keys per tile: one sum_lanes_16
constexpr int64_t kMembersPerTask = 8;   // phase 1 splits a large group into tasks of this many sequences
constexpr int64_t kPrefetchTiles = 2;    // phase 2 asks for a sequence's keys this many tiles ahead

ETTRL_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
ETTRL_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Lane l of the result is the sum of the 16 lanes of v[l]: 45 shuffles and adds for 16 dot products instead of a
// 4-level reduction each.
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

struct Shape {
  int64_t shift, row, kv_heads, group;  // log2(block_size), elements of one slot, KV heads, query heads per KV head
};

// Keys (or values) [k0, k0 + 16) of all KV heads as fp32 tiles [kv_heads][16][D], one slot row after the other
// (sequential reads); rows at or past len are zero (their slots may belong to other sequences or hold garbage).
template <typename T, int64_t D>
ETTRL_AVX512 inline void load_tile(const T* cache, const int64_t* table, const Shape& sh, int64_t k0, int64_t len,
                                   float* tiles) {
  const int64_t mask = (int64_t{1} << sh.shift) - 1, valid = std::min(kTile, len - k0);
  for (int64_t l = 0; l < valid; ++l) {
    const int64_t key = k0 + l;
    const T* src = cache + ((table[key >> sh.shift] << sh.shift) | (key & mask)) * sh.row;
    for (int64_t g = 0; g < sh.kv_heads; ++g)
      for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(tiles + (g * kTile + l) * D + c, load16(src + g * D + c));
  }
  for (int64_t g = 0; g < sh.kv_heads; ++g)
    for (int64_t l = valid; l < kTile; ++l)
      for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(tiles + (g * kTile + l) * D + c, _mm512_setzero_ps());
}

// Asks for the slots of keys [k0, k0 + 16) ahead of use: a sequence's own blocks come cold from memory, and
// the loads of load_tile otherwise wait on them one row at a time.
template <typename T>
ETTRL_AVX512 inline void prefetch_tile(const DecodeAttentionArgs& a, const int64_t* table, const Shape& sh,
                                       int64_t k0, int64_t len) {
  const int64_t mask = (int64_t{1} << sh.shift) - 1, bytes = sh.row * static_cast<int64_t>(sizeof(T));
  for (int64_t key = k0; key < std::min(len, k0 + kTile); ++key) {
    const int64_t offset = ((table[key >> sh.shift] << sh.shift) | (key & mask)) * bytes;
    for (int64_t b = 0; b < bytes; b += 64) {
      _mm_prefetch(static_cast<const char*>(a.k_cache) + offset + b, _MM_HINT_T0);
      _mm_prefetch(static_cast<const char*>(a.v_cache) + offset + b, _MM_HINT_T0);
    }
  }
}

// The online-softmax state of one query head, D + 2 floats: o[D] = sum of exp(score - m) * value, then m (the
// running maximum score) and s (the sum of exp(score - m)).
template <int64_t D>
constexpr int64_t kState = D + 2;

template <int64_t D>
inline void reset_state(float* st) {
  std::fill(st, st + D, 0.f);
  st[D] = -INFINITY;
  st[D + 1] = 0.f;
}

// One query head (q already scaled) over one tile of `valid` keys: the step of the fold.
template <int64_t D>
ETTRL_AVX512 inline void tile_update(const float* q, const float* keys, const float* values, int64_t valid,
                                     float* st) {
  constexpr int64_t C = D / 16;
  __m512 qv[C], acc[kTile];
  for (int64_t c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int64_t l = 0; l < kTile; ++l) {
    acc[l] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(keys + l * D));
    for (int64_t c = 1; c < C; ++c) acc[l] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(keys + l * D + 16 * c), acc[l]);
  }
  const __mmask16 live = static_cast<__mmask16>(valid >= kTile ? 0xFFFF : (1u << valid) - 1);
  const __m512 scores = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, sum_lanes_16(acc));
  const float m_old = st[D], m_new = std::max(m_old, _mm512_reduce_max_ps(scores));
  const float corr = exp_fast(m_old - m_new);  // ~1e-38 from an empty state, whose o and s are 0
  alignas(64) float p[kTile];
  _mm512_store_ps(p, _mm512_sub_ps(scores, _mm512_set1_ps(m_new)));
#pragma omp simd
  for (int64_t l = 0; l < kTile; ++l) p[l] = exp_fast(p[l]);
  const __m512 pv = _mm512_maskz_mov_ps(live, _mm512_load_ps(p));
  st[D + 1] = st[D + 1] * corr + _mm512_reduce_add_ps(pv);
  __m512 o[C];
  for (int64_t c = 0; c < C; ++c) o[c] = _mm512_mul_ps(_mm512_loadu_ps(st + 16 * c), _mm512_set1_ps(corr));
  for (int64_t l = 0; l < valid; ++l) {
    const __m512 pl = _mm512_set1_ps(p[l]);
    for (int64_t c = 0; c < C; ++c) o[c] = _mm512_fmadd_ps(pl, _mm512_loadu_ps(values + l * D + 16 * c), o[c]);
  }
  for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(st + 16 * c, o[c]);
  st[D] = m_new;
}

template <typename T, int64_t D>
inline void scaled_query(const DecodeAttentionArgs& a, int64_t b, int64_t head, float* q) {
  const T* src = static_cast<const T*>(a.q) + (b * a.num_heads + head) * D;
  for (int64_t j = 0; j < D; ++j) q[j] = load(src, j) * a.scale;
}

// Sequences that share leading KV blocks: members (indices into the batch) and the keys [0, shared) they share.
struct PrefixGroup {
  std::vector<int64_t> members;
  int64_t shared;
};

// Groups of at least two sequences whose tables agree on the first blocks; shared is a whole number of tiles
// that every member holds (a table's padding past its own blocks never counts as shared).
std::vector<PrefixGroup> prefix_groups(const DecodeAttentionArgs& a) {
  std::vector<int64_t> order(a.batch);
  std::iota(order.begin(), order.end(), 0);
  const auto table = [&](int64_t b) { return a.block_tables + b * a.table_width; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return table(x)[0] < table(y)[0]; });
  std::vector<PrefixGroup> groups;
  for (int64_t i = 0, j; i < a.batch; i = j) {
    const int64_t* first = table(order[i]);
    int64_t blocks = a.table_width, keys = a.kv_lens[order[i]];
    for (j = i; j < a.batch && table(order[j])[0] == first[0]; ++j) {
      const int64_t b = order[j];
      blocks = std::min(blocks, (a.kv_lens[b] + a.block_size - 1) / a.block_size);
      int64_t same = 0;
      while (same < blocks && table(b)[same] == first[same]) ++same;
      blocks = same;
      keys = std::min(keys, a.kv_lens[b]);
    }
    const int64_t shared = std::min(blocks * a.block_size, keys) / kTile * kTile;
    if (j - i >= 2 && shared > 0) groups.push_back({std::vector<int64_t>(order.begin() + i, order.begin() + j), shared});
  }
  return groups;
}

// Thread-local scratch, reused across calls: decode runs once per layer and step.
std::vector<float>& scratch(int which, size_t size) {
  thread_local std::vector<float> buffers[4];
  if (buffers[which].size() < size) buffers[which].resize(size);
  return buffers[which];
}

// Phase 1: the shared tiles of one group for its members [begin, end).
template <typename T, int64_t D>
ETTRL_AVX512 void fold_shared(const DecodeAttentionArgs& a, const Shape& sh, const PrefixGroup& grp, int64_t begin,
                              int64_t end, float* states) {
  const int64_t n = end - begin, tile = sh.kv_heads * kTile * D;
  float* q = scratch(0, n * a.num_heads * D).data();
  float* keys = scratch(1, tile).data();
  float* values = scratch(2, tile).data();
  for (int64_t m = 0; m < n; ++m)
    for (int64_t i = 0; i < a.num_heads; ++i) scaled_query<T, D>(a, grp.members[begin + m], i, q + (m * a.num_heads + i) * D);
  const int64_t* table = a.block_tables + grp.members[begin] * a.table_width;
  for (int64_t k0 = 0; k0 < grp.shared; k0 += kTile) {
    load_tile<T, D>(static_cast<const T*>(a.k_cache), table, sh, k0, grp.shared, keys);
    load_tile<T, D>(static_cast<const T*>(a.v_cache), table, sh, k0, grp.shared, values);
    for (int64_t m = 0; m < n; ++m) {
      float* st = states + grp.members[begin + m] * a.num_heads * kState<D>;
      for (int64_t i = 0; i < a.num_heads; ++i) {
        const int64_t g = i / sh.group;
        tile_update<D>(q + (m * a.num_heads + i) * D, keys + g * kTile * D, values + g * kTile * D, kTile,
                       st + i * kState<D>);
      }
    }
  }
}

// Phase 2: sequence b's tiles from key `from` on, then its output.
template <typename T, int64_t D>
ETTRL_AVX512 void fold_own(const DecodeAttentionArgs& a, const Shape& sh, int64_t b, int64_t from, float* states) {
  const int64_t len = a.kv_lens[b], tile = sh.kv_heads * kTile * D;
  const int64_t* table = a.block_tables + b * a.table_width;
  float* q = scratch(0, a.num_heads * D).data();
  float* keys = scratch(1, tile).data();
  float* values = scratch(2, tile).data();
  float* st = states + b * a.num_heads * kState<D>;
  for (int64_t i = 0; i < a.num_heads; ++i) scaled_query<T, D>(a, b, i, q + i * D);
  for (int64_t k0 = from; k0 < len; k0 += kTile) {
    prefetch_tile<T>(a, table, sh, k0 + kPrefetchTiles * kTile, len);
    load_tile<T, D>(static_cast<const T*>(a.k_cache), table, sh, k0, len, keys);
    load_tile<T, D>(static_cast<const T*>(a.v_cache), table, sh, k0, len, values);
    for (int64_t i = 0; i < a.num_heads; ++i) {
      const int64_t g = i / sh.group;
      tile_update<D>(q + i * D, keys + g * kTile * D, values + g * kTile * D, std::min(kTile, len - k0),
                     st + i * kState<D>);
    }
  }
  T* out = static_cast<T*>(a.out) + b * a.num_heads * D;
  for (int64_t i = 0; i < a.num_heads; ++i) {
    const float* h = st + i * kState<D>;
    const float inv = 1.f / h[D + 1];
    for (int64_t j = 0; j < D; ++j) store(out + i * D, j, h[j] * inv);
  }
}

template <typename T, int64_t D>
ETTRL_AVX512 void decode(const DecodeAttentionArgs& a, int workers) {
  const Shape sh{__builtin_ctzll(static_cast<uint64_t>(a.block_size)), a.num_kv_heads * D, a.num_kv_heads,
                 a.num_heads / a.num_kv_heads};
  float* states = scratch(3, a.batch * a.num_heads * kState<D>).data();
  for (int64_t s = 0; s < a.batch * a.num_heads; ++s) reset_state<D>(states + s * kState<D>);
  std::vector<int64_t> from(a.batch, 0);
  const std::vector<PrefixGroup> groups = prefix_groups(a);
  struct Task {
    const PrefixGroup* group;
    int64_t begin, end;
  };
  std::vector<Task> tasks;
  for (const PrefixGroup& grp : groups) {
    const int64_t n = static_cast<int64_t>(grp.members.size());
    for (int64_t m : grp.members) from[m] = grp.shared;
    for (int64_t c = 0; c < n; c += kMembersPerTask) tasks.push_back({&grp, c, std::min(n, c + kMembersPerTask)});
  }
  parallel_ranges(static_cast<int64_t>(tasks.size()), workers, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fold_shared<T, D>(a, sh, *tasks[t].group, tasks[t].begin, tasks[t].end, states);
  });
  parallel_ranges(a.batch, workers, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fold_own<T, D>(a, sh, b, from[b], states);
  });
}

}  // namespace

bool paged_decode_attention_avx512(const DecodeAttentionArgs& a, int workers) {
  const bool pow2_blocks = (a.block_size & (a.block_size - 1)) == 0;
  if (!pow2_blocks || (a.head_dim != 64 && a.head_dim != 128)) return false;
  if (a.head_dim == 64)
    a.bf16 ? decode<uint16_t, 64>(a, workers) : decode<float, 64>(a, workers);
  else
    a.bf16 ? decode<uint16_t, 128>(a, workers) : decode<float, 128>(a, workers);
  return true;
}

}  // namespace ettrl

#else

namespace ettrl {
bool paged_decode_attention_avx512(const DecodeAttentionArgs&, int) { return false; }
}  // namespace ettrl

#endif
