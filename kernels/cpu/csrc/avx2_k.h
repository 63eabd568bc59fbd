// AVX2 register path of the K-quants of the Q4_K_M / Q5_K_M mixes (Q4_K, Q5_K, Q6_K): each
// super-block is decoded 32 elements at a time into a ymm register and dotted there with
// up to 4 int8 activation rows (vpmaddubsw u8 x s8 -> int16 pairs, vpmaddwd x the group
// scales -> int32), as the AVX-512 path does with whole blocks. The memory path it replaces
// wrote each decoded block (256 bytes + 256 bytes of lane scales) to L1 and read it back:
// 2.3-2.7x slower per core. The integer sums and the float steps are those of
// dot_row_narrow (dot.h), in the same order, so the results are bitwise the same.
#pragma once

#include <type_traits>

#include "blocks.h"
#include "decode_k.h"
#include "dot.h"
#include "isa.h"
#include "job.h"

#if defined(MOESTREAM_AVX2) || defined(MOESTREAM_AVX512_VNNI)

namespace moestream_cpu {

// What a super-block's dot needs besides its chunks: w = d sc u - dmin mn (see blocks.h).
struct Avx2Block {
  __m256i mn;  // int16 per group of 16
  float d, dmin;
  __m256i sc;  // int16 per group of 16 (the exact route's floats; dead code in the int8 route)
};

// The int16 scales of a chunk's two groups of 16 elements (lanes 0-7: the first group,
// 8-15: the second, where vpmaddubsw puts their pairs), picked from `words` by one byte
// shuffle: word a of the low 128-bit half, word b of the high half (a, b constants once the
// chunk loop is unrolled). Scalar broadcasts cost 3-4 instructions per chunk instead.
inline __m256i pick_words(__m256i words, int a, int b) {
  const __m256i index = _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>((2 * b + 1) << 8 | 2 * b)),
                                         _mm_set1_epi16(static_cast<int16_t>((2 * a + 1) << 8 | 2 * a)));
  return _mm256_shuffle_epi8(words, index);
}

// Eight bytes, one per 32 elements -> sixteen int16, one per group of 16.
inline __m256i twice_u8_epi16(uint64_t bytes) {
  const __m128i v = _mm_cvtsi64_si128(static_cast<int64_t>(bytes));
  return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v));
}

// Formats with a register decoder: decode(block, chunk) calls chunk(k, u, scales) for the
// elements 32 k .. 32 k + 31 (u unsigned, below 64) and returns the block's constants.
template <class F>
struct Avx2Regs : std::false_type {};

// Eight bytes (Q4_K/Q5_K scales, one per 32 elements) -> int16 words 0-7 in both halves.
inline __m256i scale_words(uint64_t bytes) {
  return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<int64_t>(bytes))));
}

template <>
struct Avx2Regs<Q4K> : std::true_type {
  template <class Chunk>
  static Avx2Block decode(const uint8_t* block, Chunk&& chunk) {
    uint64_t scales, mins;  // byte i: scale / min of elements 32 i .. 32 i + 31
    k_scales_mins(block, scales, mins);
    const __m256i words = scale_words(scales);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {  // 32 bytes: low nibbles are chunk 2c, high nibbles 2c + 1
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16 + 32 * c));
      chunk(2 * c, _mm256_and_si256(packed, nibble), pick_words(words, 2 * c, 2 * c));
      chunk(2 * c + 1, _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble), pick_words(words, 2 * c + 1, 2 * c + 1));
    }
    return {twice_u8_epi16(mins), fp16(block), fp16(block + 2), twice_u8_epi16(scales)};
  }
};

// Bit `bit` of each byte moved to bit 4 (the fifth bit of a Q5_K value).
inline __m256i bit_to_fifth(__m256i bytes, int bit) {
  const __m256i moved = bit <= 4 ? _mm256_slli_epi16(bytes, 4 - bit) : _mm256_srli_epi16(bytes, bit - 4);
  return _mm256_and_si256(moved, _mm256_set1_epi8(0x10));  // shifts stay within each byte's bit
}

template <>
struct Avx2Regs<Q5K> : std::true_type {
  template <class Chunk>
  static Avx2Block decode(const uint8_t* block, Chunk&& chunk) {
    uint64_t scales, mins;
    k_scales_mins(block, scales, mins);
    const __m256i words = scale_words(scales);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16));
    for (int c = 0; c < 4; ++c) {  // element 32 b + i takes bit b of qh[i] as its bit 4
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 48 + 32 * c));
      chunk(2 * c, _mm256_or_si256(_mm256_and_si256(packed, nibble), bit_to_fifth(qh, 2 * c)),
            pick_words(words, 2 * c, 2 * c));
      chunk(2 * c + 1,
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble), bit_to_fifth(qh, 2 * c + 1)),
            pick_words(words, 2 * c + 1, 2 * c + 1));
    }
    return {twice_u8_epi16(mins), fp16(block), fp16(block + 2), twice_u8_epi16(scales)};
  }
};

