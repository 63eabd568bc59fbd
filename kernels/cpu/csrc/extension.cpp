// Python bindings of the CPU kernels. They take raw addresses of contiguous CPU buffers that
// kernels/cpu/qmatmul.py has checked (dtype, size, contiguity) and allocated: plain pybind11
// instead of torch/extension.h keeps the first-use compile to seconds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "attention.h"
#include "decode_model.h"
#include "dequant.h"
#include "expert_ffn.h"
#include "matmul.h"
#include "norm.h"

namespace moestream_cpu {
namespace {

template <class T>
T* address(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// y [M, N] = x [M, K] @ W.T for W [N, K] in GGUF blocks of `qtype`.
void qmatmul(uintptr_t x, uintptr_t weight, int64_t qtype, int64_t M, int64_t N, int64_t K, uintptr_t y, bool exact) {
  const Activations act(qtype, address<const float>(x), M, K, exact);
  run_jobs({Job{address<const uint8_t>(weight), qtype, N, K, act.data, M, address<float>(y), N, exact}});
}

// y_i [M, N_i] = x [M, K] @ W_i.T for several matrices of one input (attention q/k/v) in one
// parallel region: x is quantised once per block family, each (weight, qtype, N_i, y_i).
void qmatmul_many(uintptr_t x, int64_t M, int64_t K, const std::vector<std::tuple<uintptr_t, int64_t, int64_t, uintptr_t>>& mats,
                  bool exact) {
  std::vector<Projection> projections;
  for (const auto& [weight, qtype, N, y] : mats)
    projections.push_back(Projection{address<const uint8_t>(weight), qtype, N, address<float>(y)});
  project_rows(projections, address<const float>(x), M, K, exact);
}

void dequantize_weight(uintptr_t weight, int64_t qtype, int64_t N, int64_t K, uintptr_t out) {
  dequantize(address<const uint8_t>(weight), qtype, N, K, address<float>(out));
}

// y [T, D] = down(silu(gate x) * up x) for one expert: gate/up are [I, D], down is [D, I].
// The int8 route quantises x once per block family and the hidden row again for down.
void expert_ffn(uintptr_t x, uintptr_t gate, uintptr_t up, uintptr_t down, int64_t gate_type, int64_t up_type,
                int64_t down_type, int64_t T, int64_t D, int64_t I, uintptr_t y, bool exact) {
  const ExpertRun run{address<const uint8_t>(gate), address<const uint8_t>(up), address<const uint8_t>(down), 0, T};
  const FfnTypes types{gate_type, up_type, down_type};
  run_experts({run}, types, FfnInputs(types, address<const float>(x), T, D, exact), T, D, I, address<float>(y), exact);
}

// out [T, k, D] = route_weights[t, j] * FFN_{ids[t, j]}(x[t]) for every routed expert of a
// layer in one call: x [T, D] float32, ids [T, k] int64, route_weights [T, k] float32.
void moe_layer(uintptr_t x, int64_t T, int64_t D, int64_t I, int64_t k, uintptr_t ids, uintptr_t route_weights,
               const std::vector<LayerExpert>& experts, const std::tuple<int64_t, int64_t, int64_t>& types,
               uintptr_t out, bool exact) {
  const auto [gate_type, up_type, down_type] = types;
  run_moe_layer(address<const float>(x), T, D, I, k, address<const int64_t>(ids),
                address<const float>(route_weights), experts, FfnTypes{gate_type, up_type, down_type},
                address<float>(out), exact);
}

// out [H, hd] = attention of one token's q [H, hd] over ctx cached slots of k and v (float32,
// slot t of KV head j at t * slot_stride + j * hd elements from their bases).
void attend_one_token(uintptr_t q, int64_t H, int64_t hd, uintptr_t k, uintptr_t v, int64_t ctx, int64_t n_kv,
                      int64_t slot_stride, double scale, uintptr_t out) {
  attend_one(address<const float>(q), H, hd, address<const float>(k), address<const float>(v), ctx, n_kv,
             slot_stride, static_cast<float>(scale), address<float>(out));
}

// decode_attention (attention.h) of one token: q [H, hd] and k [KV, hd] are changed in place
// (normed, roped); k_cache / v_cache (fp16 when half_cache, else fp32) point at the context's
// first slot, the new token's last.
void decode_attention_token(uintptr_t q, uintptr_t k, uintptr_t v, int64_t H, int64_t n_kv, int64_t hd,
                            uintptr_t q_norm, uintptr_t k_norm, bool norm_per_head, double eps, uintptr_t cos,
                            uintptr_t signed_sin, int64_t rope_dims, bool neox, uintptr_t k_cache, uintptr_t v_cache,
                            int64_t ctx, int64_t slot_stride, bool half_cache, double scale, uintptr_t out) {
  const DecodeAttention a{H, n_kv, hd, address<const float>(q_norm), address<const float>(k_norm), norm_per_head,
                          static_cast<float>(eps), address<const float>(cos), address<const float>(signed_sin),
                          rope_dims, neox};
  if (half_cache) {
    decode_attention(a, address<float>(q), address<float>(k), address<const float>(v), address<c10::Half>(k_cache),
                     address<c10::Half>(v_cache), ctx, slot_stride, static_cast<float>(scale), address<float>(out));
  } else {
    decode_attention(a, address<float>(q), address<float>(k), address<const float>(v), address<float>(k_cache),
                     address<float>(v_cache), ctx, slot_stride, static_cast<float>(scale), address<float>(out));
  }
}

// h_out = h + delta (no delta: 0), x_out = RMSNorm(h_out) * w, rows of D (norm.h).
void add_rms_norm_rows(uintptr_t h, uintptr_t delta, uintptr_t w, int64_t M, int64_t D, double eps, uintptr_t h_out,
                       uintptr_t x_out) {
  add_rms_norm(address<const float>(h), address<const float>(delta), address<const float>(w), M, D,
               static_cast<float>(eps), address<float>(h_out), address<float>(x_out));
}

// A DecodeModel from Python's description: dims (D, H, KV, hd, I, E, top_k, rope_dims), flags
// (norm_per_head, neox, exact_linear, exact_experts, sigmoid, norm_topk), and per layer 31
// integers: the addresses and sizes of DecodeLayer's fields in order (QLinear: weight, qtype,
// N, bias; absent pointers 0), the experts' gate, up and down types last.
DecodeModel make_decode_model(const std::vector<int64_t>& dims, const std::vector<bool>& flags, double eps,
                              double weights_scale, const std::vector<std::vector<int64_t>>& layers) {
  if (dims.size() != 8 || flags.size() != 6) throw std::invalid_argument("DecodeModel: 8 dims and 6 flags");
  DecodeModel m;
  m.D = dims[0], m.H = dims[1], m.n_kv = dims[2], m.hd = dims[3], m.I = dims[4], m.E = dims[5], m.top_k = dims[6];
  m.rope_dims = dims[7];
  m.norm_per_head = flags[0], m.neox = flags[1], m.exact_linear = flags[2], m.exact_experts = flags[3];
  m.sigmoid = flags[4], m.norm_topk = flags[5];
  m.eps = static_cast<float>(eps);
  m.weights_scale = static_cast<float>(weights_scale);
  for (const auto& f : layers) {
    if (f.size() != 31) throw std::invalid_argument("DecodeModel: 31 fields per layer");
    auto lin = [&](int i) {
      return QLinear{address<const uint8_t>(f[i]), f[i + 1], f[i + 2], address<const float>(f[i + 3])};
    };
    m.layers.push_back(DecodeLayer{address<const float>(f[0]), address<const float>(f[1]), lin(2), lin(6), lin(10),
                                   lin(14), address<const float>(f[18]), address<const float>(f[19]),
                                   address<const float>(f[20]), address<const float>(f[21]),
                                   address<const uint8_t>(f[22]), address<const uint8_t>(f[23]),
                                   address<const uint8_t>(f[24]), f[25], f[26], f[27],
                                   FfnTypes{f[28], f[29], f[30]}});
  }
  return m;
}

// Rope frequencies and position scale; the output norm and lm_head (weight 0: none).
void set_decode_ends(DecodeModel& m, const std::vector<double>& inv_freq, double rope_scale, uintptr_t output_norm,
                     uintptr_t lm_weight, int64_t lm_type, int64_t vocab) {
  if (int64_t(inv_freq.size()) != m.rope_dims / 2) throw std::invalid_argument("DecodeModel: rope_dims / 2 frequencies");
  m.inv_freq = inv_freq;
  m.rope_scale = rope_scale;
  m.output_norm = address<const float>(output_norm);
  m.lm_head = QLinear{address<const uint8_t>(lm_weight), lm_type, vocab, nullptr};
}

void run_decode_model(const DecodeModel& m, uintptr_t h, uintptr_t k_cache, uintptr_t v_cache, bool half_cache,
                      int64_t layer_stride, int64_t slot_stride, int64_t slot0, int64_t ctx, int64_t position,
                      uintptr_t slot_ids, uintptr_t ids, uintptr_t weights, uintptr_t logits, uintptr_t seconds) {
  if (int64_t(m.inv_freq.size()) != m.rope_dims / 2) throw std::invalid_argument("DecodeModel: rope not set");
  if (half_cache)
    m.run(address<float>(h), address<c10::Half>(k_cache), address<c10::Half>(v_cache), layer_stride, slot_stride,
          slot0, ctx, position, address<const int64_t>(slot_ids), address<int64_t>(ids), address<float>(weights),
          address<float>(logits), address<double>(seconds));
  else
    m.run(address<float>(h), address<float>(k_cache), address<float>(v_cache), layer_stride, slot_stride, slot0,
          ctx, position, address<const int64_t>(slot_ids), address<int64_t>(ids), address<float>(weights),
          address<float>(logits), address<double>(seconds));
}

std::vector<int64_t> supported_types() {
  std::vector<int64_t> types;
  for (int64_t t = 0; t < 64; ++t)
    if (with_format(t, [](auto) {})) types.push_back(t);
  return types;
}

}  // namespace
}  // namespace moestream_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "moestream CPU kernels: matmuls straight from GGUF blocks (raw addresses, checked by the caller)";
  // The kernels release the GIL: other Python threads (the HTTP server) keep running.
  m.def("qmatmul", &moestream_cpu::qmatmul, py::call_guard<py::gil_scoped_release>());
  m.def("qmatmul_many", &moestream_cpu::qmatmul_many, py::call_guard<py::gil_scoped_release>());
  m.def("dequantize", &moestream_cpu::dequantize_weight, py::call_guard<py::gil_scoped_release>());
  m.def("expert_ffn", &moestream_cpu::expert_ffn, py::call_guard<py::gil_scoped_release>());
  m.def("moe_layer", &moestream_cpu::moe_layer, py::call_guard<py::gil_scoped_release>());
  m.def("attend_one", &moestream_cpu::attend_one_token, py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention", &moestream_cpu::decode_attention_token, py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm", &moestream_cpu::add_rms_norm_rows, py::call_guard<py::gil_scoped_release>());
  m.def("supported_types", &moestream_cpu::supported_types);
  py::class_<moestream_cpu::DecodeModel>(m, "DecodeModel", py::module_local())
      .def(py::init(&moestream_cpu::make_decode_model))
      .def("set_ends", &moestream_cpu::set_decode_ends)
      .def("run", &moestream_cpu::run_decode_model, py::call_guard<py::gil_scoped_release>());
  m.attr("isa") = moestream_cpu::ISA;
}
