#include "decode_layers.h"

#include <cstring>
#include <stdexcept>

#include "fused_ops.h"
#include "paged_attention.h"
#include "panel_linear.h"

namespace ettrl {
namespace {

// linear() finds each matmul's bias in the slot after its weight.
static_assert(kQkvBias == kQkv + 1 && kOBias == kO + 1 && kGateUpBias == kGateUp + 1 && kDownBias == kDown + 1);

void linear(const DecodeLayersArgs& a, const uint64_t* w, int64_t weight, const void* x, void* y, int64_t in,
            int64_t out) {
  const void* packed = reinterpret_cast<const void*>(w[weight]);
  const void* bias = reinterpret_cast<const void*>(w[weight + 1]);
  if (!panel_linear(x, packed, bias, y, a.tokens, in, out, a.bf16, a.num_threads))
    throw std::runtime_error("decode_layers: panel_linear declined a matmul (no AVX-512 BF16?)");
}

const void* at(const uint64_t* w, int64_t i) { return reinterpret_cast<const void*>(w[i]); }

// llama.py's DecoderLayer.forward with fused ops, packed weights and the paged kernels (torch_paged.py).
void layer(const DecodeLayersArgs& a, const uint64_t* w, bool first) {
  const int64_t t = a.tokens, q_width = a.num_heads * a.head_dim;
  const int64_t qkv_width = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim;
  if (first) {  // the residual stream starts as the embeddings
    std::memcpy(a.residual, a.x, t * a.hidden * (a.bf16 ? 2 : 4));
    residual_rms_norm(a.x, nullptr, at(w, kInputNorm), a.h, t, a.hidden, a.eps, a.bf16, a.num_threads);
  } else {
    residual_rms_norm(a.x, a.residual, at(w, kInputNorm), a.h, t, a.hidden, a.eps, a.bf16, a.num_threads);
  }
  linear(a, w, kQkv, a.h, a.qkv, a.hidden, qkv_width);
  rope_and_cache(RopeCacheArgs{a.qkv, a.q, reinterpret_cast<void*>(w[kKCache]), reinterpret_cast<void*>(w[kVCache]),
                               a.slots, a.positions, a.cos, a.sin, at(w, kQNorm), at(w, kKNorm), a.qk_norm_eps, t,
                               a.num_heads, a.num_kv_heads, a.head_dim, a.bf16, a.num_threads});
  const int64_t d = a.num_decode, row = a.num_heads * a.head_dim * (a.bf16 ? 2 : 4);
  if (d > 0)
    paged_decode_attention(DecodeAttentionArgs{a.q, at(w, kKCache), at(w, kVCache), a.attn, a.block_tables, a.kv_lens,
                                               d, a.num_heads, a.num_kv_heads, a.head_dim, a.table_width,
                                               a.block_size, a.scale, a.bf16, a.num_threads});
  if (a.batch > d)
    paged_prefill_attention(PrefillAttentionArgs{static_cast<const char*>(a.q) + d * row, at(w, kKCache),
                                                 at(w, kVCache), static_cast<char*>(a.attn) + d * row,
                                                 a.block_tables + d * a.table_width, a.q_starts, a.kv_lens + d,
                                                 a.batch - d, a.num_heads, a.num_kv_heads, a.head_dim, a.table_width,
                                                 a.block_size, a.scale, a.bf16, a.num_threads});
  linear(a, w, kO, a.attn, a.x, q_width, a.hidden);
  residual_rms_norm(a.x, a.residual, at(w, kPostNorm), a.h, t, a.hidden, a.eps, a.bf16, a.num_threads);
  linear(a, w, kGateUp, a.h, a.gate_up, a.hidden, 2 * a.inter);
  silu_and_mul(a.gate_up, a.act, t, a.inter, a.bf16, a.num_threads);
  linear(a, w, kDown, a.act, a.x, a.inter, a.hidden);
}

}  // namespace

void decode_layers(const DecodeLayersArgs& a) {
  if (a.tokens <= 0 || a.num_layers <= 0 || a.num_heads % a.num_kv_heads || a.num_decode < 0 ||
      a.num_decode > a.batch || (a.batch > a.num_decode) != (a.q_starts != nullptr) ||
      (a.q_starts == nullptr ? a.tokens != a.batch : a.num_decode + a.q_starts[a.batch - a.num_decode] != a.tokens))
    throw std::invalid_argument("decode_layers: bad shape");
  for (int64_t l = 0; l < a.num_layers; ++l) layer(a, a.layers + l * kDecodeLayerPointers, l == 0);
}

}  // namespace ettrl
