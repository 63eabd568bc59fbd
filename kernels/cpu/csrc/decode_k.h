// K-quant super-blocks (Q2_K..Q6_K) -> decoded form. Byte layouts: ggml-common.h
// block_q*_K, element order as gguf.quants.Q*_K.dequantize_blocks. The types of the Q4_K_M
// mixes (Q4_K, Q5_K, Q6_K) decode straight into AVX-512 registers where available; the
// portable loops define the same values.
#pragma once

#include "blocks.h"
#include "regs.h"

namespace moestream_cpu {

// Q4_K/Q5_K: 12 bytes hold eight 6-bit scales and eight 6-bit mins (one per 32 elements):
// bytes 0-3 scales 0-3 (+ top bits of scales 4-7), 4-7 mins 0-3 (+ top bits of mins 4-7),
// 8-11 low nibbles of scales 4-7 and high nibbles of mins 4-7. Unpacked 4 bytes at a time.
inline void k_scales_mins(const uint8_t* block, uint64_t& scales, uint64_t& mins) {
  const uint32_t a = load_u32(block + 4), b = load_u32(block + 8), c = load_u32(block + 12);
  scales = (a & 0x3F3F3F3Fu) | uint64_t((c & 0x0F0F0F0Fu) | ((a >> 2) & 0x30303030u)) << 32;
  mins = (b & 0x3F3F3F3Fu) | uint64_t(((c >> 4) & 0x0F0F0F0Fu) | ((b >> 2) & 0x30303030u)) << 32;
}

#ifdef MOESTREAM_AVX512_VNNI

inline void set_affine_k(const uint8_t* block, Regs256& out) {
  uint64_t scales, mins;
  k_scales_mins(block, scales, mins);
  out.set_scales(twice_u8(scales));
  out.mn = _mm512_cvtepi32_epi16(twice_u8(mins));
  out.d = fp16(block);
  out.dmin = fp16(block + 2);
}

// 64 packed bytes (two runs of 32) -> 128 elements: run 0 low nibbles, run 0 high, run 1 low,
// run 1 high; returned as the two 64-element halves.
inline void split_nibbles_64(const uint8_t* qs, __m512i& first, __m512i& second) {
  const __m512i packed = _mm512_loadu_si512(qs);
  const __m512i low = _mm512_and_si512(packed, _mm512_set1_epi8(0x0F));
  const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), _mm512_set1_epi8(0x0F));
  first = _mm512_shuffle_i64x2(low, high, _MM_SHUFFLE(1, 0, 1, 0));
  second = _mm512_shuffle_i64x2(low, high, _MM_SHUFFLE(3, 2, 3, 2));
}

struct Q4K : SuperBlockFormat {
  static constexpr int type_size = 144;
  static constexpr int scale_group = 32;  // one 6-bit scale and min per 32 elements
  static void decode_regs(const uint8_t* block, Regs256& out) {
    split_nibbles_64(block + 16, out.u[0], out.u[1]);
    split_nibbles_64(block + 80, out.u[2], out.u[3]);
    set_affine_k(block, out);
  }
};

struct Q5K : SuperBlockFormat {
  static constexpr int type_size = 176;
  static constexpr int scale_group = 32;  // one 6-bit scale and min per 32 elements
  static void decode_regs(const uint8_t* block, Regs256& out) {
    const uint8_t* qh = block + 16;
    split_nibbles_64(block + 48, out.u[0], out.u[1]);
    split_nibbles_64(block + 112, out.u[2], out.u[3]);
    // Element 32 b + i takes bit b of qh[i] as its bit 4: test each 32-byte half for its bit.
    const __m512i bits = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh)));
    for (int c = 0; c < 4; ++c) {
      const __m512i probe = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << (2 * c))),
                                               _mm256_set1_epi8(static_cast<char>(2 << (2 * c))), 1);
      out.u[c] = _mm512_mask_add_epi8(out.u[c], _mm512_test_epi8_mask(bits, probe), out.u[c], _mm512_set1_epi8(16));
    }
    set_affine_k(block, out);
  }
};

