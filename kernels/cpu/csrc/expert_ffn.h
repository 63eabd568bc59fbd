// SwiGLU expert FFNs, y = down(silu(gate x) * up x), straight from GGUF blocks: one expert
// (expert_ffn) or every routed expert of a MoE layer in one call (moe_layer). Both run the
// same jobs on the same activation rows, so a layer's results are bitwise those of its
// experts run one by one.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <vector>

#include "matmul.h"
#include "vec.h"

namespace moestream_cpu {

// Bytes of one activation row of K elements as the route reads it.
inline int64_t act_row_bytes(int64_t qtype, int64_t K, bool exact) {
  int64_t bytes = K * int64_t(sizeof(float));
  if (!exact)
    with_format(qtype, [&](auto fmt) {
      if constexpr (std::is_same_v<typename decltype(fmt)::Act, Act256>)
        bytes = K / QK * int64_t(sizeof(Act256));
      else
        bytes = K / QB * int64_t(sizeof(Act32));
    });
  return bytes;
}

// A grow-only buffer kept by the calling thread across calls: a prefill's MoE layer needs
// tens of MB of rows, which as fresh allocations cost page faults and zeroing in every layer
// (~5% of a Qwen3-30B-A3B prefill here). Contents are not initialised.
template <class T, int Slot>
T* scratch(int64_t n) {
  thread_local std::unique_ptr<T[]> data;
  thread_local int64_t size = 0;
  if (n > size) {
    data.reset(new T[n]);
    size = n;
  }
  return data.get();
}

template <class Act, class Rows>
auto& blocks_of(Rows& rows) {
  if constexpr (std::is_same_v<Act, Act256>)
    return rows.k;
  else
    return rows.legacy;
}

// Rows `src` of quantised rows (row m of the result is row src[m]), block by block.
inline QuantizedRows gather_rows(int64_t qtype, const QuantizedRows& from, const int64_t* src, int64_t M, int64_t K) {
  QuantizedRows out;
  with_format(qtype, [&](auto fmt) {
    using F = decltype(fmt);
    using Act = typename F::Act;
    const int64_t nb = K / F::block_size;
    const std::vector<Act>& in = blocks_of<Act>(from);
    std::vector<Act>& rows = blocks_of<Act>(out);
    rows.resize(M * nb);
    at::parallel_for(0, M, std::max<int64_t>(1, QUANTIZE_GRAIN / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) std::copy_n(in.begin() + src[m] * nb, nb, rows.begin() + m * nb);
    });
    out.data = rows.data();
  });
  return out;
}

// Activation rows as the route reads them: float32 as they are (exact), else int8 blocks.
// Rows are quantised independently, so any run of them serves as a job's activations. With
// `src`, row m is row src[m] of x [T, K]: the T rows are quantised once and their blocks
// copied (a prefill's MoE layer stacks each token's row once per routed expert).
struct Activations {
  QuantizedRows quantized;
  const void* data;
  int64_t row_bytes;

  Activations(int64_t qtype, const float* x, int64_t M, int64_t K, bool exact)
      : quantized(exact ? QuantizedRows{} : quantize_for(qtype, x, M, K, K)),
        data(exact ? static_cast<const void*>(x) : quantized.data),
        row_bytes(act_row_bytes(qtype, K, exact)) {}

  Activations(int64_t qtype, const float* x, int64_t T, int64_t K, const int64_t* src, int64_t M)
      : quantized(gather_rows(qtype, quantize_for(qtype, x, T, K, K), src, M, K)),
        data(quantized.data),
        row_bytes(act_row_bytes(qtype, K, false)) {}

  const void* row(int64_t m) const { return static_cast<const uint8_t*>(data) + m * row_bytes; }
};

inline int64_t block_size_of(int64_t qtype) {
  int64_t size = 0;
  with_format(qtype, [&](auto fmt) { size = decltype(fmt)::block_size; });
  return size;
}

// One matrix of a projection of shared input rows: W [N, K] of qtype, y [M, N].
struct Projection {
  const uint8_t* weight;
  int64_t qtype, N;
  float* y;
};

// y_i = x W_i^T for several matrices of one input x [M, K] (an attention layer's q, k and v)
// in one parallel region, x quantised once per block family.
inline void project_rows(const std::vector<Projection>& mats, const float* x, int64_t M, int64_t K, bool exact) {
  std::vector<Activations> acts;  // one per block family: at most two
  std::vector<int64_t> families;
  acts.reserve(mats.size());
  std::vector<Job> jobs;
  for (const Projection& p : mats) {
    const int64_t family = exact ? 0 : block_size_of(p.qtype);
    auto found = std::find(families.begin(), families.end(), family);
    if (found == families.end()) {
      families.push_back(family);
      acts.emplace_back(p.qtype, x, M, K, exact);
      found = families.end() - 1;
    }
    jobs.push_back(Job{p.weight, p.qtype, p.N, K, acts[found - families.begin()].data, M, p.y, p.N, exact});
  }
  run_jobs(jobs);
}

struct FfnTypes {
  int64_t gate, up, down;
};

// Rows x [R, D] quantised once per block family; gate and up share them when they can.
struct FfnInputs {
  Activations gate;
  Activations up_own;
  bool shared;

  FfnInputs(const FfnTypes& types, const float* x, int64_t R, int64_t D, bool exact)
      : gate(types.gate, x, R, D, exact),
        up_own(types.up, x, shared_input(types, exact) ? 0 : R, D, exact),
        shared(shared_input(types, exact)) {}

