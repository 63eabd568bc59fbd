// IQ super-blocks (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_XS) -> decoded form.
// Byte layouts: ggml-common.h block_iq*; the codebooks come from gguf.quants through the
// generated gguf_constants.h (see kernels/cpu/build.py). Grid magnitudes are below 64, so a
// signed value v is stored as u = 64 + v. AVX-512 decodes into registers (grid entries, sign
// masks); the portable loops define the same values eight bytes at a time.
#pragma once

#include "blocks.h"
#include "decode_legacy.h"
#include "gguf_constants.h"
#include "regs.h"

namespace moestream_cpu {

constexpr int IQ_ZERO = 64;

#ifdef MOESTREAM_AVX512_VNNI

// 64 magnitudes (bytes) and their 64 sign bits -> 64 bytes IQ_ZERO +- magnitude.
inline __m512i signed64(__m512i magnitudes, uint64_t negative) {
  const __m512i zero = _mm512_set1_epi8(IQ_ZERO);
  return _mm512_mask_sub_epi8(_mm512_add_epi8(zero, magnitudes), negative, zero, magnitudes);
}

// Eight grid entries of 8 bytes (IQ2 types) -> 64 bytes. Scalar loads and inserts beat
// vpgatherqq on the machine we measured; for the 4-byte IQ3 entries the gather wins.
inline __m512i grid8x8(const uint64_t* grid, const unsigned* index) {
  return _mm512_set_epi64(grid[index[7]], grid[index[6]], grid[index[5]], grid[index[4]], grid[index[3]],
                          grid[index[2]], grid[index[1]], grid[index[0]]);
}

// Bytes holding 7 stored sign bits -> 8 sign bits: bit 7 makes the parity even. This is what
// the ksigns table of the IQ2/IQ3 types holds, computed for 8 bytes at once.
inline uint64_t with_parity(uint64_t sevens) {
  uint64_t t = sevens ^ (sevens >> 4);
  t ^= t >> 2;
  t ^= t >> 1;  // bit 0 of each byte: parity of that byte (shifts stay inside it)
  return sevens | (t & 0x0101010101010101ull) << 7;
}

// IQ2_XXS/IQ3_XXS: four 7-bit sign indices (bits 0-27 of aux) -> 32 sign bits.
inline uint64_t ksigns32(uint32_t aux) { return with_parity(_pdep_u64(aux, 0x7F7F7F7Full)); }

// Per-32 scales s (bits 28-31 of aux) of sub-blocks 2p, 2p + 1 -> bytes 2s + 1 at 2p, 2p + 1.
inline uint64_t odd_scale_pair(uint32_t aux_a, uint32_t aux_b, int p) {
  return uint64_t(2 * (aux_a >> 28) + 1) << (16 * p) | uint64_t(2 * (aux_b >> 28) + 1) << (16 * p + 8);
}

// IQ2_XS/IQ2_S: 8 bytes of 4-bit scales, one per 16 elements (low nibble first) -> 2 s + 1.
inline __m512i iq2_scales(const uint8_t* scales) {
  const uint64_t v = load_u64(scales);
  const __m128i low = _mm_cvtsi64_si128(static_cast<int64_t>(v & 0x0F0F0F0F0F0F0F0Full));
  const __m128i high = _mm_cvtsi64_si128(static_cast<int64_t>((v >> 4) & 0x0F0F0F0F0F0F0F0Full));
  const __m512i s = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high));
  return _mm512_add_epi32(_mm512_add_epi32(s, s), _mm512_set1_epi32(1));
}

inline void finish_iq(Regs256& out, __m512i sc16, float d) {
  out.set_scales(sc16);
  out.d = d;
  out.set_zero(sc16, IQ_ZERO);
}

struct IQ2XXS : SuperBlockFormat {
  static constexpr int type_size = 66;
  static void decode_regs(const uint8_t* block, Regs256& out) {
    uint64_t scales = 0;
    for (int p = 0; p < 4; ++p) {  // sub-blocks 2p, 2p + 1: 4 grid bytes, uint32 signs + scale
      const uint8_t* a = block + 2 + 16 * p;
      const uint8_t* b = a + 8;
      const uint32_t aux_a = load_u32(a + 4), aux_b = load_u32(b + 4);
      const unsigned index[8] = {a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]};
      const __m512i magnitudes = grid8x8(IQ2XXS_GRID, index);
      out.u[p] = signed64(magnitudes, ksigns32(aux_a) | ksigns32(aux_b) << 32);
      scales |= odd_scale_pair(aux_a, aux_b, p);
    }
    finish_iq(out, twice_u8(scales), fp16(block) * 0.125f);  // d (0.5 + s) / 4 == d / 8 (2 s + 1)
  }
};

struct IQ2XS : SuperBlockFormat {
  static constexpr int type_size = 74;
  static void decode_regs(const uint8_t* block, Regs256& out) {
    for (int p = 0; p < 4; ++p) {  // 8 uint16: 9-bit grid index, 7-bit sign index
      const uint8_t* q = block + 2 + 16 * p;
      unsigned index[8];
      for (int i = 0; i < 8; ++i) index[i] = load_u16(q + 2 * i) & 511;
      const __m128i sevens = _mm_srli_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), 9);
      const uint64_t negative = with_parity(static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_packus_epi16(sevens, sevens))));
      out.u[p] = signed64(grid8x8(IQ2XS_GRID, index), negative);
    }
    finish_iq(out, iq2_scales(block + 66), fp16(block) * 0.125f);
  }
};