template <>
struct Avx2Regs<Q6K> : std::true_type {
  template <class Chunk>
  static Avx2Block decode(const uint8_t* block, Chunk&& chunk) {
    // int16 scales, one per 16 elements: groups 0-7 (both halves), groups 8-15 (both halves)
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)));
    const __m256i words[2] = {_mm256_permute2x128_si256(sc16, sc16, 0x00), _mm256_permute2x128_si256(sc16, sc16, 0x11)};
    const __m256i nibble = _mm256_set1_epi8(0x0F), two_bits = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; ++h) {  // 128 elements: ql 64 bytes (low, high nibbles), qh 32 bytes
      const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * h));
      const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * h + 32));
      const __m256i top = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * h));
      // qh bits 2t..2t+1 of byte i are bits 4-5 of element 128 h + 32 t + i.
      const __m256i u[4] = {
          _mm256_or_si256(_mm256_and_si256(ql0, nibble), _mm256_and_si256(_mm256_slli_epi16(top, 4), two_bits)),
          _mm256_or_si256(_mm256_and_si256(ql1, nibble), _mm256_and_si256(_mm256_slli_epi16(top, 2), two_bits)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), nibble), _mm256_and_si256(top, two_bits)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), nibble),
                          _mm256_and_si256(_mm256_srli_epi16(top, 2), two_bits))};
      for (int t = 0; t < 4; ++t) {
        const int k = 4 * h + t;
        chunk(k, u[t], pick_words(words[h], 2 * t, 2 * t + 1));  // groups 2k, 2k + 1 = 8h + 2t, + 1
      }
    }
    // Signed values v = u - 32: the shift is the min term, mn = 32 sc, dmin = d.
    const float d = fp16(block + 208);
    return {_mm256_slli_epi16(sc16, 5), d, d, sc16};
  }
};

// Rows [n0, n1) of the output against MT activation rows from m0, every block decoded once
// per pass and dotted in registers (dot_row_narrow's arithmetic, row by row).
template <class F, int MT>
void avx2_rows(const Job& job, int64_t n0, int64_t n1, int64_t m0) {
  const int64_t nb = job.K / QK;
  const int64_t row_bytes = nb * F::type_size;
  const Act256* act = static_cast<const Act256*>(job.act) + m0 * nb;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MT], acc_min[MT];
    for (int m = 0; m < MT; ++m) acc[m] = acc_min[m] = _mm256_setzero_ps();
    const uint8_t* row = job.weight + n * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      __m256i sum[MT];
      for (int m = 0; m < MT; ++m) sum[m] = _mm256_setzero_si256();
      const Avx2Block blk = Avx2Regs<F>::decode(row + b * F::type_size, [&](int k, __m256i u, __m256i scales) {
        for (int m = 0; m < MT; ++m) {
          const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(act[m * nb + b].q + 32 * k));
          sum[m] = _mm256_add_epi32(sum[m], _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), scales));
        }
      });
      for (int m = 0; m < MT; ++m) {
        const Act256& x = act[m * nb + b];
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m]), _mm256_set1_ps(blk.d * x.d), acc[m]);
        const __m256i mins = _mm256_madd_epi16(blk.mn, _mm256_load_si256(reinterpret_cast<const __m256i*>(x.bsum)));
        acc_min[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(blk.dmin * x.d), acc_min[m]);
      }
    }
    for (int m = 0; m < MT; ++m) job.y[(m0 + m) * job.ldy + n] = hsum256(acc[m]) - hsum256(acc_min[m]);
  }
}

// The exact route's weights of a block, per group j: w = a[j] u - b[j], a = d sc, b = dmin mn.
inline void group_floats(const Avx2Block& blk, float* a, float* b) {
  const __m256i halves[2][2] = {{_mm256_cvtepi16_epi32(_mm256_castsi256_si128(blk.sc)),
                                 _mm256_cvtepi16_epi32(_mm256_extracti128_si256(blk.sc, 1))},
                                {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(blk.mn)),
                                 _mm256_cvtepi16_epi32(_mm256_extracti128_si256(blk.mn, 1))}};
  for (int h = 0; h < 2; ++h) {
    _mm256_store_ps(a + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(halves[0][h]), _mm256_set1_ps(blk.d)));
    _mm256_store_ps(b + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(halves[1][h]), _mm256_set1_ps(blk.dmin)));
  }
}

// The exact route (fp32 activations, fp32 FMAs) in registers: each block's chunks are turned
// into floats 8 at a time, w = a_j u - b_j, and FMA'd against MT activation rows (several
// accumulators per row when MT is small). The memory path wrote 1 KiB of floats per block
// to L1 and read it back per row: 4-5x slower per core.
template <class F, int MT>
void avx2_exact_rows(const Job& job, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int chains = (4 + MT - 1) / MT;
  const int64_t nb = job.K / QK;
  const int64_t row_bytes = nb * F::type_size;
  const float* x = static_cast<const float*>(job.act) + m0 * job.K;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MT][chains];
    for (auto& row : acc)
      for (auto& lane : row) lane = _mm256_setzero_ps();
    const uint8_t* weight = job.weight + n * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      __m256i u[8];
      const Avx2Block blk = Avx2Regs<F>::decode(weight + b * F::type_size, [&](int k, __m256i v, __m256i) { u[k] = v; });
      alignas(32) float a[NGROUP], mn[NGROUP];
      group_floats(blk, a, mn);
      const float* xb = x + b * QK;
      for (int k = 0; k < 8; ++k) {
        const __m128i halves[2] = {_mm256_castsi256_si128(u[k]), _mm256_extracti128_si256(u[k], 1)};
        for (int p = 0; p < 4; ++p) {  // 8 elements each; pieces 0-1 are group 2k, 2-3 group 2k + 1
          const __m128i bytes = p % 2 ? _mm_srli_si128(halves[p / 2], 8) : halves[p / 2];
          const int j = 2 * k + p / 2;
          const __m256 w = _mm256_fmsub_ps(_mm256_set1_ps(a[j]), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)),
                                           _mm256_set1_ps(mn[j]));
          for (int m = 0; m < MT; ++m)
            acc[m][p % chains] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + m * job.K + 32 * k + 8 * p), acc[m][p % chains]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      __m256 sum = acc[m][0];
      for (int c = 1; c < chains; ++c) sum = _mm256_add_ps(sum, acc[m][c]);
      job.y[(m0 + m) * job.ldy + n] = hsum256(sum);
    }
  }
}

}  // namespace moestream_cpu

#endif
