// 32-element blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4) -> decoded form: w = d * u + m.
// MXFP4 (gpt-oss experts) stores its e2m1 values doubled (-12..12) as table indices, as IQ4_NL
// does, under a power-of-two scale: u = value + 128, d = 2^(e - 128), m = -128 d.
// Byte layouts: ggml-common.h block_q*; nibble order as gguf.quants (low nibbles first).
// AVX-512 decodes into registers; the portable loops define the same values.
#pragma once

#include "blocks.h"
#include "gguf_constants.h"
#include "regs.h"

namespace moestream_cpu {

#ifdef MOESTREAM_AVX512_VNNI

// 16 bytes -> 32 elements: low nibbles, then high nibbles.
inline __m256i low_high_nibbles(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble), _mm_and_si128(packed, nibble));
}

inline __m256i add_fifth_bit(const uint8_t* qh, __m256i u) {  // bit i of the uint32 -> element i
  return _mm256_mask_add_epi8(u, load_u32(qh), u, _mm256_set1_epi8(16));
}

struct Q80 : LegacyFormat {
  static constexpr int type_size = 34;
  static constexpr bool narrow = false;
  static void decode_regs(const uint8_t* block, Regs32& out) {  // int8 q -> q + 128
    out.u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2)), _mm256_set1_epi8(-128));
    out.d = fp16(block);
    out.m = -128.0f * out.d;
  }
};

struct Q40 : LegacyFormat {
  static constexpr int type_size = 18;
  static void decode_regs(const uint8_t* block, Regs32& out) {
    out.u = low_high_nibbles(block + 2);
    out.d = fp16(block);
    out.m = -8.0f * out.d;
  }
};

struct Q41 : LegacyFormat {
  static constexpr int type_size = 20;
  static void decode_regs(const uint8_t* block, Regs32& out) {
    out.u = low_high_nibbles(block + 4);
    out.d = fp16(block);
    out.m = fp16(block + 2);
  }
};

struct Q50 : LegacyFormat {
  static constexpr int type_size = 22;
  static void decode_regs(const uint8_t* block, Regs32& out) {
    out.u = add_fifth_bit(block + 2, low_high_nibbles(block + 6));
    out.d = fp16(block);
    out.m = -16.0f * out.d;
  }
};

struct Q51 : LegacyFormat {
  static constexpr int type_size = 24;
  static void decode_regs(const uint8_t* block, Regs32& out) {
    out.u = add_fifth_bit(block + 4, low_high_nibbles(block + 8));
    out.d = fp16(block);
    out.m = fp16(block + 2);
  }
};

struct IQ4NL : LegacyFormat {
  static constexpr int type_size = 18;
  static constexpr bool narrow = false;
  static void decode_regs(const uint8_t* block, Regs32& out) {  // 16-entry lookup per 128-bit lane
    const __m256i table = _mm256_broadcastsi128_si256(
        _mm_add_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(KVALUES_IQ4NL)), _mm_set1_epi8(-128)));
    out.u = _mm256_shuffle_epi8(table, low_high_nibbles(block + 2));
    out.d = fp16(block);
    out.m = -128.0f * out.d;
  }
};

struct MXFP4 : LegacyFormat {
  static constexpr int type_size = 17;
  static constexpr bool narrow = false;
  static void decode_regs(const uint8_t* block, Regs32& out) {
    const __m256i table = _mm256_broadcastsi128_si256(
        _mm_add_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(KVALUES_MXFP4)), _mm_set1_epi8(-128)));
    out.u = _mm256_shuffle_epi8(table, low_high_nibbles(block + 1));
    out.d = e8m0_half(block[0]);
    out.m = -128.0f * out.d;
  }
};

#else

inline void low_high_nibbles(const uint8_t* qs, uint8_t* u) {
#ifdef MOESTREAM_AVX2  // gcc turned the loop into byte inserts once inlined into the kernel
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(u), _mm_and_si128(packed, nibble));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(u + 16), _mm_and_si128(_mm_srli_epi16(packed, 4), nibble));
#else
  for (int i = 0; i < 16; ++i) {
    u[i] = qs[i] & 0x0F;
    u[16 + i] = qs[i] >> 4;
  }
#endif
}

// 16 bytes of IQ4 (or MXFP4) nibbles -> 32 elements u = values[nibble] + 128: low nibbles,
// then high nibbles.
inline void iq4_lookup(const uint8_t* qs, uint8_t* u, const int8_t* values = KVALUES_IQ4NL) {
#ifdef MOESTREAM_AVX2  // one byte shuffle per 16 table lookups
  const __m128i table = _mm_add_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values)),
                                     _mm_set1_epi8(static_cast<char>(128)));
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(u), _mm_shuffle_epi8(table, _mm_and_si128(packed, nibble)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(u + 16),
                   _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(packed, 4), nibble)));
#else
  for (int i = 0; i < 16; ++i) {
    u[i] = values[qs[i] & 0x0F] + 128;
    u[16 + i] = values[qs[i] >> 4] + 128;
  }
#endif
}

inline void add_fifth_bit(const uint8_t* qh, uint8_t* u) {
  const uint32_t bits = load_u32(qh);
  for (int i = 0; i < 32; ++i) u[i] |= ((bits >> i) & 1) << 4;
}

struct Q80 : LegacyFormat {
  static constexpr int type_size = 34;
  static constexpr bool narrow = false;
  static void decode(const uint8_t* block, Decoded32& out) {
    for (int i = 0; i < 32; ++i) out.u[i] = block[2 + i] ^ 0x80;  // int8 q -> q + 128
    out.d = fp16(block);
    out.m = -128.0f * out.d;
  }
};

struct Q40 : LegacyFormat {
  static constexpr int type_size = 18;
  static void decode(const uint8_t* block, Decoded32& out) {
    low_high_nibbles(block + 2, out.u);
    out.d = fp16(block);
    out.m = -8.0f * out.d;
  }
};

struct Q41 : LegacyFormat {
  static constexpr int type_size = 20;
  static void decode(const uint8_t* block, Decoded32& out) {
    low_high_nibbles(block + 4, out.u);
    out.d = fp16(block);
    out.m = fp16(block + 2);
  }
};

struct Q50 : LegacyFormat {
  static constexpr int type_size = 22;
  static void decode(const uint8_t* block, Decoded32& out) {
    low_high_nibbles(block + 6, out.u);
    add_fifth_bit(block + 2, out.u);
    out.d = fp16(block);
    out.m = -16.0f * out.d;
  }
};

struct Q51 : LegacyFormat {
  static constexpr int type_size = 24;
  static void decode(const uint8_t* block, Decoded32& out) {
    low_high_nibbles(block + 8, out.u);
    add_fifth_bit(block + 4, out.u);
    out.d = fp16(block);
    out.m = fp16(block + 2);
  }
};

struct IQ4NL : LegacyFormat {
  static constexpr int type_size = 18;
  static constexpr bool narrow = false;
  static void decode(const uint8_t* block, Decoded32& out) {
    iq4_lookup(block + 2, out.u);
    out.d = fp16(block);
    out.m = -128.0f * out.d;
  }
};

struct MXFP4 : LegacyFormat {
  static constexpr int type_size = 17;
  static constexpr bool narrow = false;
  static void decode(const uint8_t* block, Decoded32& out) {
    iq4_lookup(block + 1, out.u, KVALUES_MXFP4);
    out.d = e8m0_half(block[0]);
    out.m = -128.0f * out.d;
  }
};

#endif

}  // namespace moestream_cpu
