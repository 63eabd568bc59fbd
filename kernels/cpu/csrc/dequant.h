// GGUF blocks -> float32 rows through the same decoders as the integer kernels: an exact
// route for callers that want floats, and a direct test of the decoders against gguf.
#pragma once

#include <ATen/Parallel.h>

#include "matmul.h"

namespace moestream_cpu {

// The memory form of a block, for any format.
template <class F>
inline void decode_block(const uint8_t* block, typename F::Decoded& out) {
#ifdef MOESTREAM_AVX512_VNNI
  typename RegsFor<typename F::Act>::Regs regs;
  F::decode_regs(block, regs);
  regs.store(out);
#else
  F::decode(block, out);
#endif
}

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
      decode_block<F>(weight + (n * nb + b) * F::type_size, dec);
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
