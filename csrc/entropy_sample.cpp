#include "entropy_sample.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fast_exp.h"
#include "parallel_ranges.h"
#include "target_clones.h"

namespace ettrl {
namespace {

// noise.py: bits = lowbias32(key ^ token), u = ((bits >> 8) | 1) * 2^-24, and the score is x - log(-log(u)).
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  return h ^ (h >> 16);
}

inline float log_neg_log_u(int32_t key, int64_t token) {
  const uint32_t bits = mix32(static_cast<uint32_t>(key) ^ static_cast<uint32_t>(token));
  const float u = static_cast<float>((bits >> 8) | 1u) * 0x1p-24f;
  return std::log(-std::log(u));
}

constexpr int64_t kBlock = 32;  // the draw skips whole blocks of tokens by their maximum
const double kGumbelMax = -std::log(-std::log1p(-0x1p-24));  // the largest noise: u <= 1 - 2^-24 (noise.py)

// x = logits * inv_temp into x and the maximum of each block of x into block_max; returns the maximum of x, or NaN
// if any x is NaN.
ETTRL_CLONES float scale_and_block_max(const float* logits, float inv_temp, float* x, float* block_max, int64_t n) {
  float m = -INFINITY;
  int nan = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    float bm = -INFINITY;
#pragma omp simd reduction(max : bm) reduction(| : nan)
    for (int64_t j = b0; j < b1; ++j) {
      x[j] = logits[j] * inv_temp;
      bm = std::max(bm, x[j]);
      nan |= x[j] != x[j];
    }
    block_max[b0 / kBlock] = bm;
    m = std::max(m, bm);
  }
  return nan ? NAN : m;
}

// (sum of e, sum of e * d) with d = x - m and e = exp(d); -inf logits add nothing (no 0 * -inf).
ETTRL_CLONES void exp_sums(const float* x, float m, int64_t n, double* sums) {
  float s = 0.f, w = 0.f;
#pragma omp simd reduction(+ : s, w)
  for (int64_t j = 0; j < n; ++j) {
    const float d = x[j] - m;
    const float e = d == -INFINITY ? 0.f : exp_fast(d);
    s += e;
    w += d == -INFINITY ? 0.f : e * d;
  }
  sums[0] = s;
  sums[1] = w;
}

float block_maximum(const float* x, int64_t b, int64_t n) {
  float bm = -INFINITY;
  for (int64_t j = b * kBlock; j < std::min(n, (b + 1) * kBlock); ++j) bm = std::max(bm, x[j]);
  return bm;
}

// First index of the maximum of x, or -1 if every x is -inf.
int64_t first_argmax(const float* x, const float* block_max, int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const float* top = std::max_element(block_max, block_max + blocks);  // the first of equal maxima
  if (*top == -INFINITY) return -1;
  const int64_t b0 = (top - block_max) * kBlock;
  return std::find(x + b0, x + std::min(n, b0 + kBlock), *top) - x;
}

void sample_row(const EntropySampleArgs& a, int64_t r, float* x, float* block_max) {
  const int64_t v = a.vocab, excluded = a.exclude[r];
  const float m = scale_and_block_max(a.logits + r * v, a.inv_temp[r], x, block_max, v);
  if (std::isnan(m) || m == INFINITY) {
    a.tokens[r] = -1;
    return;
  }
  double sums[2];
  exp_sums(x, m, v, sums);
  const double log_total = std::log(sums[0]);
  const float lse = static_cast<float>(m + log_total);
  a.entropies[r] = static_cast<float>(log_total - sums[1] / sums[0]);
  float excluded_x = 0.f;
  if (excluded >= 0) {  // the policy's statistics above include it; the draw below must not pick it
    excluded_x = x[excluded];
    x[excluded] = -INFINITY;
    block_max[excluded / kBlock] = block_maximum(x, excluded / kBlock, v);
  }
  int64_t token = first_argmax(x, block_max, v);
  if (token >= 0 && !a.greedy[r]) {
    // Gumbel-max over the tokens that can still win: noise never exceeds kGumbelMax, so a token below the top
    // token's score by more than that (and a rounding margin) never beats it.
    const int32_t key = a.keys[r];
    const float floor = x[token] - log_neg_log_u(key, token);
    const double cut = floor - kGumbelMax - (1e-3 + std::fabs(floor) * 0x1p-20);
    float best = -INFINITY;
    for (int64_t b = 0; b * kBlock < v; ++b) {
      if (block_max[b] < cut) continue;
      for (int64_t j = b * kBlock; j < std::min(v, (b + 1) * kBlock); ++j) {
        if (x[j] < cut) continue;
        const float score = x[j] - log_neg_log_u(key, j);
        if (score > best) best = score, token = j;
      }
    }
  }
  if (excluded >= 0) x[excluded] = excluded_x;
  if (token < 0) {
    a.tokens[r] = -1;
    return;
  }
  a.tokens[r] = token;
  a.logprobs[r] = x[token] - lse;
}

}  // namespace

void entropy_sample_rows(const EntropySampleArgs& a) {
  parallel_rows(a.batch, a.batch * a.vocab, a.num_threads, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> x, block_max;
    if (static_cast<int64_t>(x.size()) < a.vocab) x.resize(a.vocab), block_max.resize(a.vocab / kBlock + 1);
    for (int64_t r = begin; r < end; ++r) sample_row(a, r, x.data(), block_max.data());
  });
}

}  // namespace ettrl
