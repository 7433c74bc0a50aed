"""CPU kernel wrappers the models are built from: packed and panel matmuls (packed_linear, matmul_choice), the fused
layer ops (fused_ops), rotary embeddings (rope) and the whole decoder stack in one C++ call (decode_layers)."""
