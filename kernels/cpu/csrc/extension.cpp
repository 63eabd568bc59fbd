// Python bindings of the CPU kernels. They take raw addresses of contiguous CPU buffers that
// kernels/cpu/qmatmul.py has checked (dtype, size, contiguity) and allocated: plain pybind11
// instead of torch/extension.h keeps the first-use compile to seconds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>

#include "dequant.h"
#include "matmul.h"

namespace moestream_cpu {
namespace {

template <class T>
T* address(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Activation rows as the route reads them: float32 as they are (exact), else int8 blocks.
struct Activations {
  QuantizedRows quantized;
  const void* data;

  Activations(int64_t qtype, const float* x, int64_t M, int64_t K, bool exact)
      : quantized(exact ? QuantizedRows{} : quantize_for(qtype, x, M, K, K)),
        data(exact ? static_cast<const void*>(x) : quantized.data) {}
};

// y [M, N] = x [M, K] @ W.T for W [N, K] in GGUF blocks of `qtype`.
void qmatmul(uintptr_t x, uintptr_t weight, int64_t qtype, int64_t M, int64_t N, int64_t K, uintptr_t y, bool exact) {
  const Activations act(qtype, address<const float>(x), M, K, exact);
  run_jobs({Job{address<const uint8_t>(weight), qtype, N, K, act.data, M, address<float>(y), N, exact}});
}

void dequantize_weight(uintptr_t weight, int64_t qtype, int64_t N, int64_t K, uintptr_t out) {
  dequantize(address<const uint8_t>(weight), qtype, N, K, address<float>(out));
}

int64_t block_size_of(int64_t qtype) {
  int64_t size = 0;
  with_format(qtype, [&](auto fmt) { size = decltype(fmt)::block_size; });
  return size;
}

// y [T, D] = down(silu(gate x) * up x) for one expert: gate/up are [I, D], down is [D, I].
// The int8 route quantises x once per block family and the hidden row again for down.
void expert_ffn(uintptr_t x, uintptr_t gate, uintptr_t up, uintptr_t down, int64_t gate_type, int64_t up_type,
                int64_t down_type, int64_t T, int64_t D, int64_t I, uintptr_t y, bool exact) {
  const float* rows = address<const float>(x);
  const Activations x_gate(gate_type, rows, T, D, exact);
  const bool shared = exact || block_size_of(gate_type) == block_size_of(up_type);
  const Activations x_up(up_type, rows, shared ? 0 : T, D, exact);
  std::vector<float> h(T * 2 * I);  // [T, gate | up]
  run_jobs({Job{address<const uint8_t>(gate), gate_type, I, D, x_gate.data, T, h.data(), 2 * I, exact},
            Job{address<const uint8_t>(up), up_type, I, D, (shared ? x_gate : x_up).data, T, h.data() + I, 2 * I,
                exact}});
  std::vector<float> a(T * I);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) {
      const float g = h[t * 2 * I + i];
      a[t * I + i] = g / (1.0f + std::exp(-g)) * h[t * 2 * I + I + i];
    }
  const Activations act(down_type, a.data(), T, I, exact);
  run_jobs({Job{address<const uint8_t>(down), down_type, D, I, act.data, T, address<float>(y), D, exact}});
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
  m.def("dequantize", &moestream_cpu::dequantize_weight, py::call_guard<py::gil_scoped_release>());
  m.def("expert_ffn", &moestream_cpu::expert_ffn, py::call_guard<py::gil_scoped_release>());
  m.def("supported_types", &moestream_cpu::supported_types);
  m.attr("isa") = moestream_cpu::ISA;
}
