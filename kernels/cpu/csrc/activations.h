// Activation rows -> int8 blocks with one float scale per block (symmetric, absmax / 127):
// the same idea as ggml's q8_K (per 256, with sums per 16) and q8_0 (per 32). This is where
// the integer route loses precision: |x - d q| <= d / 2 per element, d = max|x| / 127.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "blocks.h"

namespace moestream_cpu {

template <int N>
inline float quantize_block(const float* x, int8_t* q) {
  float amax = 0.0f;
  for (int i = 0; i < N; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int i = 0; i < N; ++i) q[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
  return d;
}

inline void quantize(const float* x, Act256& a) {
  a.d = quantize_block<QK>(x, a.q);
  for (int j = 0; j < NGROUP; ++j) {
    int sum = 0;
    for (int i = 0; i < GROUP; ++i) sum += a.q[GROUP * j + i];
    a.bsum[j] = static_cast<int16_t>(sum);
  }
}

inline void quantize(const float* x, Act32& a) {
  a.d = quantize_block<QB>(x, a.q);
  int sum = 0;
  for (int i = 0; i < QB; ++i) sum += a.q[i];
  a.sum = sum;
}

// Elements of activation rows per parallel task when quantising (a decode step's one row stays
// on the caller; a prefill's thousand rows of a MoE layer are split over the threads).
constexpr int64_t QUANTIZE_GRAIN = 64 * 1024;

// Rows [M, K] of floats (row stride ldx) as M * K / block_size blocks, row-major. Each row is
// quantised on its own, so the split over threads does not change a bit.
template <class Act, int BlockSize>
std::vector<Act> quantize_rows(const float* x, int64_t M, int64_t K, int64_t ldx) {
  const int64_t nb = K / BlockSize;
  std::vector<Act> out(M * nb);
  at::parallel_for(0, M, std::max<int64_t>(1, QUANTIZE_GRAIN / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < nb; ++b) quantize(x + m * ldx + b * BlockSize, out[m * nb + b]);
  });
  return out;
}

}  // namespace moestream_cpu
