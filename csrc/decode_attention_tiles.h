// The tile fold of the AVX-512 decode attention (the design: paged_attention_avx512.cpp), compiled twice:
// paged_attention_avx512.cpp (AVX-512 F/BW/VL/DQ) and paged_attention_avx512_bf16.cpp (plus AVX512_BF16, which
// computes bf16 q.k with vdpbf16ps straight from the cache rows instead of converting every key to fp32 first).
// The including file defines ETTRL_TILE_TARGET (a target attribute) and ETTRL_TILE_DOT_BF16 (0 or 1) before it.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "fast_exp.h"
#include "paged_attention.h"
#include "parallel_ranges.h"
#include "sum_lanes.h"

namespace ettrl {
namespace {

constexpr int64_t kTile = 16;            // keys per tile: one sum_lanes_16
constexpr int64_t kMembersPerTask = 8;   // phase 1 splits a group into tasks of at most this many sequences
constexpr int64_t kPrefetchTiles = 2;    // phase 2 asks for a sequence's keys this many tiles ahead

// bf16 queries and keys meet in vdpbf16ps (this build has AVX512_BF16); fp32 caches always take the FMA path.
template <typename T>
constexpr bool kDotBf16 = ETTRL_TILE_DOT_BF16 && std::is_same_v<T, uint16_t>;

ETTRL_TILE_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
ETTRL_TILE_TARGET inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

struct Shape {
  int64_t shift, row, kv_heads, group;  // log2(block_size), elements of one slot, KV heads, query heads per KV head
};

inline int64_t slot_of(const int64_t* table, const Shape& sh, int64_t key) {
  return (table[key >> sh.shift] << sh.shift) | (key & ((int64_t{1} << sh.shift) - 1));
}

// Keys (or values) [k0, k0 + 16) of all KV heads as fp32 tiles [kv_heads][16][D], one slot row after the other
// (sequential reads); rows at or past len are zero (their slots may belong to other sequences or hold garbage).
template <typename T, int64_t D>
ETTRL_TILE_TARGET inline void load_tile(const T* cache, const int64_t* table, const Shape& sh, int64_t k0,
                                        int64_t len, float* tiles) {
  const int64_t valid = std::min(kTile, len - k0);
  for (int64_t l = 0; l < valid; ++l) {
    const T* src = cache + slot_of(table, sh, k0 + l) * sh.row;
    for (int64_t g = 0; g < sh.kv_heads; ++g)
      for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(tiles + (g * kTile + l) * D + c, load16(src + g * D + c));
  }
  for (int64_t g = 0; g < sh.kv_heads; ++g)
    for (int64_t l = valid; l < kTile; ++l)
      for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(tiles + (g * kTile + l) * D + c, _mm512_setzero_ps());
}

// The cache rows of keys [k0, k0 + 16), read in place by the vdpbf16ps path; rows past len repeat the first
// (their scores are masked out, and the address stays inside the pool).
template <typename T>
inline void key_rows(const T* cache, const int64_t* table, const Shape& sh, int64_t k0, int64_t len,
                     const T** rows) {
  const int64_t valid = std::min(kTile, len - k0);
  for (int64_t l = 0; l < valid; ++l) rows[l] = cache + slot_of(table, sh, k0 + l) * sh.row;
  for (int64_t l = valid; l < kTile; ++l) rows[l] = rows[0];
}

// Asks for the slots of keys [k0, k0 + 16) ahead of use: a sequence's own blocks come cold from memory, and
// the loads of load_tile otherwise wait on them one row at a time.
template <typename T, typename Args>
ETTRL_TILE_TARGET inline void prefetch_tile(const Args& a, const int64_t* table, const Shape& sh,
                                            int64_t k0, int64_t len) {
  const int64_t bytes = sh.row * static_cast<int64_t>(sizeof(T));
  for (int64_t key = k0; key < std::min(len, k0 + kTile); ++key) {
    const int64_t offset = slot_of(table, sh, key) * bytes;
    for (int64_t b = 0; b < bytes; b += 64) {
      _mm_prefetch(static_cast<const char*>(a.k_cache) + offset + b, _MM_HINT_T0);
      _mm_prefetch(static_cast<const char*>(a.v_cache) + offset + b, _MM_HINT_T0);
    }
  }
}

inline __mmask16 live_keys(int64_t valid) {
  return static_cast<__mmask16>(valid >= kTile ? 0xFFFF : (1u << valid) - 1);
}

// Scores of one query head (fp32, already scaled) over a tile of fp32 keys [16][D]; -inf where not live.
template <int64_t D>
ETTRL_TILE_TARGET inline __m512 tile_scores(const float* q, const float* keys, __mmask16 live) {
  constexpr int64_t C = D / 16;
  __m512 qv[C], acc[kTile];
  for (int64_t c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int64_t l = 0; l < kTile; ++l) {
    acc[l] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(keys + l * D));
    for (int64_t c = 1; c < C; ++c) acc[l] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(keys + l * D + 16 * c), acc[l]);
  }
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, sum_lanes_16(acc));
}