struct IQ2S : SuperBlockFormat {
  static constexpr int type_size = 82;
  static void decode_regs(const uint8_t* block, Regs256& out) {
    for (int p = 0; p < 4; ++p) {  // 8 groups of 8: index = qs byte | 2 bits of qh << 8
      const uint8_t* qs = block + 2 + 8 * p;
      const unsigned high = load_u16(block + 66 + 2 * p);
      unsigned index[8];
      for (int i = 0; i < 8; ++i) index[i] = qs[i] | ((high >> (2 * i)) & 3) << 8;
      out.u[p] = signed64(grid8x8(IQ2S_GRID, index), load_u64(block + 34 + 8 * p));
    }
    finish_iq(out, iq2_scales(block + 74), fp16(block) * 0.125f);
  }
};

struct IQ3XXS : SuperBlockFormat {
  static constexpr int type_size = 98;
  static void decode_regs(const uint8_t* block, Regs256& out) {
    uint64_t scales = 0;
    for (int p = 0; p < 4; ++p) {  // 16 grid bytes of 4 values; sub-blocks 2p, 2p + 1
      const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 + 16 * p)));
      const __m512i magnitudes = _mm512_i32gather_epi32(index, IQ3XXS_GRID, 4);
      const uint32_t aux_a = load_u32(block + 66 + 8 * p), aux_b = load_u32(block + 70 + 8 * p);
      out.u[p] = signed64(magnitudes, ksigns32(aux_a) | ksigns32(aux_b) << 32);
      scales |= odd_scale_pair(aux_a, aux_b, p);
    }
    finish_iq(out, twice_u8(scales), fp16(block) * 0.25f);  // d (0.5 + s) / 2 == d / 4 (2 s + 1)
  }
};

struct IQ3S : SuperBlockFormat {
  static constexpr int type_size = 110;
  static void decode_regs(const uint8_t* block, Regs256& out) {
    for (int p = 0; p < 4; ++p) {  // 16 9-bit grid indices (qs byte, qh bit), 64 sign bits
      const __m512i low = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 + 16 * p)));
      const __m512i high = _mm512_maskz_mov_epi32(load_u16(block + 66 + 2 * p), _mm512_set1_epi32(256));
      const __m512i magnitudes = _mm512_i32gather_epi32(_mm512_or_si512(low, high), IQ3S_GRID, 4);
      out.u[p] = signed64(magnitudes, load_u64(block + 74 + 8 * p));
    }
    const __m512i s = twice_u8(_pdep_u64(load_u32(block + 106), 0x0F0F0F0F0F0F0F0Full));  // per 32
    finish_iq(out, _mm512_add_epi32(_mm512_add_epi32(s, s), _mm512_set1_epi32(1)), fp16(block));
  }
};

#else

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

#endif

constexpr int IQ4_ZERO = 128;  // the non-linear values span -127..113

// IQ4_XS: eight 6-bit scales (minus 32), low 4 bits in scales_l nibbles, high 2 bits in the
// uint16 scales_h; values come from the 16-entry non-linear table.
#ifdef MOESTREAM_AVX512_VNNI

struct IQ4XS : SuperBlockFormat {
  static constexpr int type_size = 136;
  static constexpr bool narrow = false;
  static void decode_regs(const uint8_t* block, Regs256& out) {
    // 16-entry table lookup per 128-bit lane (vpshufb), then interleave each 16-byte group's
    // low and high nibbles: group s holds elements 32 s + (0..15 low, 16..31 high).
    const __m512i table = _mm512_broadcast_i32x4(_mm_add_epi8(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(KVALUES_IQ4NL)), _mm_set1_epi8(static_cast<char>(IQ4_ZERO))));
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    for (int p = 0; p < 2; ++p) {
      const __m512i packed = _mm512_loadu_si512(block + 8 + 64 * p);
      const __m512i low = _mm512_shuffle_epi8(table, _mm512_and_si512(packed, _mm512_set1_epi8(0x0F)));
      const __m512i high = _mm512_shuffle_epi8(
          table, _mm512_and_si512(_mm512_srli_epi16(packed, 4), _mm512_set1_epi8(0x0F)));
      out.u[2 * p] = _mm512_permutex2var_epi64(low, first, high);
      out.u[2 * p + 1] = _mm512_permutex2var_epi64(low, second, high);
    }
    const uint64_t low_bits = _pdep_u64(load_u32(block + 4), 0x0F0F0F0F0F0F0F0Full);
    const uint64_t high_bits = _pdep_u64(load_u16(block + 2), 0x3030303030303030ull);
    const __m512i sc16 = _mm512_sub_epi32(twice_u8(low_bits | high_bits), _mm512_set1_epi32(32));
    out.set_scales(sc16);
    out.d = fp16(block);
    out.set_zero(sc16, IQ4_ZERO);
  }
};

#else

struct IQ4XS : SuperBlockFormat {
  static constexpr int type_size = 136;
  static constexpr bool narrow = false;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint16_t scales_h = load_u16(block + 2);
    const uint8_t* scales_l = block + 4;
    const uint8_t* qs = block + 8;
    static_assert(IQ4_ZERO == 128, "iq4_lookup stores kvalue + 128");
    for (int s = 0; s < 8; ++s) iq4_lookup(qs + 16 * s, out.u + 32 * s);  // 16 bytes per 32 elements
    int32_t sc[NGROUP];
    for (int s = 0; s < 8; ++s)
      sc[2 * s] = sc[2 * s + 1] = (((scales_l[s / 2] >> (4 * (s % 2))) & 0x0F) | (((scales_h >> (2 * s)) & 3) << 4)) - 32;
    out.set_scales(sc);
    out.d = fp16(block);
    out.set_zero(sc, IQ4_ZERO);
  }
};

#endif

}  // namespace moestream_cpu
