// Float vectors for the compiled glue (attention, SiLU): 16 lanes on AVX-512, 8 on AVX2, and a
// vector exp. MOESTREAM_VEC is defined where they exist; elsewhere callers keep scalar loops.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moestream_cpu {

#if defined(__F16C__) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
#define MOESTREAM_VEC 1

// A vector of float lanes, 16 (AVX-512) or 8 (AVX2), and what the attention and the SiLU need of it.
#ifdef __AVX512F__
using VecF = __m512;
constexpr int64_t VEC = 16;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vset(float x) { return _mm512_set1_ps(x); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void vstore(float* p, VecF x) { _mm512_storeu_ps(p, x); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm512_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vmax(VecF a, VecF b) { return _mm512_max_ps(a, b); }
inline VecF vmin(VecF a, VecF b) { return _mm512_min_ps(a, b); }
inline VecF vdiv(VecF a, VecF b) { return _mm512_div_ps(a, b); }
inline float vsum(VecF x) { return _mm512_reduce_add_ps(x); }
inline VecF vround(VecF x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VecF vpow2(VecF y, VecF n) { return _mm512_scalef_ps(y, n); }  // y 2^n
#else
using VecF = __m256;
constexpr int64_t VEC = 8;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vset(float x) { return _mm256_set1_ps(x); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void vstore(float* p, VecF x) { _mm256_storeu_ps(p, x); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm256_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vmax(VecF a, VecF b) { return _mm256_max_ps(a, b); }
inline VecF vmin(VecF a, VecF b) { return _mm256_min_ps(a, b); }
inline VecF vdiv(VecF a, VecF b) { return _mm256_div_ps(a, b); }
inline float vsum(VecF x) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline VecF vround(VecF x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VecF vpow2(VecF y, VecF n) {  // n integral in [-126, 127]: y 2^n through the exponent bits
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}
#endif

// exp(x), relative error ~1e-7: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), exp(r)
// by Cephes' expf polynomial, times 2^n. x is clamped to [-87, 88]: below, 0-ish (e^-87 ~
// 1.6e-38), above, ~1.6e38 (finite, where std::exp overflows to inf; a SiLU's 1 / (1 + e^-g)
// is 0-ish either way).
inline VecF vexp(VecF x) {
  x = vmin(vmax(x, vset(-87.0f)), vset(88.0f));
  const VecF n = vround(vmul(x, vset(1.44269504088896341f)));
  VecF r = vfma(n, vset(-0.693359375f), x);
  r = vfma(n, vset(2.12194440e-4f), r);
  VecF p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  const VecF y = vfma(vmul(p, r), r, r);  // exp(r) - 1 = r + r^2 p(r)
  return vpow2(vadd(y, vset(1.0f)), n);
}

#endif

}  // namespace moestream_cpu