#if ETTRL_TILE_DOT_BF16
#include "attention_bf16_tiles.h"
#endif

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

// One query head over one tile of `valid` keys, given its scores: the step of the fold.
template <int64_t D>
ETTRL_TILE_TARGET inline void tile_update(__m512 scores, const float* values, int64_t valid, float* st) {
  constexpr int64_t C = D / 16;
  const float m_old = st[D], m_new = std::max(m_old, _mm512_reduce_max_ps(scores));
  const float corr = exp_fast(m_old - m_new);  // ~1e-38 from an empty state, whose o and s are 0
  alignas(64) float p[kTile];
  _mm512_store_ps(p, _mm512_sub_ps(scores, _mm512_set1_ps(m_new)));
#pragma omp simd
  for (int64_t l = 0; l < kTile; ++l) p[l] = exp_fast(p[l]);
  const __m512 pv = _mm512_maskz_mov_ps(live_keys(valid), _mm512_load_ps(p));
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

// N query heads (of rows that see the whole tile) over one tile, each exactly as tile_update does it with valid = 16,
// with their operations interleaved so that N independent dependency chains fill the pipeline (the prefill's rows;
// a decode has too few of them to share a tile).
template <int64_t D, int N>
ETTRL_TILE_TARGET inline void tile_update_full(const __m512* scores, const float* values, float* const* st) {
  constexpr int64_t C = D / 16;
  float m_new[N], corr[N];
  alignas(64) float p[N][kTile];
  for (int k = 0; k < N; ++k) {
    const float m_old = st[k][D];
    m_new[k] = std::max(m_old, _mm512_reduce_max_ps(scores[k]));
    corr[k] = exp_fast(m_old - m_new[k]);
    _mm512_store_ps(p[k], _mm512_sub_ps(scores[k], _mm512_set1_ps(m_new[k])));
  }
  for (int k = 0; k < N; ++k) {
#pragma omp simd
    for (int64_t l = 0; l < kTile; ++l) p[k][l] = exp_fast(p[k][l]);
  }
  __m512 o[N][C];
  for (int k = 0; k < N; ++k) {
    const __m512 pv = _mm512_maskz_mov_ps(live_keys(kTile), _mm512_load_ps(p[k]));
    st[k][D + 1] = st[k][D + 1] * corr[k] + _mm512_reduce_add_ps(pv);
    for (int64_t c = 0; c < C; ++c) o[k][c] = _mm512_mul_ps(_mm512_loadu_ps(st[k] + 16 * c), _mm512_set1_ps(corr[k]));
  }
  for (int64_t l = 0; l < kTile; ++l)
    for (int k = 0; k < N; ++k) {
      const __m512 pl = _mm512_set1_ps(p[k][l]);
      for (int64_t c = 0; c < C; ++c) o[k][c] = _mm512_fmadd_ps(pl, _mm512_loadu_ps(values + l * D + 16 * c), o[k][c]);
    }
  for (int k = 0; k < N; ++k) {
    for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(st[k] + 16 * c, o[k][c]);
    st[k][D] = m_new[k];
  }
}

// Query row b (a sequence in a decode step, a new token in a prefill step) of head `head`, scaled, in fp32.
template <typename T, int64_t D, typename Args>
inline void scaled_query(const Args& a, int64_t b, int64_t head, float* q) {
  const T* src = static_cast<const T*>(a.q) + (b * a.num_heads + head) * D;
  for (int64_t j = 0; j < D; ++j) q[j] = load(src, j) * a.scale;
}

// The keys of one tile as tile_scores reads them: fp32 copies, or (vdpbf16ps) the bf16 rows in place.
template <typename T, int64_t D>
struct KeyTile {
  float* f32;
  const T* rows[kTile];

  ETTRL_TILE_TARGET void load(const T* cache, const int64_t* table, const Shape& sh, int64_t k0, int64_t len) {
    if constexpr (kDotBf16<T>)
      key_rows(cache, table, sh, k0, len, rows);
    else
      load_tile<T, D>(cache, table, sh, k0, len, f32);
  }
};

// One query head's state over one tile: tile_update, or the vdpbf16ps path's update_lanes.
template <typename T, int64_t D>
ETTRL_TILE_TARGET inline void update(__m512 scores, const float* values, int64_t valid, float* st) {
#if ETTRL_TILE_DOT_BF16
  if constexpr (kDotBf16<T>) return update_lanes<D>(scores, values, valid, st);
#endif
  tile_update<D>(scores, values, valid, st);
}

// The query of head `head` of row b as tile_scores takes it: the bf16 row in place (vdpbf16ps) or fp32 scaled.
template <typename T, int64_t D, typename Args = DecodeAttentionArgs>
struct Queries {
  const Args& a;
  float* f32;  // [rows][num_heads][D] scaled, fp32 path only

  void fill(int64_t row, int64_t b) {
    if constexpr (!kDotBf16<T>)
      for (int64_t i = 0; i < a.num_heads; ++i) scaled_query<T, D>(a, b, i, f32 + (row * a.num_heads + i) * D);
  }
  ETTRL_TILE_TARGET __m512 scores(int64_t row, int64_t b, int64_t head, const KeyTile<T, D>& keys, int64_t g,
                                  __mmask16 live) const {
#if ETTRL_TILE_DOT_BF16
    if constexpr (kDotBf16<T>)
      return tile_scores<D>(static_cast<const uint16_t*>(a.q) + (b * a.num_heads + head) * D, keys.rows, g * D,
                            a.scale, live);
#endif
    return tile_scores<D>(f32 + (row * a.num_heads + head) * D, keys.f32 + g * kTile * D, live);
  }
};

// Sequences that share leading KV blocks: members (indices into the batch) and the keys [0, shared) they share.
struct PrefixGroup {
  std::vector<int64_t> members;
  int64_t shared;
};

// Groups of at least two sequences whose tables agree on the first blocks; shared is a whole number of tiles
// that every member holds (a table's padding past its own blocks never counts as shared).
inline std::vector<PrefixGroup> prefix_groups(const DecodeAttentionArgs& a) {
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
inline std::vector<float>& scratch(int which, size_t size) {
  thread_local std::vector<float> buffers[5];
  if (buffers[which].size() < size) buffers[which].resize(size);
  return buffers[which];
}

// Phase 1: the shared tiles of one group for its members [begin, end).
template <typename T, int64_t D>
ETTRL_TILE_TARGET void fold_shared(const DecodeAttentionArgs& a, const Shape& sh, const PrefixGroup& grp,
                                   int64_t begin, int64_t end, float* states) {
  const int64_t n = end - begin, tile = sh.kv_heads * kTile * D;
  Queries<T, D> queries{a, kDotBf16<T> ? nullptr : scratch(0, n * a.num_heads * D).data()};
  KeyTile<T, D> keys{kDotBf16<T> ? nullptr : scratch(1, tile).data(), {}};
  float* values = scratch(2, tile).data();
  for (int64_t m = 0; m < n; ++m) queries.fill(m, grp.members[begin + m]);
  const int64_t* table = a.block_tables + grp.members[begin] * a.table_width;
  for (int64_t k0 = 0; k0 < grp.shared; k0 += kTile) {
    keys.load(static_cast<const T*>(a.k_cache), table, sh, k0, grp.shared);
    load_tile<T, D>(static_cast<const T*>(a.v_cache), table, sh, k0, grp.shared, values);
    for (int64_t m = 0; m < n; ++m) {
      const int64_t b = grp.members[begin + m];
      float* st = states + b * a.num_heads * kState<D>;
      for (int64_t i = 0; i < a.num_heads; ++i) {
        const int64_t g = i / sh.group;
        update<T, D>(queries.scores(m, b, i, keys, g, 0xFFFF), values + g * kTile * D, kTile, st + i * kState<D>);
      }
    }
  }
}

// A query row's output from its heads' final states: o / s per head.
template <typename T, int64_t D>
inline void write_row(const float* states, int64_t heads, T* out) {
  for (int64_t i = 0; i < heads; ++i) {
    const float* h = states + i * kState<D>;
    const float inv = 1.f / h[D + 1];
    for (int64_t j = 0; j < D; ++j) store(out + i * D, j, h[j] * inv);
  }
}

// Phase 2: sequence b's tiles from key `from` on, then its output.
template <typename T, int64_t D>
ETTRL_TILE_TARGET void fold_own(const DecodeAttentionArgs& a, const Shape& sh, int64_t b, int64_t from,
                                float* states) {
  const int64_t len = a.kv_lens[b], tile = sh.kv_heads * kTile * D;
  const int64_t* table = a.block_tables + b * a.table_width;
  Queries<T, D> queries{a, kDotBf16<T> ? nullptr : scratch(0, a.num_heads * D).data()};
  KeyTile<T, D> keys{kDotBf16<T> ? nullptr : scratch(1, tile).data(), {}};
  float* values = scratch(2, tile).data();
  float* st = states + b * a.num_heads * kState<D>;
  queries.fill(0, b);
  for (int64_t k0 = from; k0 < len; k0 += kTile) {
    prefetch_tile<T>(a, table, sh, k0 + kPrefetchTiles * kTile, len);
    keys.load(static_cast<const T*>(a.k_cache), table, sh, k0, len);
    load_tile<T, D>(static_cast<const T*>(a.v_cache), table, sh, k0, len, values);
    const int64_t valid = std::min(kTile, len - k0);
    for (int64_t i = 0; i < a.num_heads; ++i) {
      const int64_t g = i / sh.group;
      update<T, D>(queries.scores(0, b, i, keys, g, live_keys(valid)), values + g * kTile * D, valid,
                   st + i * kState<D>);
    }
  }
  write_row<T, D>(st, a.num_heads, static_cast<T*>(a.out) + b * a.num_heads * D);
}

template <typename T, int64_t D>
ETTRL_TILE_TARGET void decode(const DecodeAttentionArgs& a, int workers) {
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
    const int64_t per_task = std::clamp<int64_t>((n + workers - 1) / workers, 1, kMembersPerTask);  // all threads busy
    for (int64_t c = 0; c < n; c += per_task) tasks.push_back({&grp, c, std::min(n, c + per_task)});
  }
  parallel_ranges(static_cast<int64_t>(tasks.size()), workers, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fold_shared<T, D>(a, sh, *tasks[t].group, tasks[t].begin, tasks[t].end, states);
  });
  parallel_ranges(a.batch, workers, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fold_own<T, D>(a, sh, b, from[b], states);
  });
}

