// The decoder layers of one step in one call: the same fused ops the Python layer loop calls, in its order. A step is
// decodes (one new token per sequence) first, then prefill pieces (several new tokens per sequence).
#pragma once

#include <cstdint>

namespace ettrl {

// One decoder layer's tensors, by name (engine/layers/decode_layers.py fills each field from the model by the same
// name). Matmul weights are packed panels (pack_panels); a bias or a q/k norm may be null, the others may not.
struct DecodeLayerWeights {
  const void* input_norm = nullptr;  // [hidden]
  const void* qkv = nullptr;         // panels of [(num_heads + 2 num_kv_heads) head_dim, hidden]
  const void* qkv_bias = nullptr;
  const void* q_norm = nullptr;  // [head_dim] per-head RMSNorm of q and k before the rotation (Qwen3)
  const void* k_norm = nullptr;
  const void* o = nullptr;  // panels of [hidden, num_heads head_dim]
  const void* o_bias = nullptr;
  const void* post_norm = nullptr;  // [hidden]
  const void* gate_up = nullptr;    // panels of [2 inter, hidden]
  const void* gate_up_bias = nullptr;
  const void* down = nullptr;  // panels of [hidden, inter]
  const void* down_bias = nullptr;
  void* k_cache = nullptr;  // this layer's KV pool [slots, num_kv_heads head_dim]
  void* v_cache = nullptr;
};

// Everything of one step but the layers: the model's shape, the activations and scratch, and the attention plan.
struct DecodeStepArgs {
  void* x = nullptr;         // [tokens, hidden]: in, the embeddings; out, the last layer's MLP output
  void* residual = nullptr;  // [tokens, hidden]: out, the residual stream before that output (the final norm adds them)
  void* h = nullptr;         // scratch [tokens, hidden]
  void* qkv = nullptr;       // scratch [tokens, (num_heads + 2 num_kv_heads) head_dim]
  void* q = nullptr;         // scratch [tokens, num_heads head_dim]
  void* attn = nullptr;      // scratch [tokens, num_heads head_dim]
  void* gate_up = nullptr;   // scratch [tokens, 2 inter]
  void* act = nullptr;       // scratch [tokens, inter]
  int64_t tokens = 0, hidden = 0, inter = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float eps = 0.f, qk_norm_eps = 0.f;
  const int64_t* slots = nullptr;      // [tokens] cache slot of each new token
  const int64_t* positions = nullptr;  // [tokens]
  const float* cos = nullptr;          // rotary tables [max_positions, head_dim / 2]
  const float* sin = nullptr;
  const int64_t* block_tables = nullptr;  // [batch, table_width]
  const int64_t* kv_lens = nullptr;       // [batch] keys per sequence, its new tokens included
  const int64_t* q_starts = nullptr;      // [batch - num_decode + 1]: rows of the sequences after the decodes
                                          // (prefill pieces) from the first of them; null when every sequence decodes
  int64_t batch = 0, num_decode = 0;      // sequences, and how many of them lead with one new token each
  int64_t table_width = 0, block_size = 0;
  float scale = 0.f;
  bool bf16 = false;
  int num_threads = 1;
};

// Throws std::invalid_argument on a bad shape or a null required tensor (named), std::runtime_error if a packed
// matmul is declined (no AVX-512 BF16): call only where panels are used.
void decode_layers(const DecodeLayerWeights* layers, int64_t num_layers, const DecodeStepArgs& a);

}  // namespace ettrl
