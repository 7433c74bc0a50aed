// y = x w^T (+ bias) for a few rows of x (decode of one or two sequences) on CPUs with AVX-512 BF16.
// There a linear layer is a pass over its weight, and oneDNN's small-M path is slow to start and stream. On the
// 2-core development machine (SmolLM2-135M shapes, bf16): one row 1.5-2.5x faster than oneDNN on packed weights
// when the weight is in cache, about even when it streams from memory (the 49152-row lm_head); the engine at
// batch 1 gained ~14% (36 -> 41 tok/s). From 4 rows on oneDNN is as fast or faster: packed_linear.py routes 1-2.
#pragma once

#include <cstdint>

namespace ettrl {

constexpr int64_t kSkinnyMaxRows = 16;

// x: [rows, in], w: [out, in] (torch's Linear layout, row-major), bias: [out] or null, y: [rows, out]; all bf16
// (bf16 = true) or all fp32. Sums in fp32 (bf16: vdpbf16ps, pairs of exact products), adds the bias, rounds once.
// Returns false, doing nothing, where it does not apply: rows outside [1, kSkinnyMaxRows], or a CPU without
// AVX-512 F/BW/VL/DQ and BF16 (or ETTRL_NO_SKINNY set and not "0").
bool skinny_linear(const void* x, const void* w, const void* bias, void* y, int64_t rows, int64_t in, int64_t out,
                   bool bf16, int num_threads);

}  // namespace ettrl
