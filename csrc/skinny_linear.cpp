// Skinny linear layers (skinny_linear.h): a tile of R weight rows x M rows of x keeps R * M = 16 accumulators of
// 16 lanes over the inner dimension, and one sum_lanes_16 turns them into 16 outputs. The weight rows are loaded
// once per tile and every row of x (padded to M = 1, 2, 4, 8 or 16 rows) uses them while they are in registers
// or L1, so the weight is streamed from memory exactly once per call; the output columns are split over threads.
#include "skinny_linear.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 10 || defined(__clang__))
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "bf16.h"
#include "cpu_features.h"
#include "parallel_ranges.h"
#include "sum_lanes.h"

#define ETTRL_SKINNY __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

namespace ettrl {
namespace {

// One 64-byte chunk of the inner dimension: 32 bf16 (acc += pairs of products) or 16 fp32 (acc += products).
struct Bf16Chunk {
  using T = uint16_t;
  static constexpr int64_t kWidth = 32;
  ETTRL_SKINNY __attribute__((always_inline)) static __m512i load(const T* p, __mmask32 live) {
    return _mm512_maskz_loadu_epi16(live, p);
  }
  ETTRL_SKINNY __attribute__((always_inline)) static __m512 madd(__m512 acc, __m512i x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
};

struct Fp32Chunk {
  using T = float;
  static constexpr int64_t kWidth = 16;
  ETTRL_SKINNY __attribute__((always_inline)) static __m512i load(const T* p, __mmask32 live) {
    return _mm512_castps_si512(_mm512_maskz_loadu_ps(static_cast<__mmask16>(live), p));
  }
  ETTRL_SKINNY __attribute__((always_inline)) static __m512 madd(__m512 acc, __m512i x, __m512i w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
  }
};

// acc[r M + m] += x[m][k : k + width] . w_r[k : k + width] for the tile's R weight rows and M rows of x. Written
// as folds over index packs so that every array index is a constant and the 16 accumulators live in registers.
template <typename Chunk, int64_t M, int64_t R = 16 / M, size_t... I, size_t... J, size_t... L>
ETTRL_SKINNY __attribute__((always_inline)) inline void accumulate(const typename Chunk::T* xp,
                                                                   const typename Chunk::T* const* wr, int64_t in,
                                                                   int64_t k, __mmask32 live, __m512* acc,
                                                                   std::index_sequence<I...>, std::index_sequence<J...>,
                                                                   std::index_sequence<L...>) {
  (_mm_prefetch(reinterpret_cast<const char*>(wr[R + J] + k), _MM_HINT_T0), ...);  // the next tile's rows
  const __m512i wv[] = {Chunk::load(wr[J] + k, live)...};
  const __m512i xv[] = {Chunk::load(xp + L * in + k, live)...};
  ((acc[I] = Chunk::madd(acc[I], xv[I % M], wv[I / M])), ...);
}

template <size_t... I>
ETTRL_SKINNY __attribute__((always_inline)) inline void zero(__m512* acc, std::index_sequence<I...>) {
  ((acc[I] = _mm512_setzero_ps()), ...);
}

// sum_lanes_16 of a copy: the accumulators' own address never escapes, so they stay in registers in the loop.
template <size_t... I>
ETTRL_SKINNY __attribute__((always_inline)) inline __m512 sum_lanes(const __m512* acc, std::index_sequence<I...>) {
  const __m512 copy[] = {acc[I]...};
  return sum_lanes_16(copy);
}

// Output columns [n0, n0 + 16 / M) for the M rows of xp (zero-padded rows): 16 dot products of length `in`.
template <typename Chunk, int64_t M>
ETTRL_SKINNY inline void tile(const typename Chunk::T* xp, const typename Chunk::T* w, const typename Chunk::T* bias,
                              typename Chunk::T* y, int64_t rows, int64_t in, int64_t out, int64_t n0) {
  constexpr int64_t R = 16 / M, W = Chunk::kWidth;
  const typename Chunk::T* wr[2 * R];  // this tile's weight rows, then the next tile's (prefetched)
  for (int64_t r = 0; r < 2 * R; ++r) wr[r] = w + std::min(n0 + r, out - 1) * in;  // past the end: a real row
  using Tiles = std::make_index_sequence<16>;
  using Weights = std::make_index_sequence<R>;
  using Rows = std::make_index_sequence<M>;
  __m512 acc[16];
  zero(acc, Tiles{});
  int64_t k = 0;
  for (; k + W <= in; k += W) accumulate<Chunk, M>(xp, wr, in, k, ~__mmask32{0}, acc, Tiles{}, Weights{}, Rows{});
  if (k < in)
    accumulate<Chunk, M>(xp, wr, in, k, static_cast<__mmask32>((uint64_t{1} << (in - k)) - 1), acc, Tiles{}, Weights{},
                         Rows{});
  alignas(64) float sums[16];
  _mm512_store_ps(sums, sum_lanes(acc, Tiles{}));
  for (int64_t r = 0; r < R && n0 + r < out; ++r) {
    const float b = bias ? load(bias, n0 + r) : 0.f;
    for (int64_t m = 0; m < rows; ++m) store(y + m * out, n0 + r, sums[r * M + m] + b);
  }
}

template <typename Chunk, int64_t M>
ETTRL_SKINNY void columns(const typename Chunk::T* xp, const typename Chunk::T* w, const typename Chunk::T* bias,
                          typename Chunk::T* y, int64_t rows, int64_t in, int64_t out, int64_t begin, int64_t end) {
  constexpr int64_t R = 16 / M;
  for (int64_t t = begin; t < end; ++t) tile<Chunk, M>(xp, w, bias, y, rows, in, out, t * R);
}

template <typename Chunk>
ETTRL_SKINNY void run(const void* x, const void* w, const void* bias, void* y, int64_t rows, int64_t in, int64_t out,
                      int num_threads) {
  using T = typename Chunk::T;
  const int64_t m = rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : rows <= 8 ? 8 : 16;
  thread_local std::vector<T> padded;  // x with zero rows up to m: the tile's accumulators are all used
  padded.assign(m * in, T{0});
  std::memcpy(padded.data(), x, rows * in * sizeof(T));
  const T *xp = padded.data(), *wp = static_cast<const T*>(w), *bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  const int64_t tiles = (out + 16 / m - 1) / (16 / m);
  const int64_t workers = std::min<int64_t>(num_threads, 1 + out * in / kParallelElements);
  parallel_ranges(tiles, workers, [&](int64_t b, int64_t e) {
    switch (m) {
      case 1: return columns<Chunk, 1>(xp, wp, bp, yp, rows, in, out, b, e);
      case 2: return columns<Chunk, 2>(xp, wp, bp, yp, rows, in, out, b, e);
      case 4: return columns<Chunk, 4>(xp, wp, bp, yp, rows, in, out, b, e);
      case 8: return columns<Chunk, 8>(xp, wp, bp, yp, rows, in, out, b, e);
      default: return columns<Chunk, 16>(xp, wp, bp, yp, rows, in, out, b, e);
    }
  });
}

}  // namespace

bool skinny_linear(const void* x, const void* w, const void* bias, void* y, int64_t rows, int64_t in, int64_t out,
                   bool bf16, int num_threads) {
  static const bool ok = !env_flag("ETTRL_NO_SKINNY") && has_avx512_bf16();
  if (!ok || rows < 1 || rows > kSkinnyMaxRows || in < 1 || out < 1) return false;
  if (bf16)
    run<Bf16Chunk>(x, w, bias, y, rows, in, out, num_threads);
  else
    run<Fp32Chunk>(x, w, bias, y, rows, in, out, num_threads);
  return true;
}

}  // namespace ettrl

#else

namespace ettrl {
bool skinny_linear(const void*, const void*, const void*, void*, int64_t, int64_t, int64_t, bool, int) { return false; }
}  // namespace ettrl

#endif