// The shapes the tiles handle, decode and prefill alike: head size 64 or 128, power-of-two blocks (and a bf16 cache
// where the caller is the bf16-only build).
template <bool Bf16Only, class Args>
inline bool tiles_handle(const Args& a) {
  const bool pow2_blocks = (a.block_size & (a.block_size - 1)) == 0;
  return pow2_blocks && (a.head_dim == 64 || a.head_dim == 128) && (a.bf16 || !Bf16Only);
}

// decode<> for the shapes the tiles handle; false otherwise.
template <bool Bf16Only>
ETTRL_TILE_TARGET bool decode_tiles(const DecodeAttentionArgs& a, int workers) {
  if (!tiles_handle<Bf16Only>(a)) return false;
  if (a.head_dim == 64)
    a.bf16 ? decode<uint16_t, 64>(a, workers) : decode<float, 64>(a, workers);
  else
    a.bf16 ? decode<uint16_t, 128>(a, workers) : decode<float, 128>(a, workers);
  return true;
}

// ---- prefill: several new tokens per sequence, each attending to the keys up to its own position ----------------
//
// Row r of sequence b sees n_r = kv_lens[b] - (q_starts[b + 1] - r) + 1 keys, and its result is the fold a decode
// with n_r keys computes: tile_update over tiles 0, 16, ... with the same scores, the last tile cut at n_r. Rows of
// one sequence are taken kRowsPerTask at a time, so that each tile is loaded (and its values converted) once for
// all of them; which rows share a task changes what is loaded together, not what any row computes. When there are
// fewer such tasks than workers can share (a 16-token piece of a long prompt beside decodes is one task), each is
// cut into ranges of query heads, which are independent: the cut changes who computes a head, not what.

constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kTasksPerWorker = 4;  // fewer row tasks than this per worker: cut them by heads
constexpr int kRowBundle = 4;  // rows whose updates of one head are interleaved (tile_update_full)

struct RowTask {
  int64_t seq, begin, end;  // rows [begin, end) of sequence seq
  int64_t cost;             // row tiles x heads: the work of the task
  int64_t h0, h1;           // query heads [h0, h1)
};

inline int64_t row_keys(const PrefillAttentionArgs& a, int64_t b, int64_t row) {
  return a.kv_lens[b] - (a.q_starts[b + 1] - row) + 1;
}

inline std::vector<RowTask> row_tasks(const PrefillAttentionArgs& a, int workers) {
  std::vector<RowTask> rows;
  for (int64_t b = 0; b < a.batch; ++b)
    for (int64_t r = a.q_starts[b]; r < a.q_starts[b + 1]; r += kRowsPerTask) {
      const int64_t end = std::min(a.q_starts[b + 1], r + kRowsPerTask);
      rows.push_back({b, r, end, (end - r) * ((row_keys(a, b, end - 1) + kTile - 1) / kTile), 0, a.num_heads});
    }
  const int64_t want = int64_t{kTasksPerWorker} * workers, have = static_cast<int64_t>(rows.size());
  const int64_t parts = have >= want || workers < 2 ? 1 : std::min<int64_t>(a.num_heads, (want + have - 1) / have);
  std::vector<RowTask> tasks;
  for (const RowTask& t : rows)
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t h0 = a.num_heads * p / parts, h1 = a.num_heads * (p + 1) / parts;
      tasks.push_back({t.seq, t.begin, t.end, t.cost * (h1 - h0), h0, h1});
    }
  return tasks;
}

