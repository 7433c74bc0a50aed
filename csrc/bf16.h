// bfloat16 <-> float on raw uint16_t storage, rounding as torch's .to(torch.bfloat16) does (nearest, ties to even).
#pragma once

#include <cstdint>
#include <cstring>

namespace ettrl {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline uint32_t round_bits(float x) {  // the bf16 nearest to x (ties to even) in the high half; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
  const uint32_t nan = 0u - static_cast<uint32_t>((bits & 0x7FFFFFFF) > 0x7F800000);  // all ones for NaN
  return (rounded & ~nan) | (0x7FC00000u & nan);  // a mask, not a branch: the loops around it vectorise
}

inline void store(uint16_t* p, int64_t i, float x) { p[i] = static_cast<uint16_t>(round_bits(x) >> 16); }

// store() of a value that is already one of T's (the result of round_to): no second rounding.
inline void store_exact(float* p, int64_t i, float x) { p[i] = x; }
inline void store_exact(uint16_t* p, int64_t i, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  p[i] = static_cast<uint16_t>(bits >> 16);
}

// The value a torch op of dtype T returns for the fp32 result x: x itself for float, x rounded for bfloat16.
inline float round_to(const float*, float x) { return x; }
inline float round_to(const uint16_t*, float x) {
  const uint32_t bits = round_bits(x);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace ettrl
