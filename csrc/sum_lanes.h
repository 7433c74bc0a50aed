// sum_lanes_16: sixteen horizontal sums of 16-lane float vectors in one shuffle tree (AVX-512 F).
#pragma once

#include <immintrin.h>

// GCC 12 flags its own intrinsics headers (the undefined-vector idiom of the _mm512_reduce_* helpers) under -Wall
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace ettrl {

// Lane l of the result is the sum of the 16 lanes of v[l]: 45 shuffles and adds for 16 dot products instead of a
// 4-level reduction each. Every lane is summed in the same order, whichever position it has in v.
__attribute__((target("avx512f"), always_inline)) inline __m512 sum_lanes_16(const __m512* v) {
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

}  // namespace ettrl
