// K-quant super-blocks (Q2_K..Q6_K) -> Decoded256. Byte layouts: ggml-common.h block_q*_K,
// element order as gguf.quants.Q*_K.dequantize_blocks. Loops are written so gcc vectorises them.
#pragma once

#include "blocks.h"

namespace moestream_cpu {

// Q4_K/Q5_K: 12 bytes hold eight 6-bit scales and eight 6-bit mins (one per 32 elements).
inline void k_scale_min(const uint8_t* s, uint8_t* scale, uint8_t* min) {
  for (int j = 0; j < 4; ++j) {
    scale[j] = s[j] & 63;
    min[j] = s[j + 4] & 63;
    scale[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
    min[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
  }
}

inline void set_affine_k(const uint8_t* block, Decoded256& out) {
  uint8_t scale[8], min[8];
  k_scale_min(block + 4, scale, min);
  for (int j = 0; j < NGROUP; ++j) {
    out.set_scale(j, scale[j / 2]);
    out.mn[j] = min[j / 2];
  }
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
    for (int j = 0; j < NGROUP; ++j) out.set_scale(j, scales[j]);
    out.d = fp16(block + 208);
    out.set_zero(32);
  }
};

struct Q2K : SuperBlockFormat {
  static constexpr int type_size = 84;
  static void decode(const uint8_t* block, Decoded256& out) {
    const uint8_t* scales = block;
    const uint8_t* qs = block + 16;
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < 4; ++t)
        for (int i = 0; i < 32; ++i) out.u[128 * h + 32 * t + i] = (qs[32 * h + i] >> (2 * t)) & 3;
    for (int j = 0; j < NGROUP; ++j) {
      out.set_scale(j, scales[j] & 0x0F);
      out.mn[j] = scales[j] >> 4;
    }
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
    for (int j = 0; j < NGROUP; ++j) {
      const int low = (j < 8 ? s[j] : s[j - 8] >> 4) & 0x0F;
      const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
      out.set_scale(j, (low | (high << 4)) - 32);
    }
    out.d = fp16(block + 108);
    out.set_zero(4);
  }
};

}  // namespace moestream_cpu
