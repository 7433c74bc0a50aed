// The arithmetic of the vdpbf16ps attention on bf16 caches, in the two layouts that compute it: a decode (one query
// row, lanes = the 16 keys of a tile) and a prefill (16 query rows of one head, lanes = rows). Every operation a
// (row, key) or a row's state sees is the same in both, written out with intrinsics (nothing left to the compiler's
// contraction of a * b + c), so a token's attention is bit for bit the same whether it is decoded or prefilled:
//
//   score   = lane_sum(A) * scale, A_j (j < 16) the vdpbf16ps fold over the query/key pairs j, 16 + j, ...
//             (decode: A_j is lane j of one vector per key, lane_sum is sum_lanes_16)
//   m'      = max(m, the tile's scores)          corr = exp16(m - m')          p_l = exp16(score_l - m') (0 if masked)
//   s'      = fma(s, corr, tree_sum(p))          o'   = o * corr, then o = fma(p_l, v_l, o) for the live keys in order
//   output  = o * (1 / s)
//
// lane_sum is sum_lanes_16's order: P_k = (A_k + A_{8+k}) + (A_{4+k} + A_{12+k}), then (P_0 + P_2) + (P_1 + P_3).
// tree_sum adds p_l + p_{l+8}, then + 4, + 2, + 1 apart. Included by decode_attention_tiles.h inside its namespace,
// in the AVX512_BF16 build only.

// e^x for 16 lanes: fast_exp.h's reduction and polynomial, with the fused operations chosen here once for both
// layouts. Inputs below -87 give e^-87 (a masked score's exp, zeroed by its caller); NaN stays NaN.
ETTRL_TILE_TARGET inline __m512 exp16(__m512 x) {
  const __m512 c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), c);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512 e = _mm512_scalef_ps(p, n);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __mmask16 big = _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72283935546875f), _CMP_GT_OQ);
  return _mm512_mask_mov_ps(_mm512_mask_mov_ps(e, big, _mm512_set1_ps(INFINITY)), nan, x);
}

// tree_sum over the 16 lanes of one vector (decode: lane l = key l); the total is in lane 0.
ETTRL_TILE_TARGET inline __m512 tree_sum_lanes(__m512 p) {
  const __m512 a = _mm512_add_ps(p, _mm512_shuffle_f32x4(p, p, 0xEE));  // lanes 0-7: p_l + p_{l+8}
  const __m512 b = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, 0x55));  // lanes 0-3: a_l + a_{l+4}
  const __m512 c = _mm512_add_ps(b, _mm512_permute_ps(b, _MM_SHUFFLE(3, 2, 3, 2)));  // lanes 0-1: b_l + b_{l+2}
  return _mm512_add_ps(c, _mm512_permute_ps(c, _MM_SHUFFLE(1, 1, 1, 1)));            // lane 0: c_0 + c_1
}

// tree_sum over 16 vectors (prefill: vector l = key l, lanes = rows); destroys p.
ETTRL_TILE_TARGET inline __m512 tree_sum(__m512* p) {
  for (int step = 8; step >= 1; step /= 2)
    for (int l = 0; l < step; ++l) p[l] = _mm512_add_ps(p[l], p[l + step]);
  return p[0];
}

// sum_lanes_16's order over 16 vectors (prefill: vector j = pair slot j of every row's q.k).
ETTRL_TILE_TARGET inline __m512 lane_sum(const __m512* a) {
  __m512 p[4];
  for (int k = 0; k < 4; ++k) p[k] = _mm512_add_ps(_mm512_add_ps(a[k], a[8 + k]), _mm512_add_ps(a[4 + k], a[12 + k]));
  return _mm512_add_ps(_mm512_add_ps(p[0], p[2]), _mm512_add_ps(p[1], p[3]));
}

// 16 rows of 16 dwords, transposed (rows[l][j] -> out[j * 16 + l]).
ETTRL_TILE_TARGET inline void transpose16(const __m512i* rows, uint32_t* out) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit chunks: rows 0-3 and 4-7, then 8-11 and 12-15
    t[i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_si512(out + 16 * i, _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88));
    _mm512_storeu_si512(out + 16 * (8 + i), _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD));
  }
}

// ---- decode: lanes = keys ----------------------------------------------------------------------------------------

// The scores of one bf16 query (unscaled) over the bf16 key rows of a tile, read in place; -inf where not live.
template <int64_t D>
ETTRL_TILE_TARGET inline __m512 tile_scores(const uint16_t* q, const uint16_t* const* rows, int64_t offset,
                                            float scale, __mmask16 live) {
  constexpr int64_t C = D / 32;
  __m512bh qv[C];
  __m512 acc[kTile];
  for (int64_t c = 0; c < C; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
  for (int64_t l = 0; l < kTile; ++l) {
    acc[l] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c)
      acc[l] = _mm512_dpbf16_ps(acc[l], qv[c], (__m512bh)_mm512_loadu_si512(rows[l] + offset + 32 * c));
  }
  const __m512 scores = _mm512_mul_ps(sum_lanes_16(acc), _mm512_set1_ps(scale));
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, scores);
}

