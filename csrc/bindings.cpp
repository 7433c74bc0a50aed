// Python bindings of the C++ kernels: module `ettrl_kernels._C` (the engine's bookkeeping is in bindings_engine.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "decode_layers.h"
#include "entropy_sample.h"
#include "fused_ops.h"
#include "paged_attention.h"
#include "panel_linear.h"

namespace py = pybind11;
// Raw data pointers (tensor.data_ptr()): the extension does not link against torch. kernels/attention_torch.py
// checks dtypes, devices, shapes and contiguity before calling.
static void paged_decode_attention(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out,
                                   uintptr_t block_tables, uintptr_t kv_lens, int64_t batch, int64_t num_heads,
                                   int64_t num_kv_heads, int64_t head_dim, int64_t table_width, int64_t block_size,
                                   float scale, bool bf16, int num_threads) {
  ettrl::DecodeAttentionArgs a{reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k_cache),
                               reinterpret_cast<const void*>(v_cache), reinterpret_cast<void*>(out),
                               reinterpret_cast<const int64_t*>(block_tables), reinterpret_cast<const int64_t*>(kv_lens),
                               batch, num_heads, num_kv_heads, head_dim, table_width, block_size, scale, bf16,
                               num_threads};
  py::gil_scoped_release release;
  ettrl::paged_decode_attention(a);
}

template <typename T = void>
static T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

static void paged_prefill_attention(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out,
                                    uintptr_t block_tables, uintptr_t q_starts, uintptr_t kv_lens, int64_t batch,
                                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t table_width,
                                    int64_t block_size, float scale, bool bf16, int num_threads) {
  ettrl::PrefillAttentionArgs a{ptr<const void>(q), ptr<const void>(k_cache), ptr<const void>(v_cache), ptr(out),
                                ptr<const int64_t>(block_tables), ptr<const int64_t>(q_starts),
                                ptr<const int64_t>(kv_lens), batch, num_heads, num_kv_heads, head_dim, table_width,
                                block_size, scale, bf16, num_threads};
  py::gil_scoped_release release;
  ettrl::paged_prefill_attention(a);
}

static void residual_rms_norm(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t out, int64_t rows,
                              int64_t dim, float eps, bool bf16, int num_threads) {
  py::gil_scoped_release release;
  ettrl::residual_rms_norm(ptr(x), ptr(residual), ptr(weight), ptr(out), rows, dim, eps, bf16, num_threads);
}

static void rope_and_cache(uintptr_t qkv, uintptr_t q_out, uintptr_t k_cache, uintptr_t v_cache, uintptr_t slots,
                           uintptr_t positions, uintptr_t cos, uintptr_t sin, uintptr_t q_norm, uintptr_t k_norm,
                           float norm_eps, int64_t tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           bool bf16, int num_threads) {
  ettrl::RopeCacheArgs a{ptr(qkv), ptr(q_out), ptr(k_cache), ptr(v_cache), ptr<const int64_t>(slots),
                         ptr<const int64_t>(positions), ptr<const float>(cos), ptr<const float>(sin), ptr(q_norm),
                         ptr(k_norm), norm_eps, tokens, num_heads, num_kv_heads, head_dim, bf16, num_threads};
  py::gil_scoped_release release;
  ettrl::rope_and_cache(a);
}

static void silu_and_mul(uintptr_t gate_up, uintptr_t out, int64_t rows, int64_t inter, bool bf16, int num_threads) {
  py::gil_scoped_release release;
  ettrl::silu_and_mul(ptr(gate_up), ptr(out), rows, inter, bf16, num_threads);
}

static void entropy_sample(uintptr_t logits, uintptr_t inv_temp, uintptr_t greedy, uintptr_t keys, uintptr_t exclude,
                           uintptr_t tokens, uintptr_t logprobs, uintptr_t entropies, int64_t batch, int64_t vocab,
                           int num_threads) {
  ettrl::EntropySampleArgs a{ptr<const float>(logits), ptr<const float>(inv_temp), ptr<const uint8_t>(greedy),
                             ptr<const int32_t>(keys), ptr<const int64_t>(exclude), ptr<int64_t>(tokens),
                             ptr<float>(logprobs), ptr<float>(entropies), batch, vocab, num_threads};
  py::gil_scoped_release release;
  ettrl::entropy_sample_rows(a);
}

static void pack_panels(uintptr_t w, uintptr_t dst, int64_t out, int64_t in, bool bf16) {
  py::gil_scoped_release release;
  ettrl::pack_panels(ptr(w), ptr(dst), out, in, bf16);
}

static bool panel_linear(uintptr_t x, uintptr_t packed, uintptr_t bias, uintptr_t y, int64_t rows, int64_t in,
                         int64_t out, bool bf16, int num_threads, bool fp32_out) {
  py::gil_scoped_release release;
  return ettrl::panel_linear(ptr(x), ptr(packed), ptr(bias), ptr(y), rows, in, out, bf16, num_threads, fp32_out);
}

