// Python bindings of the C++ kernels: module `ettrl_kernels._C` (the engine's bookkeeping is in bindings_engine.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

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

// The fused layer stack's contract by name: each field of DecodeLayerWeights and DecodeStepArgs is an attribute of
// the same name (pointers as ints, from tensor.data_ptr()), and `fields` lists them, so engine/layers/decode_layers.py
// fills every one by name and a field added or renamed on either side fails there by its name.
template <typename S, typename P>
static void pointer_field(py::class_<S>& cls, std::vector<std::string>& fields, const char* name, P S::*member) {
  cls.def_property(
      name, [member](const S& s) { return reinterpret_cast<uintptr_t>(s.*member); },
      [member](S& s, uintptr_t p) { s.*member = reinterpret_cast<P>(p); });
  fields.emplace_back(name);
}

template <typename S, typename V>
static void value_field(py::class_<S>& cls, std::vector<std::string>& fields, const char* name, V S::*member) {
  cls.def_readwrite(name, member);
  fields.emplace_back(name);
}

template <typename S, typename M>
using Fields = std::initializer_list<std::pair<const char*, M S::*>>;

// The layers of a model, held on the C++ side: built once (when weights, ops or the KV pool change), passed each step.
struct DecodeLayerTable {
  std::vector<ettrl::DecodeLayerWeights> layers;
};

static void bind_decode_layers(py::module_& m) {
  using W = ettrl::DecodeLayerWeights;
  using A = ettrl::DecodeStepArgs;
  py::class_<W> weights(m, "DecodeLayerWeights", "One decoder layer's tensors by name (csrc/decode_layers.h)");
  weights.def(py::init<>());
  std::vector<std::string> names;
  for (auto [name, member] : Fields<W, const void*>{
           {"input_norm", &W::input_norm}, {"qkv", &W::qkv}, {"qkv_bias", &W::qkv_bias}, {"q_norm", &W::q_norm},
           {"k_norm", &W::k_norm}, {"o", &W::o}, {"o_bias", &W::o_bias}, {"post_norm", &W::post_norm},
           {"gate_up", &W::gate_up}, {"gate_up_bias", &W::gate_up_bias}, {"down", &W::down},
           {"down_bias", &W::down_bias}})
    pointer_field(weights, names, name, member);
  for (auto [name, member] : Fields<W, void*>{{"k_cache", &W::k_cache}, {"v_cache", &W::v_cache}})
    pointer_field(weights, names, name, member);
  weights.attr("fields") = py::tuple(py::cast(names));

  py::class_<A> step(m, "DecodeStepArgs", "One step of the fused layer stack by name (csrc/decode_layers.h)");
  step.def(py::init<>());
  names.clear();
  for (auto [name, member] : Fields<A, void*>{{"x", &A::x}, {"residual", &A::residual}, {"h", &A::h},
                                              {"qkv", &A::qkv}, {"q", &A::q}, {"attn", &A::attn},
                                              {"gate_up", &A::gate_up}, {"act", &A::act}})
    pointer_field(step, names, name, member);
  for (auto [name, member] : Fields<A, int64_t>{
           {"tokens", &A::tokens}, {"hidden", &A::hidden}, {"inter", &A::inter}, {"num_heads", &A::num_heads},
           {"num_kv_heads", &A::num_kv_heads}, {"head_dim", &A::head_dim}, {"batch", &A::batch},
           {"num_decode", &A::num_decode}, {"table_width", &A::table_width}, {"block_size", &A::block_size}})
    value_field(step, names, name, member);
  for (auto [name, member] : Fields<A, float>{{"eps", &A::eps}, {"qk_norm_eps", &A::qk_norm_eps},
                                              {"scale", &A::scale}})
    value_field(step, names, name, member);
  for (auto [name, member] : Fields<A, const int64_t*>{{"slots", &A::slots}, {"positions", &A::positions},
                                                       {"block_tables", &A::block_tables},
                                                       {"kv_lens", &A::kv_lens}, {"q_starts", &A::q_starts}})
    pointer_field(step, names, name, member);
  for (auto [name, member] : Fields<A, const float*>{{"cos", &A::cos}, {"sin", &A::sin}})
    pointer_field(step, names, name, member);
  value_field(step, names, "bf16", &A::bf16);
  value_field(step, names, "num_threads", &A::num_threads);
  step.attr("fields") = py::tuple(py::cast(names));

  py::class_<DecodeLayerTable>(m, "DecodeLayerTable", "A model's DecodeLayerWeights, first layer first")
      .def(py::init([](std::vector<W> layers) { return DecodeLayerTable{std::move(layers)}; }), py::arg("layers"))
      .def("__len__", [](const DecodeLayerTable& t) { return t.layers.size(); });
  m.def(
      "decode_layers",
      [](const DecodeLayerTable& table, const A& args) {
        py::gil_scoped_release release;
        ettrl::decode_layers(table.layers.data(), static_cast<int64_t>(table.layers.size()), args);
      },
      py::arg("layers"), py::arg("args"), "Every decoder layer of one step: a DecodeLayerTable and DecodeStepArgs");
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
  bind_decode_layers(m);
}
