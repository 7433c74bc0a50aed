// exp for float loops that must vectorise (std::exp is a scalar libm call inside them).
#pragma once

#include <cstdint>
#include <cstring>

namespace ettrl {

// expf to within ~1 ulp (max relative error 2.8e-7 measured), branch-free so that loops around it vectorise:
// Cody-Waite reduction x = n ln2 + r, Cephes' degree-6 polynomial for e^r, 2^n built in the exponent bits.
// Overflows to +inf above log(FLT_MAX) like expf. Inputs below -87 give e^-87 (~1.6e-38) rather than something
// smaller: harmless where the result meets numbers near 1 (silu's 1 + e^-x, softmax sums), the only uses here.
__attribute__((always_inline)) inline float exp_fast(float x) {
  const float big = 88.72283935546875f;  // log(FLT_MAX)
  const float c = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (c * 1.44269504088896341f + shifter) - shifter;
  const float r = (c - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  return x > big ? __builtin_inff() : (x != x ? x : e);
}

}  // namespace ettrl
