#include "fused_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "bf16.h"
#include "fast_exp.h"
#include "parallel_ranges.h"
#include "target_clones.h"

namespace ettrl {
namespace {

// rms_norm of one row, rounded like RMSNorm.forward: h = float(x) * rsqrt(mean(x^2) + eps); out = w * T(h).
template <typename T>
__attribute__((always_inline)) inline void norm_row(const float* h, const T* w, T* out, int64_t dim, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < dim; ++j) sum += h[j] * h[j];
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) store(out, j, load(w, j) * round_to(out, h[j] * inv));
}

template <typename T>
__attribute__((always_inline)) inline void norm_rows(const T* x, T* residual, const T* w, T* out, int64_t dim,
                                                     float eps, int64_t begin, int64_t end) {
  float h[dim];
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * dim;
    if (residual) {
      T* res = residual + r * dim;
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) {
        h[j] = round_to(res, load(xr, j) + load(res, j));
        store_exact(res, j, h[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) h[j] = load(xr, j);
    }
    norm_row(h, w, out + r * dim, dim, eps);
  }
}

ETTRL_CLONES void norm_range(const void* x, void* residual, const void* w, void* out, int64_t dim, float eps,
                             bool bf16, int64_t begin, int64_t end) {
  if (bf16)
    norm_rows(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(residual), static_cast<const uint16_t*>(w),
              static_cast<uint16_t*>(out), dim, eps, begin, end);
  else
    norm_rows(static_cast<const float*>(x), static_cast<float*>(residual), static_cast<const float*>(w),
              static_cast<float*>(out), dim, eps, begin, end);
}

// Rotate-half rope on one head, rounded like apply_rope: T(T(x * cos) + T(roll(x) * signed_sin)); cos and sin
// come already rounded to T (RotaryEmbedding.lookup casts them to the activation dtype), once per token.
template <typename T>
__attribute__((always_inline)) inline void rope_head(const float* x, const float* cos, const float* sin, T* out,
                                                     int64_t d) {
  const int64_t half = d / 2;
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    store(out, j, round_to(out, x[j] * cos[j]) + round_to(out, x[j + half] * -sin[j]));
    store(out, j + half, round_to(out, x[j + half] * cos[j]) + round_to(out, x[j] * sin[j]));
  }
}

template <typename T>
__attribute__((always_inline)) inline void rope_rows(const RopeCacheArgs& a, int64_t begin, int64_t end) {
  const int64_t d = a.head_dim, hq = a.num_heads, hkv = a.num_kv_heads, width = (hq + 2 * hkv) * d;
  const T* q_norm = static_cast<const T*>(a.q_norm);
  const T* k_norm = static_cast<const T*>(a.k_norm);
  float h[d], cos[d / 2], sin[d / 2];
  T normed[d];
  for (int64_t t = begin; t < end; ++t) {
    const T* row = static_cast<const T*>(a.qkv) + t * width;
    const float* cos_row = a.cos + a.positions[t] * (d / 2);
    const float* sin_row = a.sin + a.positions[t] * (d / 2);
#pragma omp simd
    for (int64_t j = 0; j < d / 2; ++j) {
      cos[j] = round_to(normed, cos_row[j]);  // normed: a T*, which picks the rounding
      sin[j] = round_to(normed, sin_row[j]);
    }
    T* q_out = static_cast<T*>(a.q_out) + t * hq * d;
    T* k_out = static_cast<T*>(a.k_cache) + a.slots[t] * hkv * d;
    T* v_out = static_cast<T*>(a.v_cache) + a.slots[t] * hkv * d;
    for (int64_t i = 0; i < hq + hkv; ++i) {
      const T* src = row + i * d;
      const T* norm_w = i < hq ? q_norm : k_norm;
      if (norm_w) {  // Qwen3: RMSNorm over the head, then the rotation of the normed (rounded) values
        for (int64_t j = 0; j < d; ++j) h[j] = load(src, j);
        norm_row(h, norm_w, normed, d, a.norm_eps);
        src = normed;
      }
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) h[j] = load(src, j);
      rope_head(h, cos, sin, i < hq ? q_out + i * d : k_out + (i - hq) * d, d);
    }
    const T* v = row + (hq + hkv) * d;
    for (int64_t j = 0; j < hkv * d; ++j) v_out[j] = v[j];
  }
}

ETTRL_CLONES void rope_range(const RopeCacheArgs& a, int64_t begin, int64_t end) {
  if (a.bf16)
    rope_rows<uint16_t>(a, begin, end);
  else
    rope_rows<float>(a, begin, end);
}

// silu rounded like F.silu (x / (1 + exp(-x)) in fp32, then T), times up, rounded like the torch mul.
template <typename T>
__attribute__((always_inline)) inline void silu_rows(const T* gate_up, T* out, int64_t inter, int64_t begin,
                                                     int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* g = gate_up + r * 2 * inter;
    const T* u = g + inter;
    T* o = out + r * inter;
#pragma omp simd
    for (int64_t j = 0; j < inter; ++j) {
      const float x = load(g, j);
      store(o, j, round_to(o, x / (1.f + exp_fast(-x))) * load(u, j));
    }
  }
}

ETTRL_CLONES void silu_range(const void* gate_up, void* out, int64_t inter, bool bf16, int64_t begin, int64_t end) {
  if (bf16)
    silu_rows(static_cast<const uint16_t*>(gate_up), static_cast<uint16_t*>(out), inter, begin, end);
  else
    silu_rows(static_cast<const float*>(gate_up), static_cast<float*>(out), inter, begin, end);
}

}  // namespace

void residual_rms_norm(const void* x, void* residual, const void* weight, void* out, int64_t rows, int64_t dim,
                       float eps, bool bf16, int num_threads) {
  if (rows < 0 || dim <= 0) throw std::invalid_argument("residual_rms_norm: bad shape");
  parallel_rows(rows, rows * dim, num_threads,
                [&](int64_t b, int64_t e) { norm_range(x, residual, weight, out, dim, eps, bf16, b, e); });
}

void rope_and_cache(const RopeCacheArgs& a) {
  if (a.tokens < 0 || a.head_dim <= 0 || a.head_dim % 2 || a.num_heads <= 0 || a.num_kv_heads <= 0)
    throw std::invalid_argument("rope_and_cache: bad shape (head_dim must be even)");
  const int64_t width = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim;
  parallel_rows(a.tokens, a.tokens * width, a.num_threads, [&](int64_t b, int64_t e) { rope_range(a, b, e); });
}

void silu_and_mul(const void* gate_up, void* out, int64_t rows, int64_t inter, bool bf16, int num_threads) {
  if (rows < 0 || inter <= 0) throw std::invalid_argument("silu_and_mul: bad shape");
  parallel_rows(rows, rows * inter, num_threads,
                [&](int64_t b, int64_t e) { silu_range(gate_up, out, inter, bf16, b, e); });
}

}  // namespace ettrl
