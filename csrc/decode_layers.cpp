#include "decode_layers.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "fused_ops.h"
#include "paged_attention.h"
#include "panel_linear.h"

namespace ettrl {
namespace {

void linear(const DecodeStepArgs& a, const void* packed, const void* bias, const void* x, void* y, int64_t in,
            int64_t out) {
  if (!panel_linear(x, packed, bias, y, a.tokens, in, out, a.bf16, a.num_threads))
    throw std::runtime_error("decode_layers: panel_linear declined a matmul (no AVX-512 BF16?)");
}

void require(const void* p, int64_t layer, const char* name) {
  if (p == nullptr)
    throw std::invalid_argument("decode_layers: layer " + std::to_string(layer) + " has no " + name);
}

void check_layer(const DecodeLayerWeights& w, int64_t l) {
  require(w.input_norm, l, "input_norm");
  require(w.qkv, l, "qkv");
  require(w.o, l, "o");
  require(w.post_norm, l, "post_norm");
  require(w.gate_up, l, "gate_up");
  require(w.down, l, "down");
  require(w.k_cache, l, "k_cache");
  require(w.v_cache, l, "v_cache");
  if ((w.q_norm == nullptr) != (w.k_norm == nullptr))
    throw std::invalid_argument("decode_layers: layer " + std::to_string(l) + " has one of q_norm, k_norm");
}

// llama.py's DecoderLayer.forward with fused ops, packed weights and the paged kernels (torch_paged.py).
void layer(const DecodeStepArgs& a, const DecodeLayerWeights& w, bool first) {
  const int64_t t = a.tokens, q_width = a.num_heads * a.head_dim;
  const int64_t qkv_width = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim;
  if (first) {  // the residual stream starts as the embeddings
    std::memcpy(a.residual, a.x, t * a.hidden * (a.bf16 ? 2 : 4));
    residual_rms_norm(a.x, nullptr, w.input_norm, a.h, t, a.hidden, a.eps, a.bf16, a.num_threads);
  } else {
    residual_rms_norm(a.x, a.residual, w.input_norm, a.h, t, a.hidden, a.eps, a.bf16, a.num_threads);
  }
  linear(a, w.qkv, w.qkv_bias, a.h, a.qkv, a.hidden, qkv_width);
  rope_and_cache(RopeCacheArgs{a.qkv, a.q, w.k_cache, w.v_cache, a.slots, a.positions, a.cos, a.sin, w.q_norm,
                               w.k_norm, a.qk_norm_eps, t, a.num_heads, a.num_kv_heads, a.head_dim, a.bf16,
                               a.num_threads});
  const int64_t d = a.num_decode, row = a.num_heads * a.head_dim * (a.bf16 ? 2 : 4);
  if (d > 0)
    paged_decode_attention(DecodeAttentionArgs{a.q, w.k_cache, w.v_cache, a.attn, a.block_tables, a.kv_lens, d,
                                               a.num_heads, a.num_kv_heads, a.head_dim, a.table_width, a.block_size,
                                               a.scale, a.bf16, a.num_threads});
  if (a.batch > d)
    paged_prefill_attention(PrefillAttentionArgs{static_cast<const char*>(a.q) + d * row, w.k_cache, w.v_cache,
                                                 static_cast<char*>(a.attn) + d * row,
                                                 a.block_tables + d * a.table_width, a.q_starts, a.kv_lens + d,
                                                 a.batch - d, a.num_heads, a.num_kv_heads, a.head_dim, a.table_width,
                                                 a.block_size, a.scale, a.bf16, a.num_threads});
  linear(a, w.o, w.o_bias, a.attn, a.x, q_width, a.hidden);
  residual_rms_norm(a.x, a.residual, w.post_norm, a.h, t, a.hidden, a.eps, a.bf16, a.num_threads);
  linear(a, w.gate_up, w.gate_up_bias, a.h, a.gate_up, a.hidden, 2 * a.inter);
  silu_and_mul(a.gate_up, a.act, t, a.inter, a.bf16, a.num_threads);
  linear(a, w.down, w.down_bias, a.act, a.x, a.inter, a.hidden);
}

}  // namespace

void decode_layers(const DecodeLayerWeights* layers, int64_t num_layers, const DecodeStepArgs& a) {
  if (a.tokens <= 0 || num_layers <= 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads ||
      a.num_decode < 0 || a.num_decode > a.batch || (a.batch > a.num_decode) != (a.q_starts != nullptr) ||
      (a.q_starts == nullptr ? a.tokens != a.batch : a.num_decode + a.q_starts[a.batch - a.num_decode] != a.tokens))
    throw std::invalid_argument("decode_layers: bad shape");
  for (int64_t l = 0; l < num_layers; ++l) check_layer(layers[l], l);
  for (int64_t l = 0; l < num_layers; ++l) layer(a, layers[l], l == 0);
}

}  // namespace ettrl
