// Attention of one new token (decode) over a float32 KV cache read in place.
//
// The torch version is about ten small ops a layer (scale, two batched matmuls, softmax,
// casts), and the batched matmuls open parallel regions whose joins, on a loaded 2-vCPU box,
// wait for a descheduled thread. This is one call: the heads are split over threads only
// when the context is long enough to pay for a region (short contexts run on the caller).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace moestream_cpu {

// Below this many multiply-adds (scores and values of every head) one thread does it all.
constexpr int64_t ATTEND_PARALLEL_MIN_FMAS = 1 << 20;
// Inside the one-call decode (decode_model.h) the threads are still spinning from the region
// before, so a region is cheap: heads are split from ~16 slots of context on (OLMoE).
constexpr int64_t ATTEND_PARALLEL_MIN_FMAS_WARM = 1 << 16;
constexpr int64_t ATTEND_LANES = 16;  // independent partial sums of a dot product

// Which cache slot holds the context's t-th token: t itself (a contiguous run from the base
// pointer), or ids[t] (a block table's slots, counted from the base).
struct SlotMap {
  const int64_t* ids = nullptr;
  int64_t operator()(int64_t t) const { return ids != nullptr ? ids[t] : t; }
};

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

// n cached values as floats: a copy for an fp32 cache, the exact fp16 -> fp32 conversion for an
// fp16 one (what the torch path's .to(float32) gives).
inline void load_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void load_row(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void store_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

// fp32 -> fp16 rounded to nearest even, as torch's .to(float16)
inline void store_row(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

#ifdef MOESTREAM_VEC

// One head, hd a multiple of VEC: out [hd] = softmax(q . k_t) @ v over ctx slots; q already
// scaled; p: ctx floats of scratch. Scores four slots at a time (independent sums), values
// four vectors of the head at a time, all in registers.
template <class T>
inline void attend_head_simd(const float* q, int64_t hd, const T* k, const T* v, int64_t ctx, int64_t stride,
                             SlotMap slot, float* p, float* out) {
  const int64_t nc = hd / VEC;
  int64_t t = 0;
  for (; t + 4 <= ctx; t += 4) {
    VecF a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    const T *k0 = k + slot(t) * stride, *k1 = k + slot(t + 1) * stride, *k2 = k + slot(t + 2) * stride,
            *k3 = k + slot(t + 3) * stride;
    for (int64_t c = 0; c < nc; ++c) {
      const VecF qc = vload(q + c * VEC);
      a0 = vfma(qc, vload(k0 + c * VEC), a0);
      a1 = vfma(qc, vload(k1 + c * VEC), a1);
      a2 = vfma(qc, vload(k2 + c * VEC), a2);
      a3 = vfma(qc, vload(k3 + c * VEC), a3);
    }
    p[t] = vsum(a0);
    p[t + 1] = vsum(a1);
    p[t + 2] = vsum(a2);
    p[t + 3] = vsum(a3);
  }
  for (; t < ctx; ++t) {
    VecF a = vzero();
    for (int64_t c = 0; c < nc; ++c) a = vfma(vload(q + c * VEC), vload(k + slot(t) * stride + c * VEC), a);
    p[t] = vsum(a);
  }
  float top = -INFINITY;
  for (t = 0; t < ctx; ++t) top = std::max(top, p[t]);
  // exponentials and their sum, VEC slots at a time
  VecF sums = vzero();
  const VecF shift = vset(top);
  for (t = 0; t + VEC <= ctx; t += VEC) {
    const VecF e = vexp(vsub(vload(p + t), shift));
    vstore(p + t, e);
    sums = vadd(sums, e);
  }
  float total = vsum(sums);
  for (; t < ctx; ++t) {
    p[t] = std::exp(p[t] - top);
    total += p[t];
  }
  const VecF inv = vset(1.0f / total);
  int64_t c = 0;
  for (; c + 4 <= nc; c += 4) {
    VecF o0 = vzero(), o1 = vzero(), o2 = vzero(), o3 = vzero();
    const T* vc = v + c * VEC;
    for (t = 0; t < ctx; ++t) {
      const VecF w = vset(p[t]);
      const T* vt = vc + slot(t) * stride;
      o0 = vfma(w, vload(vt), o0);
      o1 = vfma(w, vload(vt + VEC), o1);
      o2 = vfma(w, vload(vt + 2 * VEC), o2);
      o3 = vfma(w, vload(vt + 3 * VEC), o3);
    }
    vstore(out + c * VEC, vmul(o0, inv));
    vstore(out + (c + 1) * VEC, vmul(o1, inv));
    vstore(out + (c + 2) * VEC, vmul(o2, inv));
    vstore(out + (c + 3) * VEC, vmul(o3, inv));
  }
  for (; c < nc; ++c) {
    VecF o = vzero();
    for (t = 0; t < ctx; ++t) o = vfma(vset(p[t]), vload(v + c * VEC + slot(t) * stride), o);
    vstore(out + c * VEC, vmul(o, inv));
  }
}

#endif

// out [H, hd] = softmax(scale q_h . k[t, h / group]) @ v[:, h / group] for each head h.
// q [H, hd] contiguous; k, v: ctx slots, token t's KV head j at base + slot(t) * slot_stride + j * hd.
// T: the cache's element type (float or c10::Half; attention computes in fp32).
template <class T>
inline void attend_one(const float* q, int64_t H, int64_t hd, const T* k, const T* v, int64_t ctx,
                       int64_t n_kv, int64_t slot_stride, float scale, float* out,
                       int64_t parallel_min_fmas = ATTEND_PARALLEL_MIN_FMAS, SlotMap slot = {}) {
  const int64_t group = H / n_kv;
  auto heads = [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(hd), p(ctx), row(hd);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t j = h / group;
      for (int64_t d = 0; d < hd; ++d) scaled[d] = q[h * hd + d] * scale;
#ifdef MOESTREAM_VEC
      if (hd % VEC == 0) {
        attend_head_simd(scaled.data(), hd, k + j * hd, v + j * hd, ctx, slot_stride, slot, p.data(), out + h * hd);
        continue;
      }
#endif
      float top = -INFINITY;
      for (int64_t t = 0; t < ctx; ++t) {
        load_row(k + slot(t) * slot_stride + j * hd, row.data(), hd);
        p[t] = lane_dot(scaled.data(), row.data(), hd);
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
        load_row(v + slot(t) * slot_stride + j * hd, row.data(), hd);
        for (int64_t d = 0; d < hd; ++d) o[d] += w * row[d];
      }
    }
  };
  if (2 * H * hd * ctx < parallel_min_fmas) {
    heads(0, H);
  } else {
    at::parallel_for(0, H, 1, heads);
  }
}

// x [groups * n] = x * rsqrt(mean(x^2) + eps) * w over each group of n (w has n values):
// the RMSNorm of q or k over all heads (one group) or per head. The mean sums in double.
inline void rms_norm_groups(float* x, int64_t groups, int64_t n, const float* w, float eps) {
  for (int64_t g = 0; g < groups; ++g) {
    float* xg = x + g * n;
    double squares = 0.0;
    for (int64_t i = 0; i < n; ++i) squares += double(xg[i]) * xg[i];
    const float r = 1.0f / std::sqrt(static_cast<float>(squares / n) + eps);
    for (int64_t i = 0; i < n; ++i) xg[i] = (xg[i] * r) * w[i];
  }
}

// Rotary embedding of each of `heads` heads of hd values, in place, over their first `dims`:
// x_i cos_i + x_partner(i) signed_sin_i, partner = the other value of i's pair (adjacent
// pairs, or NEOX halves), the sign of the pair's first value already in signed_sin.
inline void rope_heads(float* x, int64_t heads, int64_t hd, const float* cos, const float* signed_sin, int64_t dims,
                       bool neox) {
  std::vector<float> src(dims);
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * hd;
    std::copy(xh, xh + dims, src.begin());
    for (int64_t i = 0; i < dims; ++i) {
      const int64_t partner = neox ? (i < dims / 2 ? i + dims / 2 : i - dims / 2) : (i ^ 1);
      xh[i] = src[i] * cos[i] + src[partner] * signed_sin[i];
    }
  }
}