// The KV heads [g0, g0 + own.kv_heads) that a task's query heads read: tiles load only those (from the cache row
// offset by g0 heads), and head i reads tile i / group - g0.
struct TaskKvHeads {
  int64_t g0;
  Shape own;
};

inline TaskKvHeads task_kv_heads(const RowTask& task, const Shape& sh) {
  const int64_t g0 = task.h0 / sh.group, g1 = (task.h1 - 1) / sh.group + 1;
  return {g0, Shape{sh.shift, sh.row, g1 - g0, sh.group}};
}

template <typename T, int64_t D>
ETTRL_TILE_TARGET void fold_rows(const PrefillAttentionArgs& a, const Shape& sh, const RowTask& task) {
  const int64_t n = task.end - task.begin, tile = sh.kv_heads * kTile * D, heads = a.num_heads;
  const int64_t first = row_keys(a, task.seq, task.begin), len = first + n - 1;  // keys of the first, last row
  const int64_t* table = a.block_tables + task.seq * a.table_width;
  const auto [g0, own] = task_kv_heads(task, sh);
  Queries<T, D, PrefillAttentionArgs> queries{a, kDotBf16<T> ? nullptr : scratch(0, n * heads * D).data()};
  KeyTile<T, D> keys{kDotBf16<T> ? nullptr : scratch(1, tile).data(), {}};
  float* values = scratch(2, tile).data();
  float* states = scratch(4, n * heads * kState<D>).data();
  for (int64_t s = 0; s < n * heads; ++s) reset_state<D>(states + s * kState<D>);
  for (int64_t m = 0; m < n; ++m) queries.fill(m, task.begin + m);  // all heads: cheap beside the tiles
  for (int64_t k0 = 0; k0 < len; k0 += kTile) {
    prefetch_tile<T>(a, table, sh, k0 + kPrefetchTiles * kTile, len);
    keys.load(static_cast<const T*>(a.k_cache) + g0 * D, table, own, k0, len);
    load_tile<T, D>(static_cast<const T*>(a.v_cache) + g0 * D, table, own, k0, len, values);
    // rows [seen, whole) see part of this tile, rows [whole, n) all of it (those go kRowBundle at a time)
    const int64_t seen = std::max<int64_t>(0, k0 + 1 - first), whole = std::max(seen, std::min(n, k0 + kTile - first));
    const int64_t bundled = whole + (n - whole) / kRowBundle * kRowBundle;
    for (int64_t m = seen; m < n; ++m) {
      if (m == whole) m = bundled;
      if (m == n) break;
      const int64_t valid = std::min(kTile, first + m - k0);
      float* st = states + m * heads * kState<D>;
      for (int64_t i = task.h0; i < task.h1; ++i) {
        const int64_t g = i / sh.group - g0;
        tile_update<D>(queries.scores(m, task.begin + m, i, keys, g, live_keys(valid)), values + g * kTile * D, valid,
                       st + i * kState<D>);
      }
    }
    for (int64_t m = whole; m < bundled; m += kRowBundle)
      for (int64_t i = task.h0; i < task.h1; ++i) {
        const int64_t g = i / sh.group - g0;
        __m512 scores[kRowBundle];
        float* st[kRowBundle];
        for (int k = 0; k < kRowBundle; ++k) {
          scores[k] = queries.scores(m + k, task.begin + m + k, i, keys, g, live_keys(kTile));
          st[k] = states + ((m + k) * heads + i) * kState<D>;
        }
        tile_update_full<D, kRowBundle>(scores, values + g * kTile * D, st);
      }
  }
  for (int64_t m = 0; m < n; ++m)
    write_row<T, D>(states + (m * heads + task.h0) * kState<D>, task.h1 - task.h0,
                    static_cast<T*>(a.out) + ((task.begin + m) * heads + task.h0) * D);
}

