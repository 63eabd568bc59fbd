// Dot products of decoded weight blocks with int8 activation blocks. AVX-512 VNNI: u8 x s8 ->
// int32 per 4 elements (vpdpbusd) on blocks held in registers; AVX2: vpmaddubsw + vpmaddwd
// over decoded rows in memory (the Q4_K_M K-quants run in registers instead: avx2_k.h);
// otherwise portable integer loops, which gcc vectorises for what -march=native offers.
#pragma once

#include "blocks.h"
#include "isa.h"
#include "regs.h"

namespace moestream_cpu {

#ifdef MOESTREAM_AVX512_VNNI

inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// One output's running sums over super-blocks, 16 and 8 float lanes wide.
struct Acc256 {
  __m512 main = _mm512_setzero_ps();
  __m256 min = _mm256_setzero_ps();

  // main += d dx sum_j sc_j (u . q)_j; min += dmin dx sum_j mn_j bsum_j (see blocks.h).
  // narrow (every u <= 127): u8 x s8 pairs -> int16 (vpmaddubsw, cannot saturate), then
  // x the int16 group scales accumulated into int32 (vpdpwssd): two instructions per 64
  // weights. Otherwise 4-element sums (vpdpbusd) times int32 scales (vpmulld, slow).
  // Both give the same integers.
  template <bool narrow>
  void add(const Regs256& w, const Act256& x) {
    __m512i sum = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) {  // 64 elements; lanes carry their group scale
      const __m512i q = _mm512_load_si512(x.q + 64 * k);
      if constexpr (narrow) {
        sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(w.u[k], q), w.sc_pairs[k]);
      } else {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.u[k], q);
        sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(p, w.sc[k]));
      }
    }
    main = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(w.d * x.d), main);
    const __m256i mins = _mm256_madd_epi16(w.mn, _mm256_load_si256(reinterpret_cast<const __m256i*>(x.bsum)));
    min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(w.dmin * x.d), min);
  }

  float total() const { return _mm512_reduce_add_ps(main) - hsum256(min); }
};

// One output's running sums over 32-element blocks: sum of dx (d u . q + m sum q).
struct Acc32 {
  __m256 main = _mm256_setzero_ps();
  float min = 0.0f;

  template <bool narrow>
  void add(const Regs32& w, const Act32& x) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q));
    const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w.u, q);
    main = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(w.d * x.d), main);
    min += w.m * x.d * static_cast<float>(x.sum);
  }

  float total() const { return hsum256(main) + min; }
};

template <class Act>
struct RegsFor;
template <>
struct RegsFor<Act256> {
  using Regs = Regs256;
  using Acc = Acc256;
};
template <>
struct RegsFor<Act32> {
  using Regs = Regs32;
  using Acc = Acc32;
};

#else

inline float dot_row_scalar(const Decoded256* w, const Act256* x, int64_t nb) {
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

inline float dot_row_scalar(const Decoded32* w, const Act32* x, int64_t nb) {
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t sum = 0;
    for (int i = 0; i < QB; ++i) sum += w[b].u[i] * x[b].q[i];
    acc += x[b].d * (w[b].d * static_cast<float>(sum) + w[b].m * static_cast<float>(x[b].sum));
  }
  return acc;
}

#ifdef MOESTREAM_AVX2

inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// u8 x s8 pairs -> int16 (vpmaddubsw, exact for narrow formats), then x int16 group scales ->
// int32 (vpmaddwd): 32 elements, two groups of 16, per step.
inline float dot_row_narrow(const Decoded256* w, const Act256* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps(), acc_min = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i sum = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i u = _mm256_load_si256(reinterpret_cast<const __m256i*>(w[b].u + 32 * c));
      const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].q + 32 * c));
      const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(w[b].sc_lanes + 8 * c));
      const __m256i scales = _mm256_packs_epi32(lanes, lanes);  // int16: sc[2c] x 8, sc[2c + 1] x 8
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), scales));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(w[b].d * x[b].d), acc);
    const __m256i mins = _mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(w[b].mn)),
                                           _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].bsum)));
    acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(w[b].dmin * x[b].d), acc_min);
  }
  return hsum256(acc) - hsum256(acc_min);
}

inline float dot_row_narrow(const Decoded32* w, const Act32* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float acc_min = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i u = _mm256_load_si256(reinterpret_cast<const __m256i*>(w[b].u));
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].q));
    const __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(w[b].d * x[b].d), acc);
    acc_min += w[b].m * x[b].d * static_cast<float>(x[b].sum);
  }
  return hsum256(acc) + acc_min;
}

// Wide formats (Q8_0, IQ4_NL, IQ4_XS) store u = v + 128 and their whole min term is that
// shift (blocks.h), so the dot runs on the signed v = u ^ 0x80 instead: |v| x (q with v's
// sign) pairs (at most 2 * 128 * 127) fit vpmaddubsw's int16 without saturating.
inline __m256i signed_pairs(__m256i u, __m256i q) {
  const __m256i v = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
  return _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(q, v));
}

inline float dot_row_wide(const Decoded256* w, const Act256* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i sum = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i u = _mm256_load_si256(reinterpret_cast<const __m256i*>(w[b].u + 32 * c));
      const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].q + 32 * c));
      const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(w[b].sc_lanes + 8 * c));
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(signed_pairs(u, q), _mm256_packs_epi32(lanes, lanes)));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(w[b].d * x[b].d), acc);
  }
  return hsum256(acc);
}

inline float dot_row_wide(const Decoded32* w, const Act32* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i u = _mm256_load_si256(reinterpret_cast<const __m256i*>(w[b].u));
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].q));
    const __m256i sum = _mm256_madd_epi16(signed_pairs(u, q), _mm256_set1_epi16(1));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(w[b].d * x[b].d), acc);
  }
  return hsum256(acc);
}

#endif

template <bool narrow, class Dec, class Act>
inline float dot_row(const Dec* w, const Act* x, int64_t nb) {
#ifdef MOESTREAM_AVX2
  if constexpr (narrow)
    return dot_row_narrow(w, x, nb);
  else
    return dot_row_wide(w, x, nb);
#else
  return dot_row_scalar(w, x, nb);
#endif
}

#endif

}  // namespace moestream_cpu
