// The residual add and RMSNorm between a layer's halves, one call for what torch runs as
// two to seven small ops (each, right after an expert or projection kernel has swept the
// caches, costs tens of microseconds of cold dispatch).
#pragma once

#include <cmath>
#include <cstdint>

namespace moestream_cpu {

// For each of M rows of D: h_out = h + delta (delta may be null: h_out = h), x_out =
// h_out * rsqrt(mean(h_out^2) + eps) * w. The mean sums in double.
inline void add_rms_norm(const float* h, const float* delta, const float* w, int64_t M, int64_t D, float eps,
                         float* h_out, float* x_out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* hr = h + m * D;
    float* ho = h_out + m * D;
    float* xo = x_out + m * D;
    double squares = 0.0;
    for (int64_t i = 0; i < D; ++i) {
      ho[i] = delta != nullptr ? hr[i] + delta[m * D + i] : hr[i];
      squares += double(ho[i]) * ho[i];
    }
    const float r = 1.0f / std::sqrt(static_cast<float>(squares / D) + eps);
    for (int64_t i = 0; i < D; ++i) xo[i] = (ho[i] * r) * w[i];
  }
}

}  // namespace moestream_cpu
