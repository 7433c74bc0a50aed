// The decoder layers of one step in one call: the same fused ops the Python layer loop calls, in its order. A step is
// decodes (one new token per sequence) first, then prefill pieces (several new tokens per sequence).
#pragma once

#include <cstdint>

namespace ettrl {

// The pointers of one layer, in this order, as one row of DecodeLayersArgs::layers. Matmul weights are packed
// panels (pack_panels); a bias or q/k norm pointer may be null.
enum DecodeLayerPointer : int64_t {
  kInputNorm, kQkv, kQkvBias, kQNorm, kKNorm, kO, kOBias, kPostNorm, kGateUp, kGateUpBias, kDown, kDownBias,
  kKCache, kVCache, kDecodeLayerPointers
};

struct DecodeLayersArgs {
  const uint64_t* layers;  // [num_layers, kDecodeLayerPointers]
  int64_t num_layers;
  void* x;         // [tokens, hidden]: in, the embeddings; out, the last layer's MLP output
  void* residual;  // [tokens, hidden]: out, the residual stream before that output (the final norm adds them)
  void* h;         // scratch [tokens, hidden]
  void* qkv;       // scratch [tokens, (num_heads + 2 num_kv_heads) head_dim]
  void* q;         // scratch [tokens, num_heads head_dim]
  void* attn;      // scratch [tokens, num_heads head_dim]
  void* gate_up;   // scratch [tokens, 2 inter]
  void* act;       // scratch [tokens, inter]
  int64_t tokens, hidden, inter, num_heads, num_kv_heads, head_dim;
  float eps, qk_norm_eps;
  const int64_t* slots;      // [tokens] cache slot of each new token
  const int64_t* positions;  // [tokens]
  const float* cos;          // rotary tables [max_positions, head_dim / 2]
  const float* sin;
  const int64_t* block_tables;  // [batch, table_width]
  const int64_t* kv_lens;       // [batch] keys per sequence, its new tokens included
  const int64_t* q_starts;      // [batch - num_decode + 1]: rows of the sequences after the decodes (prefill
                                // pieces) from the first of them; null when every sequence decodes
  int64_t batch, num_decode;    // sequences, and how many of them lead with one new token each
  int64_t table_width, block_size;
  float scale;
  bool bf16;
  int num_threads;
};

// Throws std::runtime_error if a packed matmul is declined (no AVX-512 BF16): call only where panels are used.
void decode_layers(const DecodeLayersArgs& a);

}  // namespace ettrl
