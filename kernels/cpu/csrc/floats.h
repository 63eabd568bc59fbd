// Decoded blocks -> float32 weights, w = d * sc * u - dmin * mn (or d * u + m), in fp32: what
// cpu_dequantize writes and what the exact route's portable path dots from memory.
#pragma once

#include "blocks.h"
#include "dot.h"
#include "regs.h"

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

// One row of K floats from its nb = K / block_size GGUF blocks.
template <class F>
inline void row_to_float(const uint8_t* row, int64_t nb, float* out) {
  typename F::Decoded dec;
  for (int64_t b = 0; b < nb; ++b) {
    decode_block<F>(row + b * F::type_size, dec);
    to_float(dec, out + b * F::block_size);
  }
}

}  // namespace moestream_cpu