static void decode_layers(uintptr_t layers, int64_t num_layers, uintptr_t x, uintptr_t residual, uintptr_t h,
                          uintptr_t qkv, uintptr_t q, uintptr_t attn, uintptr_t gate_up, uintptr_t act, int64_t tokens,
                          int64_t hidden, int64_t inter, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                          float eps, float qk_norm_eps, uintptr_t slots, uintptr_t positions, uintptr_t cos,
                          uintptr_t sin, uintptr_t block_tables, uintptr_t kv_lens, uintptr_t q_starts, int64_t batch,
                          int64_t num_decode, int64_t table_width, int64_t block_size, float scale, bool bf16,
                          int num_threads) {
  ettrl::DecodeLayersArgs a{ptr<const uint64_t>(layers), num_layers, ptr(x), ptr(residual), ptr(h), ptr(qkv), ptr(q),
                            ptr(attn), ptr(gate_up), ptr(act), tokens, hidden, inter, num_heads, num_kv_heads,
                            head_dim, eps, qk_norm_eps, ptr<const int64_t>(slots), ptr<const int64_t>(positions),
                            ptr<const float>(cos), ptr<const float>(sin), ptr<const int64_t>(block_tables),
                            ptr<const int64_t>(kv_lens), ptr<const int64_t>(q_starts), batch, num_decode,
                            table_width, block_size, scale, bf16, num_threads};
  py::gil_scoped_release release;
  ettrl::decode_layers(a);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ETTRL C++ kernels (CPU): paged decode and prefill attention, fused layer ops, panel matmuls, decode layer stack, entropy_sample";
  m.def("paged_decode_attention", &paged_decode_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("out"), py::arg("block_tables"), py::arg("kv_lens"), py::arg("batch"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("table_width"), py::arg("block_size"),
        py::arg("scale"), py::arg("bf16"), py::arg("num_threads"));
  m.def("paged_prefill_attention", &paged_prefill_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("out"), py::arg("block_tables"), py::arg("q_starts"), py::arg("kv_lens"), py::arg("batch"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("table_width"),
        py::arg("block_size"), py::arg("scale"), py::arg("bf16"), py::arg("num_threads"));
  m.def("residual_rms_norm", &residual_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("out"),
        py::arg("rows"), py::arg("dim"), py::arg("eps"), py::arg("bf16"), py::arg("num_threads"));
  m.def("rope_and_cache", &rope_and_cache, py::arg("qkv"), py::arg("q_out"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slots"), py::arg("positions"), py::arg("cos"), py::arg("sin"), py::arg("q_norm"), py::arg("k_norm"),
        py::arg("norm_eps"), py::arg("tokens"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("bf16"), py::arg("num_threads"));
  m.def("entropy_sample", &entropy_sample, py::arg("logits"), py::arg("inv_temp"), py::arg("greedy"), py::arg("keys"),
        py::arg("exclude"), py::arg("tokens"), py::arg("logprobs"), py::arg("entropies"), py::arg("batch"),
        py::arg("vocab"), py::arg("num_threads"));
  m.def("panel_packed_elements", &ettrl::panel_packed_elements, py::arg("out_features"), py::arg("in_features"),
        py::arg("bf16"));
  m.def("pack_panels", &pack_panels, py::arg("w"), py::arg("dst"), py::arg("out_features"), py::arg("in_features"),
        py::arg("bf16"));
  m.def("panel_linear", &panel_linear, py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("y"), py::arg("rows"),
        py::arg("in_features"), py::arg("out_features"), py::arg("bf16"), py::arg("num_threads"),
        py::arg("fp32_out") = false);
  m.def("panel_linear_available", &ettrl::panel_linear_available);
  m.def("silu_and_mul", &silu_and_mul, py::arg("gate_up"), py::arg("out"), py::arg("rows"), py::arg("inter"),
        py::arg("bf16"), py::arg("num_threads"));
  m.def("decode_layers", &decode_layers, py::arg("layers"), py::arg("num_layers"), py::arg("x"), py::arg("residual"),
        py::arg("h"), py::arg("qkv"), py::arg("q"), py::arg("attn"), py::arg("gate_up"), py::arg("act"),
        py::arg("tokens"), py::arg("hidden"), py::arg("inter"), py::arg("num_heads"), py::arg("num_kv_heads"),
        py::arg("head_dim"), py::arg("eps"), py::arg("qk_norm_eps"), py::arg("slots"), py::arg("positions"),
        py::arg("cos"), py::arg("sin"), py::arg("block_tables"), py::arg("kv_lens"), py::arg("q_starts"),
        py::arg("batch"), py::arg("num_decode"), py::arg("table_width"), py::arg("block_size"), py::arg("scale"),
        py::arg("bf16"), py::arg("num_threads"));
  m.def("decode_layer_pointers", [] { return static_cast<int64_t>(ettrl::kDecodeLayerPointers); });
}