  // Rows src[0..R) of x [T, D], on the int8 route.
  FfnInputs(const FfnTypes& types, const float* x, int64_t T, int64_t D, const int64_t* src, int64_t R)
      : gate(types.gate, x, T, D, src, R),
        up_own(types.up, x, shared_input(types, false) ? 0 : T, D, src, shared_input(types, false) ? 0 : R),
        shared(shared_input(types, false)) {}

  const Activations& up() const { return shared ? gate : up_own; }

  static bool shared_input(const FfnTypes& types, bool exact) {
    return exact || block_size_of(types.gate) == block_size_of(types.up);
  }
};

// a[r, i] = silu(h[r, i]) * h[r, I + i] for hidden rows h [R, gate | up]: g / (1 + e^-g) * u,
// in vector lanes where there are some (vec.h's exp, ~1e-7 relative: a prefill's MoE layer
// takes a million of them).
inline void silu_product(const float* h, int64_t I, int64_t r0, int64_t r1, float* a) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gate = h + r * 2 * I;
    const float* up = gate + I;
    float* out = a + r * I;
    int64_t i = 0;
#ifdef MOESTREAM_VEC
    for (; i + VEC <= I; i += VEC) {
      const VecF g = vload(gate + i);
      const VecF silu = vdiv(g, vadd(vset(1.0f), vexp(vsub(vzero(), g))));
      vstore(out + i, vmul(silu, vload(up + i)));
    }
#endif
    for (; i < I; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

// Hidden rows per parallel task of the SiLU product: a decode step's few rows stay on one
// core (a fork costs more than they do).
constexpr int64_t SILU_ROWS = 16;

// One expert's rows [r0, r0 + M) of a layer's stacked activations, and its three matrices.
struct ExpertRun {
  const uint8_t *gate, *up, *down;
  int64_t r0, M;
};

// y [R, D] for stacked rows x [R, D]: each run's rows through its expert. Gate and up of all
// runs form one parallel region, down of all runs a second.
inline void run_experts(const std::vector<ExpertRun>& runs, const FfnTypes& types, const FfnInputs& in, int64_t R,
                        int64_t D, int64_t I, float* y, bool exact) {
  float* h = scratch<float, 0>(R * 2 * I);  // [R, gate | up]
  std::vector<Job> jobs;
  for (const ExpertRun& e : runs) {
    jobs.push_back(Job{e.gate, types.gate, I, D, in.gate.row(e.r0), e.M, h + e.r0 * 2 * I, 2 * I, exact});
    jobs.push_back(Job{e.up, types.up, I, D, in.up().row(e.r0), e.M, h + e.r0 * 2 * I + I, 2 * I, exact});
  }
  run_jobs(jobs);
  float* a = scratch<float, 1>(R * I);
  at::parallel_for(0, R, SILU_ROWS, [&](int64_t r0, int64_t r1) { silu_product(h, I, r0, r1, a); });
  const Activations hidden(types.down, a, R, I, exact);
  jobs.clear();
  for (const ExpertRun& e : runs)
    jobs.push_back(Job{e.down, types.down, D, I, hidden.row(e.r0), e.M, y + e.r0 * D, D, exact});
  run_jobs(jobs);
}

// (expert id, gate, up, down addresses) of one routed expert of a layer.
using LayerExpert = std::tuple<int64_t, uintptr_t, uintptr_t, uintptr_t>;

// out [T, k, D]: out[t, j] = route_weight[t, j] * FFN_{ids[t, j]}(x[t]). Each expert's rows
// are its (t, j) pairs in row-major order, as torch.nonzero lists them.
inline void run_moe_layer(const float* x, int64_t T, int64_t D, int64_t I, int64_t k, const int64_t* ids,
                          const float* route_weights, const std::vector<LayerExpert>& experts,
                          const FfnTypes& types, float* out, bool exact) {
  std::vector<int64_t> pairs;  // (t, j) pair t * k + j of each stacked row
  pairs.reserve(T * k);
  std::vector<ExpertRun> runs;
  for (const auto& [id, gate, up, down] : experts) {
    const int64_t r0 = pairs.size();
    for (int64_t p = 0; p < T * k; ++p)
      if (ids[p] == id) pairs.push_back(p);
    const int64_t M = int64_t(pairs.size()) - r0;
    if (M > 0)
      runs.push_back(ExpertRun{reinterpret_cast<const uint8_t*>(gate), reinterpret_cast<const uint8_t*>(up),
                               reinterpret_cast<const uint8_t*>(down), r0, M});
  }
  const int64_t R = pairs.size();
  if (R != T * k)
    throw std::invalid_argument("moe_layer: the experts given do not cover every routed (token, k) pair once");
  // the gather and the weighted scatter split over the threads when a prefill has many rows
  const int64_t grain = std::max<int64_t>(1, QUANTIZE_GRAIN / std::max<int64_t>(D, 1));
  float* ys = scratch<float, 2>(R * D);
  if (exact) {
    float* xs = scratch<float, 3>(R * D);
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::copy_n(x + pairs[r] / k * D, D, xs + r * D);
    });
    run_experts(runs, types, FfnInputs(types, xs, R, D, true), R, D, I, ys, true);
  } else {
    std::vector<int64_t> tokens(R);
    for (int64_t r = 0; r < R; ++r) tokens[r] = pairs[r] / k;
    run_experts(runs, types, FfnInputs(types, x, T, D, tokens.data(), R), R, D, I, ys, false);
  }
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float w = route_weights[pairs[r]];
      for (int64_t d = 0; d < D; ++d) out[pairs[r] * D + d] = ys[r * D + d] * w;
    }
  });
}

}  // namespace moestream_cpu
