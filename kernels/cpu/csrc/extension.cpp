// Python bindings of the CPU kernels: shape/dtype checks, then the plain-pointer kernels.
#include <torch/extension.h>

#include <cmath>

#include "dequant.h"
#include "matmul.h"

namespace moestream_cpu {
namespace {

int64_t block_size_of(int64_t qtype) {
  int64_t size = 0;
  TORCH_CHECK(with_format(qtype, [&](auto fmt) { size = decltype(fmt)::block_size; }),
              "no CPU kernel for GGML type ", qtype);
  return size;
}

int64_t type_size_of(int64_t qtype) {
  int64_t size = 0;
  with_format(qtype, [&](auto fmt) { size = decltype(fmt)::type_size; });
  return size;
}

void check_weight(const torch::Tensor& weight, int64_t qtype, int64_t N, int64_t K) {
  const int64_t block = block_size_of(qtype);
  TORCH_CHECK(K % block == 0, "K = ", K, " is not a multiple of the block size ", block);
  TORCH_CHECK(weight.device().is_cpu() && weight.dtype() == torch::kUInt8 && weight.is_contiguous(),
              "weight must be contiguous uint8 GGUF bytes on the CPU");
  TORCH_CHECK(weight.numel() == N * (K / block) * type_size_of(qtype), "weight holds ", weight.numel(),
              " bytes, shape (", N, ", ", K, ") needs ", N * (K / block) * type_size_of(qtype));
}

void check_rows(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] CPU tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight has K = ", K);
}

Job job_for(const torch::Tensor& weight, int64_t qtype, int64_t N, int64_t K, const QuantizedRows& act,
            int64_t M, float* y, int64_t ldy) {
  return Job{weight.data_ptr<uint8_t>(), qtype, N, K, act.data, M, y, ldy};
}

torch::Tensor qmatmul(const torch::Tensor& x, const torch::Tensor& weight, int64_t qtype, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  check_rows(x, K);
  check_weight(weight, qtype, N, K);
  torch::Tensor y = torch::empty({M, N}, x.options());
  const QuantizedRows act = quantize_for(qtype, x.data_ptr<float>(), M, K, K);
  run_jobs({job_for(weight, qtype, N, K, act, M, y.data_ptr<float>(), N)});
  return y;
}

torch::Tensor dequantize_weight(const torch::Tensor& weight, int64_t qtype, int64_t N, int64_t K) {
  check_weight(weight, qtype, N, K);
  torch::Tensor out = torch::empty({N, K}, torch::kFloat32);
  dequantize(weight.data_ptr<uint8_t>(), qtype, N, K, out.data_ptr<float>());
  return out;
}

// down(silu(gate x) * up x) for one expert: gate/up are [I, D], down is [D, I].
torch::Tensor expert_ffn(const torch::Tensor& x, const torch::Tensor& gate, const torch::Tensor& up,
                         const torch::Tensor& down, int64_t gate_type, int64_t up_type, int64_t down_type,
                         int64_t I) {
  const int64_t T = x.size(0), D = x.size(1);
  check_rows(x, D);
  check_weight(gate, gate_type, I, D);
  check_weight(up, up_type, I, D);
  check_weight(down, down_type, D, I);
  const QuantizedRows x_gate = quantize_for(gate_type, x.data_ptr<float>(), T, D, D);
  const bool same_family = block_size_of(gate_type) == block_size_of(up_type);
  const QuantizedRows x_up = same_family ? QuantizedRows{} : quantize_for(up_type, x.data_ptr<float>(), T, D, D);
  std::vector<float> h(T * 2 * I);  // [T, gate | up]
  run_jobs({job_for(gate, gate_type, I, D, x_gate, T, h.data(), 2 * I),
            job_for(up, up_type, I, D, same_family ? x_gate : x_up, T, h.data() + I, 2 * I)});
  std::vector<float> a(T * I);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) {
      const float g = h[t * 2 * I + i];
      a[t * I + i] = g / (1.0f + std::exp(-g)) * h[t * 2 * I + I + i];
    }
  torch::Tensor y = torch::empty({T, D}, x.options());
  const QuantizedRows act = quantize_for(down_type, a.data(), T, I, I);
  run_jobs({job_for(down, down_type, D, I, act, T, y.data_ptr<float>(), D)});
  return y;
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
  m.doc() = "moestream CPU kernels: matmuls straight from GGUF blocks";
  m.def("qmatmul", &moestream_cpu::qmatmul, "y [M, N] = x [M, K] @ W.T from GGUF bytes of W [N, K]");
  m.def("dequantize", &moestream_cpu::dequantize_weight, "GGUF bytes of W [N, K] -> float32 [N, K]");
  m.def("expert_ffn", &moestream_cpu::expert_ffn, "down(silu(gate x) * up x) for one expert");
  m.def("supported_types", &moestream_cpu::supported_types, "GGML type ids with a CPU kernel");
  m.attr("isa") = moestream_cpu::ISA;
}
