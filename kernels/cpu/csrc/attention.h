// Attention of one new token (decode) over a float32 KV cache read in place.
//
// The torch version is about ten small ops a layer (scale, two batched matmuls, softmax,
// casts), and the batched matmuls open parallel regions whose joins, on a loaded 2-vCPU box,
// wait for a descheduled thread. This is one call: the heads are split over threads only
// when the context is long enough to pay for a region (short contexts run on the caller).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace moestream_cpu {

// Below this many multiply-adds (scores and values of every head) one thread does it all.
constexpr int64_t ATTEND_PARALLEL_MIN_FMAS = 1 << 20;
constexpr int64_t ATTEND_LANES = 16;  // independent partial sums of a dot product

// sum a[i] b[i] over n, in ATTEND_LANES independent lanes the compiler vectorises (no
// reordering of one lane's sum needed, so no -ffast-math).
inline float lane_dot(const float* a, const float* b, int64_t n) {
  float acc[ATTEND_LANES] = {};
  int64_t i = 0;
  for (; i + ATTEND_LANES <= n; i += ATTEND_LANES)
    for (int64_t j = 0; j < ATTEND_LANES; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[i % ATTEND_LANES] += a[i] * b[i];
  float sum = 0.f;
  for (int64_t j = 0; j < ATTEND_LANES; ++j) sum += acc[j];
  return sum;
}

// out [H, hd] = softmax(scale q_h . k[t, h / group]) @ v[:, h / group] for each head h.
// q [H, hd] contiguous; k, v: ctx slots, slot t of KV head j at base + t * slot_stride + j * hd.
inline void attend_one(const float* q, int64_t H, int64_t hd, const float* k, const float* v, int64_t ctx,
                       int64_t n_kv, int64_t slot_stride, float scale, float* out) {
  const int64_t group = H / n_kv;
  auto heads = [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(hd), p(ctx);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t j = h / group;
      for (int64_t d = 0; d < hd; ++d) scaled[d] = q[h * hd + d] * scale;
      float top = -INFINITY;
      for (int64_t t = 0; t < ctx; ++t) {
        p[t] = lane_dot(scaled.data(), k + t * slot_stride + j * hd, hd);
        top = std::max(top, p[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < ctx; ++t) {
        p[t] = std::exp(p[t] - top);
        total += p[t];
      }
      float* o = out + h * hd;
      std::fill(o, o + hd, 0.f);
      for (int64_t t = 0; t < ctx; ++t) {
        const float w = p[t] / total;
        const float* vt = v + t * slot_stride + j * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] += w * vt[d];
      }
    }
  };
  if (2 * H * hd * ctx < ATTEND_PARALLEL_MIN_FMAS) {
    heads(0, H);
  } else {
    at::parallel_for(0, H, 1, heads);
  }
}

}  // namespace moestream_cpu
