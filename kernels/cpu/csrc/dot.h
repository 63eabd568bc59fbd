// Dot products of one weight row (decoded blocks) with one activation row (int8 blocks).
// AVX-512 VNNI: u8 x s8 -> int32 per 4 elements (vpdpbusd); otherwise portable integer loops
// that gcc vectorises for whatever -march=native offers (AVX2, NEON).
#pragma once

#include "blocks.h"
#include "isa.h"

namespace moestream_cpu {

#ifdef MOESTREAM_AVX512_VNNI

inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float dot_row(const Decoded256* w, const Act256* x, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  __m256 acc_min = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i sum = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) {  // 64 elements -> 16 lanes of 4; lanes carry their group scale
      const __m512i u = _mm512_load_si512(w[b].u + 64 * k);
      const __m512i q = _mm512_load_si512(x[b].q + 64 * k);
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, q);
      sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(p, _mm512_load_si512(w[b].sc_lanes + 16 * k)));
    }
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(w[b].d * x[b].d), acc);
    const __m256i mins = _mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(w[b].mn)),
                                           _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].bsum)));
    acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(w[b].dmin * x[b].d), acc_min);
  }
  return _mm512_reduce_add_ps(acc) - hsum256(acc_min);
}

inline float dot_row(const Decoded32* w, const Act32* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float acc_min = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i u = _mm256_load_si256(reinterpret_cast<const __m256i*>(w[b].u));
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].q));
    const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(w[b].d * x[b].d), acc);
    acc_min += w[b].m * x[b].d * static_cast<float>(x[b].sum);
  }
  return hsum256(acc) + acc_min;
}

#else

inline float dot_row(const Decoded256* w, const Act256* x, int64_t nb) {
  float acc = 0.0f, acc_min = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t sum = 0, mins = 0;
    for (int j = 0; j < NGROUP; ++j) {
      int32_t group = 0;
      for (int i = 0; i < GROUP; ++i) group += w[b].u[GROUP * j + i] * x[b].q[GROUP * j + i];
      sum += w[b].scale(j) * group;
      mins += w[b].mn[j] * x[b].bsum[j];
    }
    acc += w[b].d * x[b].d * static_cast<float>(sum);
    acc_min += w[b].dmin * x[b].d * static_cast<float>(mins);
  }
  return acc - acc_min;
}

inline float dot_row(const Decoded32* w, const Act32* x, int64_t nb) {
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t sum = 0;
    for (int i = 0; i < QB; ++i) sum += w[b].u[i] * x[b].q[i];
    acc += x[b].d * (w[b].d * static_cast<float>(sum) + w[b].m * static_cast<float>(x[b].sum));
  }
  return acc;
}

#endif

}  // namespace moestream_cpu
