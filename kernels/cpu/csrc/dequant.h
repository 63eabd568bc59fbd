// GGUF blocks -> float32 rows through the same decoders as the integer kernels: the exact
// route for large batches (dequantize a tile, then sgemm) and a direct test of the decoders.
#pragma once

#include <ATen/Parallel.h>

#include "matmul.h"

namespace moestream_cpu {

inline void to_float(const Decoded256& dec, float* out) {
  for (int j = 0; j < NGROUP; ++j) {
    const float scale = dec.d * static_cast<float>(dec.scale(j));
    const float min = dec.dmin * static_cast<float>(dec.mn[j]);
    for (int i = 0; i < GROUP; ++i) out[GROUP * j + i] = scale * dec.u[GROUP * j + i] - min;
  }
}

inline void to_float(const Decoded32& dec, float* out) {
  for (int i = 0; i < QB; ++i) out[i] = dec.d * dec.u[i] + dec.m;
}

// rows [n0, n1) of an N x K tensor into out[(n - n0) * K + k].
template <class F>
void dequantize_rows(const uint8_t* weight, int64_t K, int64_t n0, int64_t n1, float* out) {
  const int64_t nb = K / F::block_size;
  typename F::Decoded dec;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < nb; ++b) {
      F::decode(weight + (n * nb + b) * F::type_size, dec);
      to_float(dec, out + (n - n0) * K + b * F::block_size);
    }
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
