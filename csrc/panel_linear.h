// y = x w^T (+ bias) on CPUs with AVX-512 BF16 (decode and prefill), on a weight packed once into column panels.
// A panel holds 48 output columns laid out so that one 64-byte load is 16 columns of one k (fp32) or of one pair of
// k (bf16, the operand order of vdpbf16ps); a tile of 8 rows x 48 columns keeps 24 accumulators in registers and
// every weight load feeds 8 rows. Single-threaded this runs at the core's vdpbf16ps rate (64 FLOP a cycle),
// where oneDNN on its own packed weights falls short of it at the 64-row decode shapes of SmolLM2
// (docs/benchmarks.md).
// Each output element is summed in the same order whatever the number of rows or threads (batch-invariant).
#pragma once

#include <cstdint>

namespace ettrl {

constexpr int64_t kPanelColumns = 48;

// Elements of the packed form of an [out, in] weight: whole panels, in rounded up to even for bf16.
int64_t panel_packed_elements(int64_t out, int64_t in, bool bf16);

// Packs w ([out, in], row-major, bf16 or fp32) into dst (panel_packed_elements, zero padding included).
void pack_panels(const void* w, void* dst, int64_t out, int64_t in, bool bf16);

// x: [rows, in], packed: pack_panels of the [out, in] weight, bias: [out] or null, y: [rows, out]; all bf16 or all
// fp32. Sums in fp32, adds the bias, rounds once (bf16: to nearest even). Returns false, doing nothing, on a CPU
// without AVX-512 F/BW/VL/DQ and BF16 or with ETTRL_NO_PANEL_LINEAR set (not "0"). fp32_out (bf16 only): y is fp32
// and holds the bf16-rounded results widened, bit for bit what converting the bf16 output would give.
bool panel_linear(const void* x, const void* packed, const void* bias, void* y, int64_t rows, int64_t in, int64_t out,
                  bool bf16, int num_threads, bool fp32_out = false);

// Whether panel_linear runs on this CPU (false: it would return false).
bool panel_linear_available();

}  // namespace ettrl