#if ETTRL_TILE_DOT_BF16
// fold_rows for bf16 caches with vdpbf16ps: the 16 rows of a task share each head's vectors (lane = row), their
// queries transposed once, each key's pairs broadcast from the cache row (attention_bf16_tiles.h).
template <int64_t D>
ETTRL_TILE_TARGET void fold_rows_bf16(const PrefillAttentionArgs& a, const Shape& sh, const RowTask& task) {
  const int64_t n = task.end - task.begin, heads = a.num_heads;
  const int64_t first = row_keys(a, task.seq, task.begin), len = first + n - 1;  // keys of the first, last row
  const int64_t* table = a.block_tables + task.seq * a.table_width;
  uint32_t* qt = reinterpret_cast<uint32_t*>(scratch(0, heads * D / 2 * kTile).data());
  float* values = scratch(2, sh.kv_heads * kTile * D).data();
  float* states = scratch(4, heads * kRowState<D> * kTile).data();
  const uint16_t* q = static_cast<const uint16_t*>(a.q) + task.begin * heads * D;
  const auto [g0, own] = task_kv_heads(task, sh);
  for (int64_t i = task.h0; i < task.h1; ++i) {
    transpose_queries<D>(q + i * D, heads * D, n, qt + i * D / 2 * kTile);
    float* st = states + i * kRowState<D> * kTile;
    std::fill(st, st + D * kTile, 0.f);
    std::fill(st + D * kTile, st + (D + 1) * kTile, -INFINITY);
    std::fill(st + (D + 1) * kTile, st + (D + 2) * kTile, 0.f);
  }
  const __mmask16 padding = static_cast<__mmask16>(~((1u << n) - 1));  // lanes past n: no row, never written
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t k0 = 0; k0 < len; k0 += kTile) {
    const uint16_t* keys[kTile];
    key_rows(static_cast<const uint16_t*>(a.k_cache), table, sh, k0, len, keys);
    load_tile<uint16_t, D>(static_cast<const uint16_t*>(a.v_cache) + g0 * D, table, own, k0, len, values);
    __mmask16 live[kTile];  // row m sees key k iff k < first + m
    for (int64_t l = 0; l < kTile; ++l) {
      const int64_t blind = std::clamp<int64_t>(k0 + l - first + 1, 0, kTile);  // rows [0, blind) do not see it
      live[l] = static_cast<__mmask16>(~((1u << blind) - 1)) | padding;
    }
    for (int64_t i = task.h0; i < task.h1; ++i) {
      const int64_t g = i / sh.group;
      update_rows<D>(qt + i * D / 2 * kTile, keys, g * D, values + (g - g0) * kTile * D, live, scale,
                     states + i * kRowState<D> * kTile);
    }
  }
  uint16_t* out = static_cast<uint16_t*>(a.out) + task.begin * heads * D;
  alignas(64) float o[kTile];
  for (int64_t i = task.h0; i < task.h1; ++i) {
    const float* st = states + i * kRowState<D> * kTile;
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_loadu_ps(st + (D + 1) * kTile));
    for (int64_t d = 0; d < D; ++d) {
      _mm512_store_ps(o, _mm512_mul_ps(_mm512_loadu_ps(st + d * kTile), inv));
      for (int64_t m = 0; m < n; ++m) store(out + (m * heads + i) * D, d, o[m]);
    }
  }
}
#endif