// One query head over one tile of `valid` keys (state as tile_update's: o[D], m, s).
template <int64_t D>
ETTRL_TILE_TARGET inline void update_lanes(__m512 scores, const float* values, int64_t valid, float* st) {
  constexpr int64_t C = D / 16;
  const float m_old = st[D], m_new = std::max(m_old, _mm512_reduce_max_ps(scores));
  const __m512 corr = _mm512_set1_ps(_mm512_cvtss_f32(exp16(_mm512_set1_ps(m_old - m_new))));
  alignas(64) float p[kTile];
  const __m512 pv = _mm512_maskz_mov_ps(live_keys(valid), exp16(_mm512_sub_ps(scores, _mm512_set1_ps(m_new))));
  _mm512_store_ps(p, pv);
  const __m512 s = _mm512_fmadd_ps(_mm512_set1_ps(st[D + 1]), corr, tree_sum_lanes(pv));
  st[D + 1] = _mm512_cvtss_f32(s);
  __m512 o[C];
  for (int64_t c = 0; c < C; ++c) o[c] = _mm512_mul_ps(_mm512_loadu_ps(st + 16 * c), corr);
  for (int64_t l = 0; l < valid; ++l) {
    const __m512 pl = _mm512_set1_ps(p[l]);
    for (int64_t c = 0; c < C; ++c) o[c] = _mm512_fmadd_ps(pl, _mm512_loadu_ps(values + l * D + 16 * c), o[c]);
  }
  for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(st + 16 * c, o[c]);
  st[D] = m_new;
}

// ---- prefill: lanes = 16 query rows of one sequence and head ----------------------------------------------------

// State of the 16 rows of one head: o[d] for d < D, then m and s, one vector (lane = row) each.
template <int64_t D>
constexpr int64_t kRowState = D + 2;

// Queries of rows [0, n) (n <= 16) of one head as [D / 2][16] dwords (pair j of row r at [j][r]); lanes past n
// repeat row 0 (their results are never written).
template <int64_t D>
ETTRL_TILE_TARGET inline void transpose_queries(const uint16_t* q, int64_t row_stride, int64_t n, uint32_t* qt) {
  for (int64_t h = 0; h < D / 32; ++h) {
    __m512i block[16];
    for (int64_t r = 0; r < kTile; ++r) block[r] = _mm512_loadu_si512(q + (r < n ? r : 0) * row_stride + 32 * h);
    transpose16(block, qt + 16 * 16 * h);
  }
}

// One tile for the 16 rows of one head: live[l] holds the rows that see key l of the tile (the causal mask).
template <int64_t D>
ETTRL_TILE_TARGET inline void update_rows(const uint32_t* qt, const uint16_t* const* keys, int64_t offset,
                                          const float* values, const __mmask16* live, __m512 scale, float* st) {
  __m512 s[kTile];
  for (int64_t l = 0; l < kTile; ++l) {
    const uint32_t* pairs = reinterpret_cast<const uint32_t*>(keys[l] + offset);
    __m512 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t h = 0; h < D / 32; ++h)
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(qt + 16 * (16 * h + j)),
                                  (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[16 * h + j])));
    s[l] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live[l], _mm512_mul_ps(lane_sum(acc), scale));
  }
  float* m_st = st + D * 16;
  float* s_st = st + (D + 1) * 16;
  const __m512 m_old = _mm512_loadu_ps(m_st);
  __m512 m_new = m_old;
  for (int64_t l = 0; l < kTile; ++l) m_new = _mm512_max_ps(m_new, s[l]);
  const __m512 corr = exp16(_mm512_sub_ps(m_old, m_new));
  __m512 p[kTile], sum[kTile];
  for (int64_t l = 0; l < kTile; ++l) sum[l] = p[l] = _mm512_maskz_mov_ps(live[l], exp16(_mm512_sub_ps(s[l], m_new)));
  _mm512_storeu_ps(s_st, _mm512_fmadd_ps(_mm512_loadu_ps(s_st), corr, tree_sum(sum)));
  _mm512_storeu_ps(m_st, m_new);
  for (int64_t d0 = 0; d0 < D; d0 += 8) {
    __m512 o[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) o[k] = _mm512_mul_ps(_mm512_loadu_ps(st + (d0 + k) * 16), corr);
#pragma GCC unroll 16
    for (int64_t l = 0; l < kTile; ++l)
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k)
        o[k] = _mm512_mask3_fmadd_ps(p[l], _mm512_set1_ps(values[l * D + d0 + k]), o[k], live[l]);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) _mm512_storeu_ps(st + (d0 + k) * 16, o[k]);
  }
}
