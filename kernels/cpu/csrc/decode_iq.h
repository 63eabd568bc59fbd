// IQ super-blocks (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_XS) -> Decoded256.
// Byte layouts: ggml-common.h block_iq*; the codebooks come from gguf.quants through the
// generated iq_tables.h (see kernels/cpu/build.py). Grid magnitudes are below 64, so a signed
// value v is stored as u = 64 + v, eight bytes at a time without carries between bytes.
#pragma once

#include "blocks.h"
#include "gguf_constants.h"

namespace moestream_cpu {

constexpr int IQ_ZERO = 64;
constexpr uint64_t ZERO_BYTES = 0x4040404040404040ull;

// 0xFF in byte k of entry s where bit k of s is set: turns 8 sign bits into a byte mask.
struct SignMasks {
  uint64_t mask[256];
  constexpr SignMasks() : mask() {
    for (int s = 0; s < 256; ++s)
      for (int k = 0; k < 8; ++k)
        if (s >> k & 1) mask[s] |= 0xFFull << (8 * k);
  }
};
constexpr SignMasks SIGN_MASKS{};

// Eight magnitudes (one per byte) and their sign bits -> eight shifted bytes 64 +- g.
inline void put_signed8(uint8_t* u, uint64_t magnitudes, unsigned sign_bits) {
  const uint64_t neg = SIGN_MASKS.mask[sign_bits];
  const uint64_t v = ((ZERO_BYTES + magnitudes) & ~neg) | ((ZERO_BYTES - magnitudes) & neg);
  std::memcpy(u, &v, 8);
}

inline uint64_t grid4x2(const uint32_t* grid, unsigned a, unsigned b) {
  return grid[a] | (static_cast<uint64_t>(grid[b]) << 32);
}

// IQ2_XS/IQ2_S: one 4-bit scale per 16 elements, two per byte; value scale d * (2 s + 1) / 8.
inline void set_iq2_scales(const uint8_t* scales, float d, Decoded256& out) {
  int32_t sc[NGROUP];
  for (int j = 0; j < NGROUP; ++j) sc[j] = 2 * ((scales[j / 2] >> (4 * (j % 2))) & 0x0F) + 1;
  out.set_scales(sc);
  out.d = d * 0.125f;
  out.set_zero(sc, IQ_ZERO);
}

struct IQ2XXS : SuperBlockFormat {
  static constexpr int type_size = 66;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* qs = block + 2;
    int32_t sc[NGROUP];
    for (int s = 0; s < 8; ++s) {  // per 32 elements: 4 grid bytes, then uint32 signs + scale
      const uint32_t aux = load_u32(qs + 8 * s + 4);
      for (int g = 0; g < 4; ++g)
        put_signed8(out.u + 32 * s + 8 * g, IQ2XXS_GRID[qs[8 * s + g]], KSIGNS[(aux >> (7 * g)) & 127]);
      sc[2 * s] = sc[2 * s + 1] = 2 * (aux >> 28) + 1;
    }
    out.set_scales(sc);
    out.d = fp16(block) * 0.125f;
    out.set_zero(sc, IQ_ZERO);
  }
};

struct IQ2XS : SuperBlockFormat {
  static constexpr int type_size = 74;
  static void decode(const uint8_t* block, Decoded256& out) {
    for (int g = 0; g < 32; ++g) {  // uint16: 9-bit grid index, 7-bit sign index
      const uint16_t q = load_u16(block + 2 + 2 * g);
      put_signed8(out.u + 8 * g, IQ2XS_GRID[q & 511], KSIGNS[q >> 9]);
    }
    set_iq2_scales(block + 66, fp16(block), out);
  }
};

struct IQ2S : SuperBlockFormat {
  static constexpr int type_size = 82;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* qs = block + 2;
    const uint8_t* signs = block + 34;
    const uint8_t* qh = block + 66;
    for (int g = 0; g < 32; ++g) {
      const unsigned index = qs[g] | (((qh[g / 4] >> (2 * (g % 4))) & 3) << 8);
      put_signed8(out.u + 8 * g, IQ2S_GRID[index], signs[g]);
    }
    set_iq2_scales(block + 74, fp16(block), out);
  }
};