template <typename T, int64_t D>
ETTRL_TILE_TARGET void prefill(const PrefillAttentionArgs& a, int workers) {
  const Shape sh{__builtin_ctzll(static_cast<uint64_t>(a.block_size)), a.num_kv_heads * D, a.num_kv_heads,
                 a.num_heads / a.num_kv_heads};
  const std::vector<RowTask> tasks = row_tasks(a, workers);
  std::vector<int64_t> done(tasks.size() + 1, 0);  // cost of the tasks before each: threads take equal shares
  for (size_t t = 0; t < tasks.size(); ++t) done[t + 1] = done[t] + tasks[t].cost;
  parallel_ranges(workers, workers, [&](int64_t w0, int64_t w1) {
    const int64_t lo = done.back() * w0 / workers, hi = done.back() * w1 / workers;
    for (size_t t = 0; t < tasks.size(); ++t) {
      if (done[t] < lo || done[t] >= hi) continue;
#if ETTRL_TILE_DOT_BF16
      if constexpr (kDotBf16<T>) {
        fold_rows_bf16<D>(a, sh, tasks[t]);
        continue;
      }
#endif
      fold_rows<T, D>(a, sh, tasks[t]);
    }
  });
}

template <bool Bf16Only>
ETTRL_TILE_TARGET bool prefill_tiles(const PrefillAttentionArgs& a, int workers) {
  if (!tiles_handle<Bf16Only>(a)) return false;
  if (a.head_dim == 64)
    a.bf16 ? prefill<uint16_t, 64>(a, workers) : prefill<float, 64>(a, workers);
  else
    a.bf16 ? prefill<uint16_t, 128>(a, workers) : prefill<float, 128>(a, workers);
  return true;
}

}  // namespace
}  // namespace ettrl
