// Integer forms shared by every CPU kernel: decoded weight blocks and int8 activation blocks.
//
// Every 256-element type (K-quants, IQ types) decodes one super-block to
//     w[i] = d * sc[j] * u[i] - dmin * mn[j]        (j = i / 16)
// with u unsigned 8-bit, sc/mn small integers. Types with signed values store u = v + z and
// fold the shift into mn = z * sc, dmin = d. The dot product against an activation block
// quantised as x[i] ~= dx * q[i] (int8, one scale per 256) is then two integer sums:
//     sum_i w[i] x[i] = dx * (d * sum_j sc[j] * sum_{i in j} u[i] q[i] - dmin * sum_j mn[j] * bsum[j])
// where bsum[j] is the sum of q over group j. Every 32-element type decodes to
//     w[i] = d * u[i] + m
// and dots against an activation block with one scale and one sum per 32.
#pragma once

#include <c10/util/Half.h>

#include "isa.h"

#include <cstdint>
#include <cstring>

namespace moestream_cpu {

constexpr int QK = 256;      // elements per super-block
constexpr int GROUP = 16;    // elements per integer scale
constexpr int NGROUP = QK / GROUP;
constexpr int QB = 32;       // elements per legacy block

// One decoded super-block. `sc_lanes` repeats sc[j] once per 4 elements (the int32 lanes of a
// u8 x s8 dot product), so the dot multiplies lane-wise without shuffles.
struct alignas(64) Decoded256 {
  uint8_t u[QK];
  int32_t sc_lanes[QK / 4];
  int16_t mn[NGROUP];
  float d;
  float dmin;

  int32_t scale(int group) const { return sc_lanes[group * (GROUP / 4)]; }

  void set_scales(const int32_t* sc) {
#ifdef MOESTREAM_AVX2
    const __m256i halves[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)),
                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + 8))};
    for (int k = 0; k < 8; ++k) {  // lanes 8k..8k+7: sc[2k] four times, then sc[2k + 1]
      const __m256i index = _mm256_set_epi32(2 * k % 8 + 1, 2 * k % 8 + 1, 2 * k % 8 + 1, 2 * k % 8 + 1,
                                             2 * k % 8, 2 * k % 8, 2 * k % 8, 2 * k % 8);
      _mm256_store_si256(reinterpret_cast<__m256i*>(sc_lanes + 8 * k), _mm256_permutevar8x32_epi32(halves[k / 4], index));
    }
#else
    for (int l = 0; l < QK / 4; ++l) sc_lanes[l] = sc[l / 4];
#endif
  }

  // Signed values v = u - zero in every group: the shift becomes the min term.
  void set_zero(const int32_t* sc, int zero) {
    for (int j = 0; j < NGROUP; ++j) mn[j] = static_cast<int16_t>(zero * sc[j]);
    dmin = d;
  }
};

struct alignas(32) Decoded32 {
  uint8_t u[QB];
  float d;
  float m;
};

// x ~= d * q over 256 elements; bsum[j] = sum of q over group j.
struct alignas(64) Act256 {
  int8_t q[QK];
  int16_t bsum[NGROUP];
  float d;
};

// x ~= d * q over 32 elements; sum = sum of q.
struct alignas(8) Act32 {
  int8_t q[QB];
  float d;
  int32_t sum;
};

// Formats derive from one of these: it names the decoded form and the activation blocks.
// `narrow`: every u <= 127, so pairs of u8 x s8 products cannot saturate int16 (the AVX2 dot
// relies on it); formats with a shift of 128 (Q8_0, IQ4_NL, IQ4_XS) are not, and their whole
// min term is that shift (mn = 128 sc, dmin = d; m = -128 d): the AVX2 dot of these "wide"
// formats works on the signed values instead (dot.h: dot_row_wide).
struct SuperBlockFormat {
  using Decoded = Decoded256;
  using Act = Act256;
  static constexpr int block_size = QK;
  static constexpr bool narrow = true;
};

struct LegacyFormat {
  using Decoded = Decoded32;
  using Act = Act32;
  static constexpr int block_size = QB;
  static constexpr bool narrow = true;
};

inline float fp16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// An E8M0 scale byte as 2^(e - 128) (ggml_e8m0_to_fp32_half): e < 2 are fp32 subnormals.
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? (0x00200000u << e) : (static_cast<uint32_t>(e - 1) << 23);
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

}  // namespace moestream_cpu
