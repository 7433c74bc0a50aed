// Panel linear (panel_linear.h). Work is split into tasks of (chunk of up to kChunkRows rows, panel); a task runs
// tiles of 8 rows down its panel, so the panel (48 columns x in, at most ~150 KB at in = 1536) is read from memory
// once and then from L2, and x's rows stay in L1 across the inner loop. Accumulators are written as folds over
// index packs so that every index is a constant and they stay in registers (arrays of __m512 indexed by a loop
// variable spill to the stack with GCC).
#include "panel_linear.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 10 || defined(__clang__))
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "bf16.h"
#include "cpu_features.h"
#include "parallel_ranges.h"

#define ETTRL_PANEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

namespace ettrl {
namespace {

constexpr int64_t kTileRows = 8;
constexpr int64_t kVectors = kPanelColumns / 16;
constexpr int64_t kChunkRows = 256;  // rows of x one task reads, so that they stay in L2 while the panel is in use

// One step of the inner dimension: a pair of k (bf16, vdpbf16ps) or one k (fp32, FMA). The packed panel holds the
// step's 48 columns in 3 consecutive vectors; x gives one 32-bit broadcast per row.
struct Bf16Step {
  using T = uint16_t;
  using Out = uint16_t;
  static constexpr int64_t kPerStep = 2;
  ETTRL_PANEL __attribute__((always_inline)) static __m512i broadcast(const T* x, int64_t k, int64_t in) {
    int32_t pair = x[k];
    if (k + 1 < in) pair |= static_cast<int32_t>(x[k + 1]) << 16;
    return _mm512_set1_epi32(pair);
  }
  ETTRL_PANEL __attribute__((always_inline)) static __m512i broadcast_pair(const T* x, int64_t k) {
    int32_t pair;
    std::memcpy(&pair, x + k, sizeof(pair));
    return _mm512_set1_epi32(pair);
  }
  ETTRL_PANEL __attribute__((always_inline)) static __m512 madd(__m512 acc, __m512i x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
  ETTRL_PANEL __attribute__((always_inline)) static void store(T* y, __m512 v, __mmask16 live) {
    _mm256_mask_storeu_epi16(y, live, (__m256i)_mm512_cvtneps_pbh(v));
  }
};

struct Fp32Step {
  using T = float;
  using Out = float;
  static constexpr int64_t kPerStep = 1;
  ETTRL_PANEL __attribute__((always_inline)) static __m512i broadcast(const T* x, int64_t k, int64_t) {
    return _mm512_castps_si512(_mm512_set1_ps(x[k]));
  }
  ETTRL_PANEL __attribute__((always_inline)) static __m512i broadcast_pair(const T* x, int64_t k) {
    return broadcast(x, k, 0);
  }
  ETTRL_PANEL __attribute__((always_inline)) static __m512 madd(__m512 acc, __m512i x, __m512i w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
  }
  ETTRL_PANEL __attribute__((always_inline)) static void store(T* y, __m512 v, __mmask16 live) {
    _mm512_mask_storeu_ps(y, live, v);
  }
};

// bf16 in, the bf16-rounded results out as fp32: what .float() of Bf16Step's output holds, without that pass.
struct Bf16ToFp32Step : Bf16Step {
  using Out = float;
  ETTRL_PANEL __attribute__((always_inline)) static void store(float* y, __m512 v, __mmask16 live) {
    const __m512i wide = _mm512_maskz_cvtepu16_epi32(0xFFFF, (__m256i)_mm512_cvtneps_pbh(v));
    _mm512_mask_storeu_ps(y, live, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, wide, 16)));
  }
};

// acc[r * kVectors + v] += x[r] (one step at k) * panel step vector v, for the tile's R rows.
template <typename Step, bool kFull, size_t... I>
ETTRL_PANEL __attribute__((always_inline)) inline void step(const typename Step::T* x, int64_t in, int64_t k,
                                                            const typename Step::T* w, __m512* acc,
                                                            std::index_sequence<I...>) {
  constexpr int64_t kStride = 16 * Step::kPerStep;
  const __m512i wv[] = {_mm512_loadu_si512(w), _mm512_loadu_si512(w + kStride), _mm512_loadu_si512(w + 2 * kStride)};
  ((acc[I] = Step::madd(acc[I],
                        kFull ? Step::broadcast_pair(x + (I / kVectors) * in, k)
                              : Step::broadcast(x + (I / kVectors) * in, k, in),
                        wv[I % kVectors])),
   ...);
}

// The first n lanes of a vector (none for n <= 0, all for n >= 16).
inline __mmask16 lanes(int64_t n) { return static_cast<__mmask16>((1u << std::clamp<int64_t>(n, 0, 16)) - 1); }

template <typename Step, size_t... I>
ETTRL_PANEL __attribute__((always_inline)) inline void finish(const __m512* acc, const typename Step::T* bias,
                                                              typename Step::Out* y, int64_t out, int64_t columns,
                                                              std::index_sequence<I...>) {
  const __mmask16 live[] = {lanes(columns), lanes(columns - 16), lanes(columns - 32)};
  alignas(64) float bias_values[kPanelColumns] = {};
  for (int64_t c = 0; bias && c < columns; ++c) bias_values[c] = load(bias, c);
  const __m512 b[] = {_mm512_load_ps(bias_values), _mm512_load_ps(bias_values + 16), _mm512_load_ps(bias_values + 32)};
  (Step::store(y + (I / kVectors) * out + (I % kVectors) * 16, _mm512_add_ps(acc[I], b[I % kVectors]),
               live[I % kVectors]),
   ...);
}

template <size_t... I>
ETTRL_PANEL __attribute__((always_inline)) inline void zero(__m512* acc, std::index_sequence<I...>) {
  ((acc[I] = _mm512_setzero_ps()), ...);
}

// Lines of the next panel to prefetch into L2 while this one is in use, spread evenly over the steps of all its
// tiles: the first tile of a panel would otherwise stream it from memory at the full compute rate of both cores.
struct NextPanel {
  const char* line;  // the next line to prefetch
  int64_t lines;     // lines left
  int64_t per_tile;  // lines per tile (the last tile takes the rest)
};

// R rows of x (row stride in) times one panel -> y's R rows, columns [0, columns) of this panel. Kept a function of its
// own: inlined into panel_rows, the 8-row tile measured a few percent slower (alternating runs).
template <typename Step, int64_t R>
ETTRL_PANEL __attribute__((noinline)) void tile(const typename Step::T* x, const typename Step::T* panel,
                                                const typename Step::T* bias, typename Step::Out* y, int64_t in,
                                                int64_t out, int64_t columns, NextPanel& next, bool last) {
  using Acc = std::make_index_sequence<R * kVectors>;
  constexpr int64_t kPer = Step::kPerStep, kStepElements = kPanelColumns * kPer;
  __m512 acc[R * kVectors];
  zero(acc, Acc{});
  const int64_t full = in / kPer * kPer, steps = (in + kPer - 1) / kPer;
  const int64_t lines = last ? next.lines : std::min(next.per_tile, next.lines);
  int64_t due = 0;  // prefetch a line each time `due` passes `steps`: `lines` lines over `steps` steps
  int64_t k = 0;
  for (; k < full; k += kPer) {
    for (due += lines; due >= steps; due -= steps, next.line += 64, --next.lines) _mm_prefetch(next.line, _MM_HINT_T1);
    step<Step, true>(x, in, k, panel + k / kPer * kStepElements, acc, Acc{});
  }
  if (k < in) step<Step, false>(x, in, k, panel + k / kPer * kStepElements, acc, Acc{});
  finish<Step>(acc, bias, y, out, columns, Acc{});
}

template <typename Step>
ETTRL_PANEL void panel_rows(const typename Step::T* x, const typename Step::T* panel, const typename Step::T* bias,
                            typename Step::Out* y, int64_t rows, int64_t in, int64_t out, int64_t columns,
                            const void* next_panel, int64_t panel_bytes) {
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows, lines = next_panel ? panel_bytes / 64 : 0;
  NextPanel next{static_cast<const char*>(next_panel), lines, lines / tiles};
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    tile<Step, kTileRows>(x + r * in, panel, bias, y + r * out, in, out, columns, next, r + kTileRows == rows);
  x += r * in, y += r * out;
  switch (rows - r) {
    case 1: return tile<Step, 1>(x, panel, bias, y, in, out, columns, next, true);
    case 2: return tile<Step, 2>(x, panel, bias, y, in, out, columns, next, true);
    case 3: return tile<Step, 3>(x, panel, bias, y, in, out, columns, next, true);
    case 4: return tile<Step, 4>(x, panel, bias, y, in, out, columns, next, true);
    case 5: return tile<Step, 5>(x, panel, bias, y, in, out, columns, next, true);
    case 6: return tile<Step, 6>(x, panel, bias, y, in, out, columns, next, true);
    case 7: return tile<Step, 7>(x, panel, bias, y, in, out, columns, next, true);
    default: return;
  }
}

template <typename Step>
ETTRL_PANEL void run(const void* xv, const void* packed, const void* biasv, void* yv, int64_t rows, int64_t in,
                     int64_t out, int num_threads) {
  using T = typename Step::T;
  const T *x = static_cast<const T*>(xv), *w = static_cast<const T*>(packed), *bias = static_cast<const T*>(biasv);
  typename Step::Out* y = static_cast<typename Step::Out*>(yv);
  const int64_t panels = (out + kPanelColumns - 1) / kPanelColumns;
  const int64_t panel_elements = panel_packed_elements(kPanelColumns, in, std::is_same_v<T, uint16_t>);
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  const int64_t workers = rows * in * out >= 8 * kParallelElements ? num_threads : 1;
  parallel_ranges(chunks * panels, workers, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / panels, p = t % panels, r0 = c * kChunkRows, n0 = p * kPanelColumns;
      const T* next = t + 1 < end ? w + (t + 1) % panels * panel_elements : nullptr;  // this thread's next panel
      panel_rows<Step>(x + r0 * in, w + p * panel_elements, bias ? bias + n0 : nullptr, y + r0 * out + n0,
                       std::min(kChunkRows, rows - r0), in, out, std::min(kPanelColumns, out - n0), next,
                       panel_elements * static_cast<int64_t>(sizeof(T)));
    }
  });
}

}  // namespace