struct Q6K : SuperBlockFormat {
  static constexpr int type_size = 210;
  static void decode_regs(const uint8_t* block, Regs256& out) {
    const __m512i nibble = _mm512_set1_epi8(0x0F), two_bits = _mm512_set1_epi8(0x30);
    for (int h = 0; h < 2; ++h) {  // 128 elements: 64 ql bytes (low, high nibbles), 32 qh bytes
      const __m512i low = _mm512_loadu_si512(block + 64 * h);
      const __m256i top = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * h));
      // qh bits 2t..2t+1 of byte i are bits 4-5 of element 32 t + i.
      const __m512i top01 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_slli_epi16(top, 4)),
                                               _mm256_slli_epi16(top, 2), 1);
      const __m512i top23 = _mm512_inserti64x4(_mm512_castsi256_si512(top), _mm256_srli_epi16(top, 2), 1);
      out.u[2 * h] = _mm512_or_si512(_mm512_and_si512(low, nibble), _mm512_and_si512(top01, two_bits));
      out.u[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 4), nibble),
                                         _mm512_and_si512(top23, two_bits));
    }
    const __m512i sc16 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)));
    out.set_scales(sc16);
    out.d = fp16(block + 208);
    out.set_zero(sc16, 32);
  }
};

#else

inline void set_affine_k(const uint8_t* block, Decoded256& out) {
  uint64_t scales, mins;
  k_scales_mins(block, scales, mins);
  int32_t sc[NGROUP];
  for (int j = 0; j < NGROUP; ++j) {
    sc[j] = (scales >> (8 * (j / 2))) & 0xFF;
    out.mn[j] = (mins >> (8 * (j / 2))) & 0xFF;
  }
  out.set_scales(sc);
  out.d = fp16(block);
  out.dmin = fp16(block + 2);
}

struct Q4K : SuperBlockFormat {
  static constexpr int type_size = 144;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* qs = block + 16;
    for (int c = 0; c < 4; ++c)  // 32 bytes: low nibbles, then high nibbles, 64 elements
      for (int i = 0; i < 32; ++i) {
        out.u[64 * c + i] = qs[32 * c + i] & 0x0F;
        out.u[64 * c + 32 + i] = qs[32 * c + i] >> 4;
      }
    set_affine_k(block, out);
  }
};

struct Q5K : SuperBlockFormat {
  static constexpr int type_size = 176;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* qh = block + 16;
    const uint8_t* qs = block + 48;
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 32; ++i) {  // bit b of qh[i] is bit 4 of element 32 b + i
        out.u[64 * c + i] = (qs[32 * c + i] & 0x0F) | (((qh[i] >> (2 * c)) & 1) << 4);
        out.u[64 * c + 32 + i] = (qs[32 * c + i] >> 4) | (((qh[i] >> (2 * c + 1)) & 1) << 4);
      }
    set_affine_k(block, out);
  }
};

struct Q6K : SuperBlockFormat {
  static constexpr int type_size = 210;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* ql = block;
    const uint8_t* qh = block + 128;
    const auto* scales = reinterpret_cast<const int8_t*>(block + 192);
    for (int h = 0; h < 2; ++h)  // two halves of 128 elements: ql 64 bytes, qh 32 bytes each
      for (int i = 0; i < 32; ++i) {
        const uint8_t lo = ql[64 * h + i], hi = ql[64 * h + 32 + i], top = qh[32 * h + i];
        uint8_t* u = out.u + 128 * h;
        u[i] = (lo & 0x0F) | ((top & 3) << 4);
        u[32 + i] = (hi & 0x0F) | (((top >> 2) & 3) << 4);
        u[64 + i] = (lo >> 4) | (((top >> 4) & 3) << 4);
        u[96 + i] = (hi >> 4) | (((top >> 6) & 3) << 4);
      }
    int32_t sc[NGROUP];
    for (int j = 0; j < NGROUP; ++j) sc[j] = scales[j];
    out.set_scales(sc);
    out.d = fp16(block + 208);
    out.set_zero(sc, 32);
  }
};

#endif

// Q2_K/Q3_K: 2-bit quants, 64 bytes: element 128 h + 32 t + i is bits 2t..2t+1 of qs[32 h + i].
#ifdef MOESTREAM_AVX512_VNNI

inline void two_bit_quants(const uint8_t* qs, __m512i* u) {
  const __m512i packed = _mm512_loadu_si512(qs);  // lanes 0-31: h = 0, 32-63: h = 1
  __m512i v[4];
  for (int t = 0; t < 4; ++t) v[t] = _mm512_and_si512(_mm512_srli_epi16(packed, 2 * t), _mm512_set1_epi8(3));
  u[0] = _mm512_shuffle_i64x2(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0));
  u[1] = _mm512_shuffle_i64x2(v[2], v[3], _MM_SHUFFLE(1, 0, 1, 0));
  u[2] = _mm512_shuffle_i64x2(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2));
  u[3] = _mm512_shuffle_i64x2(v[2], v[3], _MM_SHUFFLE(3, 2, 3, 2));
}

