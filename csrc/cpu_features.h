// Run-time CPU checks for the hand-written AVX-512 kernels, and the environment switches that turn them off (so
// that tests can run the other kernels on an AVX-512 machine).
#pragma once

#include <cstdlib>

namespace ettrl {

// The variable is set, non-empty and not "0".
inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' && *value != '0';
}

// AVX-512 F, BW, VL and DQ: what the tiled decode attention needs.
inline bool has_avx512() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// has_avx512() and AVX512_BF16 (vdpbf16ps): Zen 4, Cooper Lake, Sapphire Rapids and later.
inline bool has_avx512_bf16() {
#if defined(__x86_64__)
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace ettrl