// Everything of a decode token's attention between the q/k/v projections and the output
// projection, for one token: optional q/k RMSNorm (over all heads, or per head), rotary
// embedding, k and v written into the cache's last context slot, attention over the context.
// q [H * hd], k [KV * hd] are normed and roped in place; out [H * hd].
struct DecodeAttention {
  int64_t H, n_kv, hd;
  const float* q_norm;  // nullptr: no q/k norm
  const float* k_norm;
  bool norm_per_head;
  float eps;
  const float* cos;  // [rope_dims]
  const float* signed_sin;
  int64_t rope_dims;
  bool neox;
};

template <class T>
inline void decode_attention(const DecodeAttention& a, float* q, float* k, const float* v, T* k_cache,
                             T* v_cache, int64_t ctx, int64_t slot_stride, float scale, float* out,
                             int64_t parallel_min_fmas = ATTEND_PARALLEL_MIN_FMAS, SlotMap slot = {}) {
  if (a.q_norm != nullptr) {
    if (a.norm_per_head) {
      rms_norm_groups(q, a.H, a.hd, a.q_norm, a.eps);
      rms_norm_groups(k, a.n_kv, a.hd, a.k_norm, a.eps);
    } else {
      rms_norm_groups(q, 1, a.H * a.hd, a.q_norm, a.eps);
      rms_norm_groups(k, 1, a.n_kv * a.hd, a.k_norm, a.eps);
    }
  }
  rope_heads(q, a.H, a.hd, a.cos, a.signed_sin, a.rope_dims, a.neox);
  rope_heads(k, a.n_kv, a.hd, a.cos, a.signed_sin, a.rope_dims, a.neox);
  store_row(k, k_cache + slot(ctx - 1) * slot_stride, a.n_kv * a.hd);
  store_row(v, v_cache + slot(ctx - 1) * slot_stride, a.n_kv * a.hd);
  attend_one(q, a.H, a.hd, k_cache, v_cache, ctx, a.n_kv, slot_stride, scale, out, parallel_min_fmas, slot);
}

}  // namespace moestream_cpu