bool panel_linear_available() {
  static const bool ok = !env_flag("ETTRL_NO_PANEL_LINEAR") && has_avx512_bf16();
  return ok;
}

bool panel_linear(const void* x, const void* packed, const void* bias, void* y, int64_t rows, int64_t in, int64_t out,
                  bool bf16, int num_threads, bool fp32_out) {
  if (!panel_linear_available() || rows < 1 || in < 1 || out < 1) return false;
  if (bf16 && fp32_out)
    run<Bf16ToFp32Step>(x, packed, bias, y, rows, in, out, num_threads);
  else if (bf16)
    run<Bf16Step>(x, packed, bias, y, rows, in, out, num_threads);
  else
    run<Fp32Step>(x, packed, bias, y, rows, in, out, num_threads);
  return true;
}

}  // namespace ettrl

#else

namespace ettrl {
bool panel_linear_available() { return false; }
bool panel_linear(const void*, const void*, const void*, void*, int64_t, int64_t, int64_t, bool, int, bool) {
  return false;
}
}  // namespace ettrl

#endif

// Packing is plain C++ (any CPU), so the packed layout can be tested everywhere.
namespace ettrl {
namespace {

// Panel p, step s (a pair of k for bf16, one k for fp32), column c, element e of the step: one 64-byte vector holds
// 16 columns x kPerStep, the step's 3 vectors are consecutive, steps follow each other, panels follow each other.
template <typename T>
void pack(const T* w, T* dst, int64_t out, int64_t in, int64_t per_step) {
  const int64_t in_pad = (in + per_step - 1) / per_step * per_step, panels = (out + kPanelColumns - 1) / kPanelColumns;
  std::memset(dst, 0, panels * kPanelColumns * in_pad * sizeof(T));
  for (int64_t n = 0; n < out; ++n) {
    T* panel = dst + n / kPanelColumns * kPanelColumns * in_pad;
    const int64_t column = n % kPanelColumns;
    for (int64_t k = 0; k < in; ++k)
      panel[(k / per_step * kPanelColumns + column) * per_step + k % per_step] = w[n * in + k];
  }
}

}  // namespace

int64_t panel_packed_elements(int64_t out, int64_t in, bool bf16) {
  return (out + kPanelColumns - 1) / kPanelColumns * kPanelColumns * (bf16 ? (in + 1) / 2 * 2 : in);
}

void pack_panels(const void* w, void* dst, int64_t out, int64_t in, bool bf16) {
  if (bf16)
    pack(static_cast<const uint16_t*>(w), static_cast<uint16_t*>(dst), out, in, 2);
  else
    pack(static_cast<const float*>(w), static_cast<float*>(dst), out, in, 1);
}

}  // namespace ettrl
