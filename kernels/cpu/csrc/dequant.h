// GGUF blocks -> float32 rows through the same decoders as the integer kernels: an exact
// route for callers that want floats, and a direct test of the decoders against gguf.
#pragma once

#include <ATen/Parallel.h>

#include "floats.h"
#include "matmul.h"

namespace moestream_cpu {

// rows [n0, n1) of an N x K tensor into out[(n - n0) * K + k].
template <class F>
void dequantize_rows(const uint8_t* weight, int64_t K, int64_t n0, int64_t n1, float* out) {
  const int64_t nb = K / F::block_size;
  for (int64_t n = n0; n < n1; ++n) row_to_float<F>(weight + n * nb * F::type_size, nb, out + (n - n0) * K);
}

inline void dequantize(const uint8_t* weight, int64_t qtype, int64_t N, int64_t K, float* out) {
  const int64_t grain = std::max<int64_t>(1, TASK_WORK / K);
  with_format(qtype, [&](auto fmt) {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      dequantize_rows<decltype(fmt)>(weight, K, n0, n1, out + n0 * K);
    });
  });
}

}  // namespace moestream_cpu
