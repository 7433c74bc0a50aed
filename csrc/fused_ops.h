// Fused elementwise steps of a decoder layer on the CPU (fp32 or bf16), one pass over the rows each.
// At decode shapes (tens of rows of a few hundred features) a layer's RMSNorms, residual adds, rotary embedding,
// KV-cache writes and SiLU are dozens of tiny torch ops whose dispatch costs more than their arithmetic; each
// function here replaces one such chain. They round where Hugging Face's modules round (bf16 results of each torch
// op): rope and SiLU give the torch path's bits; RMSNorm sums its squares in another order, so about 5 in 10^6 bf16
// values differ by one unit in the last place.
#pragma once

#include <cstdint>

namespace ettrl {

// residual == nullptr: out = rms_norm(x) * weight.
// else:                residual = x + residual (in place), out = rms_norm(residual) * weight.
// x, residual, out: [rows, dim]; weight: [dim].
void residual_rms_norm(const void* x, void* residual, const void* weight, void* out, int64_t rows, int64_t dim,
                       float eps, bool bf16, int num_threads);

struct RopeCacheArgs {
  const void* qkv;            // [tokens, (num_heads + 2 num_kv_heads) head_dim], q | k | v per row
  void* q_out;                // [tokens, num_heads, head_dim]: the rotated queries
  void* k_cache;              // [num_slots, num_kv_heads, head_dim] of this layer
  void* v_cache;
  const int64_t* slots;       // [tokens] cache slot of each token
  const int64_t* positions;   // [tokens]
  const float* cos;           // [max_positions, head_dim / 2] (fp32 tables)
  const float* sin;
  const void* q_norm;         // [head_dim] per-head RMSNorm weights applied before the rotation (Qwen3), or null
  const void* k_norm;
  float norm_eps;
  int64_t tokens, num_heads, num_kv_heads, head_dim;
  bool bf16;
  int num_threads;
};

// Rotary embedding (rotate-half convention) of q and k, optional per-head q/k RMSNorm first; k and v go straight
// into their cache slots.
void rope_and_cache(const RopeCacheArgs& a);

// out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j]; gate_up: [rows, 2 inter], out: [rows, inter].
void silu_and_mul(const void* gate_up, void* out, int64_t rows, int64_t inter, bool bf16, int num_threads);

}  // namespace ettrl
