// AVX-512 register form of decoded blocks: what the decoders produce and the dot consumes, so
// the matmul never writes decoded weights to memory.
#pragma once

#include "blocks.h"

#ifdef MOESTREAM_AVX512_VNNI

namespace moestream_cpu {

struct Regs256 {
  __m512i u[4];   // elements 64 k .. 64 k + 63
  __m512i sc[4];  // int32 lane l of vector k: the scale of elements 64 k + 4 l .. + 3
  __m512i sc_pairs[4];  // int16 lane l of vector k: the scale of elements 64 k + 2 l, + 1
  __m256i mn;     // int16 per group of 16
  __m512i sc16;   // int32 per group of 16 (the exact route scales floats with it)
  float d;
  float dmin;

  // sc16: one int32 scale per group of 16 elements.
  void set_scales(__m512i sc16) {
    this->sc16 = sc16;
    const __m512i quarter = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2);
    for (int k = 0; k < 4; ++k) sc[k] = _mm512_permutexvar_epi32(_mm512_add_epi32(_mm512_set1_epi32(4 * k), quarter), sc16);
    const __m512i words = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(sc16));
    const __m512i eighth = _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                                              15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3);
    for (int k = 0; k < 4; ++k)
      sc_pairs[k] = _mm512_permutexvar_epi16(_mm512_add_epi16(_mm512_set1_epi16(static_cast<int16_t>(4 * k)), eighth), words);
  }

  // Signed values v = u - zero: the shift becomes the min term (see blocks.h).
  void set_zero(__m512i sc16, int zero) {
    mn = _mm512_cvtepi32_epi16(_mm512_mullo_epi32(sc16, _mm512_set1_epi32(zero)));
    dmin = d;
  }

  void store(Decoded256& m) const {
    for (int k = 0; k < 4; ++k) {
      _mm512_store_si512(m.u + 64 * k, u[k]);
      _mm512_store_si512(m.sc_lanes + 16 * k, sc[k]);
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(m.mn), mn);
    m.d = d;
    m.dmin = dmin;
  }
};

// A decoded 32-element block: w = d * u + m.
struct Regs32 {
  __m256i u;
  float d;
  float m;

  void store(Decoded32& out) const {
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.u), u);
    out.d = d;
    out.m = m;
  }
};

// Eight bytes -> sixteen int32, each byte twice (per-32 scales -> per-16 groups).
inline __m512i twice_u8(uint64_t bytes) {
  const __m128i v = _mm_cvtsi64_si128(static_cast<int64_t>(bytes));
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(v, v));
}

}  // namespace moestream_cpu

#endif