struct IQ3XXS : SuperBlockFormat {
  static constexpr int type_size = 98;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* qs = block + 2;
    const uint8_t* aux_bytes = block + 66;
    int32_t sc[NGROUP];
    for (int s = 0; s < 8; ++s) {  // per 32 elements: 8 grid bytes; uint32 signs + scale
      const uint32_t aux = load_u32(aux_bytes + 4 * s);
      for (int g = 0; g < 4; ++g) {
        const uint64_t mag = grid4x2(IQ3XXS_GRID, qs[8 * s + 2 * g], qs[8 * s + 2 * g + 1]);
        put_signed8(out.u + 32 * s + 8 * g, mag, KSIGNS[(aux >> (7 * g)) & 127]);
      }
      sc[2 * s] = sc[2 * s + 1] = 2 * (aux >> 28) + 1;
    }
    out.set_scales(sc);
    out.d = fp16(block) * 0.25f;  // d * (0.5 + s) / 2 == d / 4 * (2 s + 1)
    out.set_zero(sc, IQ_ZERO);
  }
};

struct IQ3S : SuperBlockFormat {
  static constexpr int type_size = 110;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* qs = block + 2;
    const uint8_t* qh = block + 66;
    const uint8_t* signs = block + 74;
    const uint8_t* scales = block + 106;
    for (int g = 0; g < 32; ++g) {  // 8 elements: two 9-bit grid indices, 8 sign bits
      const int a = 2 * g, b = 2 * g + 1;
      const unsigned ia = qs[a] | (((qh[a / 8] >> (a % 8)) & 1) << 8);
      const unsigned ib = qs[b] | (((qh[b / 8] >> (b % 8)) & 1) << 8);
      put_signed8(out.u + 8 * g, grid4x2(IQ3S_GRID, ia, ib), signs[g]);
    }
    int32_t sc[NGROUP];
    for (int j = 0; j < NGROUP; ++j) sc[j] = 1 + 2 * ((scales[j / 4] >> (4 * (j / 2 % 2))) & 0x0F);
    out.set_scales(sc);
    out.d = fp16(block);
    out.set_zero(sc, IQ_ZERO);
  }
};

constexpr int IQ4_ZERO = 128;  // the non-linear values span -127..113

struct IQ4XS : SuperBlockFormat {
  static constexpr int type_size = 136;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint16_t scales_h = load_u16(block + 2);
    const uint8_t* scales_l = block + 4;
    const uint8_t* qs = block + 8;
#ifdef MOESTREAM_AVX512_VNNI
    // 16-entry table lookup per 128-bit lane (vpshufb), then interleave each 16-byte group's
    // low and high nibbles: group s holds elements 32 s + (0..15 low, 16..31 high).
    const __m512i table = _mm512_broadcast_i32x4(_mm_add_epi8(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(KVALUES_IQ4NL)), _mm_set1_epi8(static_cast<char>(IQ4_ZERO))));
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    for (int p = 0; p < 2; ++p) {
      const __m512i packed = _mm512_loadu_si512(qs + 64 * p);
      const __m512i low = _mm512_shuffle_epi8(table, _mm512_and_si512(packed, _mm512_set1_epi8(0x0F)));
      const __m512i high = _mm512_shuffle_epi8(
          table, _mm512_and_si512(_mm512_srli_epi16(packed, 4), _mm512_set1_epi8(0x0F)));
      _mm512_store_si512(out.u + 128 * p, _mm512_permutex2var_epi64(low, first, high));
      _mm512_store_si512(out.u + 128 * p + 64, _mm512_permutex2var_epi64(low, second, high));
    }
#else
    for (int s = 0; s < 8; ++s)  // 16 bytes per 32 elements: low nibbles, then high
      for (int i = 0; i < 16; ++i) {
        out.u[32 * s + i] = KVALUES_IQ4NL[qs[16 * s + i] & 0x0F] + IQ4_ZERO;
        out.u[32 * s + 16 + i] = KVALUES_IQ4NL[qs[16 * s + i] >> 4] + IQ4_ZERO;
      }
#endif
    int32_t sc[NGROUP];
    for (int s = 0; s < 8; ++s)
      sc[2 * s] = sc[2 * s + 1] = (((scales_l[s / 2] >> (4 * (s % 2))) & 0x0F) | (((scales_h >> (2 * s)) & 3) << 4)) - 32;
    out.set_scales(sc);
    out.d = fp16(block);
    out.set_zero(sc, IQ4_ZERO);
  }
};

}  // namespace moestream_cpu