struct Q2K : SuperBlockFormat {
  static constexpr int type_size = 84;
  static void decode_regs(const uint8_t* block, Regs256& out) {
    two_bit_quants(block + 16, out.u);
    const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));  // scale | min << 4
    out.set_scales(_mm512_cvtepu8_epi32(_mm_and_si128(scales, _mm_set1_epi8(0x0F))));
    out.mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(scales, 4), _mm_set1_epi8(0x0F)));
    out.d = fp16(block + 80);
    out.dmin = fp16(block + 82);
  }
};

struct Q3K : SuperBlockFormat {
  static constexpr int type_size = 110;
  static void decode_regs(const uint8_t* block, Regs256& out) {
    two_bit_quants(block + 32, out.u);
    // A set hmask bit (bit b of byte i for element 32 b + i) means "no -4": u = low2 + 4 bit.
    const __m512i bits = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
    for (int k = 0; k < 4; ++k) {
      const __m512i probe = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << (2 * k))),
                                               _mm256_set1_epi8(static_cast<char>(2 << (2 * k))), 1);
      out.u[k] = _mm512_mask_add_epi8(out.u[k], _mm512_test_epi8_mask(bits, probe), out.u[k], _mm512_set1_epi8(4));
    }
    // 16 6-bit scales: low 4 bits are the nibbles of bytes 0-7, high 2 bits come from bytes 8-11.
    const uint64_t low = load_u64(block + 96);
    const uint32_t high = load_u32(block + 104);
    const __m128i low_nibbles = _mm_set_epi64x(static_cast<int64_t>((low >> 4) & 0x0F0F0F0F0F0F0F0Full),
                                               static_cast<int64_t>(low & 0x0F0F0F0F0F0F0F0Full));
    const __m128i high_bits = _mm_set_epi32(static_cast<int>((high >> 6) & 0x03030303u), static_cast<int>((high >> 4) & 0x03030303u),
                                            static_cast<int>((high >> 2) & 0x03030303u), static_cast<int>(high & 0x03030303u));
    const __m512i sc16 = _mm512_sub_epi32(
        _mm512_cvtepu8_epi32(_mm_or_si128(low_nibbles, _mm_slli_epi16(high_bits, 4))), _mm512_set1_epi32(32));
    out.set_scales(sc16);
    out.d = fp16(block + 108);
    out.set_zero(sc16, 4);
  }
};

#else

struct Q2K : SuperBlockFormat {
  static constexpr int type_size = 84;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* scales = block;
    const uint8_t* qs = block + 16;
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < 4; ++t)
        for (int i = 0; i < 32; ++i) out.u[128 * h + 32 * t + i] = (qs[32 * h + i] >> (2 * t)) & 3;
    int32_t sc[NGROUP];
    for (int j = 0; j < NGROUP; ++j) {
      sc[j] = scales[j] & 0x0F;
      out.mn[j] = scales[j] >> 4;
    }
    out.set_scales(sc);
    out.d = fp16(block + 80);
    out.dmin = fp16(block + 82);
  }
};

struct Q3K : SuperBlockFormat {
  static constexpr int type_size = 110;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* hmask = block;
    const uint8_t* qs = block + 32;
    const uint8_t* s = block + 96;
    // A set hmask bit means "no -4": store u = low2 + 4 * bit and shift by 4.
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < 4; ++t)
        for (int i = 0; i < 32; ++i) {
          const int e = 128 * h + 32 * t + i;
          out.u[e] = ((qs[32 * h + i] >> (2 * t)) & 3) | (((hmask[i] >> (e / 32)) & 1) << 2);
        }
    int32_t sc[NGROUP];
    for (int j = 0; j < NGROUP; ++j) {
      const int low = (j < 8 ? s[j] : s[j - 8] >> 4) & 0x0F;
      const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
      sc[j] = (low | (high << 4)) - 32;
    }
    out.set_scales(sc);
    out.d = fp16(block + 108);
    out.set_zero(sc, 4);
  }
};

#endif

}  // namespace moestream_cpu
