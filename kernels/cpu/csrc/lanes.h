// The int8 route for several activation rows (prefill) on AVX-512 VNNI: activation rows in the
// vector lanes, weights broadcast.
//
// fused_rows (matmul.h) keeps a decoded block in registers and dots it with each activation
// row: per 64 multiply-adds and row a u8 x s8 -> int16 product and an int16 x scale -> int32
// one (two multiplies), because the group scales have to be applied inside the vector. Here
// the lanes hold 8 or 16 activation rows instead: one `vpdpbusd` multiplies four weights of
// one output row (u8, broadcast from memory) with the same four elements (s8) of every activation
// row, so a group's sum needs no scale inside it, and the scale is applied once per group of
// 16 or 32 elements and output row (`vpmulld`). A tile of 8 weight rows is decoded once into
// L1 (the same decode_regs as fused_rows) and serves every pass of activation rows.
// (Activations as q + 128 and the weights as the signed operand, which would let the
// broadcast fold into vpdpbusd, measured the same here: broadcasts from memory cost no ALU.)
// The integers are those of fused_rows (sum_j sc_j (u . q)_j and sum_j mn_j bsum_j per block);
// only the float sums over blocks run in another order.
#pragma once

#include "blocks.h"
#include "job.h"
#include "regs.h"

#ifdef MOESTREAM_AVX512_VNNI

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace moestream_cpu {

// Vector operations on L int32 / float lanes (L = 16: zmm, L = 8: ymm).
template <int L>
struct Lanes;

template <>
struct Lanes<16> {
  using I = __m512i;
  using F = __m512;
  static I zero() { return _mm512_setzero_si512(); }
  static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I dpbusd(I acc, I u, I q) { return _mm512_dpbusd_epi32(acc, u, q); }
  static I dpwssd(I acc, I a, I b) { return _mm512_dpwssd_epi32(acc, a, b); }
  static I mac(I acc, I a, I b) { return _mm512_add_epi32(acc, _mm512_mullo_epi32(a, b)); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F fload(const float* p) { return _mm512_loadu_ps(p); }
  static F scale(float d, F dx) { return _mm512_mul_ps(_mm512_set1_ps(d), dx); }
  static F fmadd(I s, F d, F acc) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc); }
  static F fnmadd(I s, F d, F acc) { return _mm512_fnmadd_ps(_mm512_cvtepi32_ps(s), d, acc); }
  static void fstore(float* p, F v) { _mm512_storeu_ps(p, v); }
};

template <>
struct Lanes<8> {
  using I = __m256i;
  using F = __m256;
  static I zero() { return _mm256_setzero_si256(); }
  static I load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I dpbusd(I acc, I u, I q) { return _mm256_dpbusd_epi32(acc, u, q); }
  static I dpwssd(I acc, I a, I b) { return _mm256_dpwssd_epi32(acc, a, b); }
  static I mac(I acc, I a, I b) { return _mm256_add_epi32(acc, _mm256_mullo_epi32(a, b)); }
  static F fzero() { return _mm256_setzero_ps(); }
  static F fload(const float* p) { return _mm256_loadu_ps(p); }
  static F scale(float d, F dx) { return _mm256_mul_ps(_mm256_set1_ps(d), dx); }
  static F fmadd(I s, F d, F acc) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc); }
  static F fnmadd(I s, F d, F acc) { return _mm256_fnmadd_ps(_mm256_cvtepi32_ps(s), d, acc); }
  static void fstore(float* p, F v) { _mm256_storeu_ps(p, v); }
};

// Weight rows per tile: their group and block sums take 16 of the 32 vector registers (the
// float sums over blocks live in L1: lane_tile).
constexpr int LANE_TILE_ROWS = 8;
constexpr int KGROUPS = QK / 4;  // four-element groups per super-block (one vpdpbusd lane each)

// A tile of LANE_TILE_ROWS weight rows decoded, block-major: [block][row].
struct LaneTile {
  std::vector<int32_t> u;   // 64 words of four u8 per (block, row)
  std::vector<int32_t> sc;  // 16 group scales per (block, row)
  std::vector<int32_t> mn;  // 8 pairs of int16 group mins per (block, row)
  std::vector<float> d, dmin;

  void resize(int64_t nb) {
    const int64_t n = nb * LANE_TILE_ROWS;
    u.resize(n * KGROUPS);
    sc.resize(n * NGROUP);
    mn.resize(n * NGROUP / 2);
    d.resize(n);
    dmin.resize(n);
  }
};

// A pass of up to L activation rows, block-major, lane = row: [block][four-element group][L]
// words of four int8, [block][pair of 16-groups][L] int16 pairs of block sums, [block][L]
// scales. Lanes past the pass's rows are zero.
template <int L>
struct LanePass {
  std::vector<int32_t> q, bsum;
  std::vector<float> dx;

  void fill(const Act256* act, int64_t nb, int64_t rows) {
    q.assign(nb * KGROUPS * L, 0);
    bsum.assign(nb * NGROUP / 2 * L, 0);
    dx.assign(nb * L, 0.0f);
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        const Act256& a = act[m * nb + b];
        int32_t words[KGROUPS], pairs[NGROUP / 2];
        std::memcpy(words, a.q, sizeof(words));
        std::memcpy(pairs, a.bsum, sizeof(pairs));
        for (int g = 0; g < KGROUPS; ++g) q[(b * KGROUPS + g) * L + m] = words[g];
        for (int p = 0; p < NGROUP / 2; ++p) bsum[(b * NGROUP / 2 + p) * L + m] = pairs[p];
        dx[b * L + m] = a.d;
      }
  }
};

// Bumped by each thread as it starts its share of a parallel region (matmul.h: run_jobs):
// within one share the activation rows a job points to do not change.
inline uint64_t& lane_epoch() {
  thread_local uint64_t epoch = 1;
  return epoch;
}

// A job's activation rows as passes of up to L lanes (equal passes: 20 rows as 10 + 10),
// kept by the thread while its jobs in one region read the same rows (an expert's gate and
// up, an attention layer's q, k and v): the transposition is done once, not once per job.
template <int L>
struct LanePasses {
  std::vector<LanePass<L>> pass;
  std::vector<int64_t> first;  // pass p holds rows [first[p], first[p + 1])
  const void* act = nullptr;
  int64_t M = 0, nb = 0;
  uint64_t epoch = 0;

  static LanePasses& of(const Job& job, int64_t nb) {
    thread_local LanePasses kept;
    if (kept.act != job.act || kept.M != job.M || kept.nb != nb || kept.epoch != lane_epoch()) {
      const int64_t passes = (job.M + L - 1) / L;
      if (static_cast<int64_t>(kept.pass.size()) < passes) kept.pass.resize(passes);
      kept.first.assign(passes + 1, 0);
      const Act256* act = static_cast<const Act256*>(job.act);
      for (int64_t p = 0; p < passes; ++p) {
        kept.first[p + 1] = kept.first[p] + (job.M - kept.first[p]) / (passes - p);
        kept.pass[p].fill(act + kept.first[p] * nb, nb, kept.first[p + 1] - kept.first[p]);
      }
      kept.act = job.act;
      kept.M = job.M;
      kept.nb = nb;
      kept.epoch = lane_epoch();
    }
    return kept;
  }

  int64_t passes() const { return static_cast<int64_t>(first.size()) - 1; }
};

// Decodes weight rows [0, rows) of the tile (rows <= LANE_TILE_ROWS; the rest are zeros).
template <class Format>
void decode_tile(const uint8_t* weight, int64_t row_bytes, int64_t nb, int64_t rows, LaneTile& t) {
  constexpr int R = LANE_TILE_ROWS;
  // Raw pointers: the vector stores may alias anything, so vector members would be reloaded.
  int32_t* const tu = t.u.data();
  int32_t* const tsc = t.sc.data();
  int32_t* const tmn = t.mn.data();
  float* const td = t.d.data();
  float* const tdmin = t.dmin.data();
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = b * R + r;
      if (r >= rows) {
        std::fill_n(tu + i * KGROUPS, KGROUPS, 0);
        std::fill_n(tsc + i * NGROUP, NGROUP, 0);
        std::fill_n(tmn + i * NGROUP / 2, NGROUP / 2, 0);
        td[i] = tdmin[i] = 0.0f;
        continue;
      }
      Regs256 regs;
      Format::decode_regs(weight + r * row_bytes + b * Format::type_size, regs);
      for (int k = 0; k < 4; ++k) _mm512_storeu_si512(tu + i * KGROUPS + 16 * k, regs.u[k]);
      _mm512_storeu_si512(tsc + i * NGROUP, regs.sc16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmn + i * NGROUP / 2), regs.mn);
      td[i] = regs.d;
      tdmin[i] = regs.dmin;
    }
}

// out[r * L + lane] = the tile's row r dotted with the pass's row `lane`. GS: elements per
// distinct scale (16, or 32 where the format's scales come in equal pairs). The next tile's
// weight bytes [ahead, ahead + ahead_bytes) are prefetched over the blocks: decoding a tile
// is a burst of loads that the out-of-order window alone leaves waiting on DRAM (it took as
// long as the dots without this).
template <int L, int GS>
void lane_tile(const LaneTile& t, const LanePass<L>& a, int64_t nb, float* out, const uint8_t* ahead,
               int64_t ahead_bytes) {
  const int64_t ahead_step = (ahead_bytes / nb + 63) / 64 * 64;
  using V = Lanes<L>;
  constexpr int R = LANE_TILE_ROWS;
  // The float sums live in `out` (L1): in registers beside the 16 integer sums gcc spilled.
  for (int r = 0; r < R; ++r) V::fstore(out + r * L, V::fzero());
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t i = b * ahead_step; i < std::min(ahead_bytes, (b + 1) * ahead_step); i += 64)
      __builtin_prefetch(ahead + i, 0, 1);
    const int32_t* u = &t.u[b * R * KGROUPS];
    const int32_t* sc = &t.sc[b * R * NGROUP];
    const int32_t* q = &a.q[b * KGROUPS * L];
    typename V::I s1[R], p[R];
    for (int r = 0; r < R; ++r) s1[r] = V::zero();
    for (int j = 0; j < NGROUP; j += GS / GROUP) {
      for (int r = 0; r < R; ++r) p[r] = V::zero();
#pragma GCC unroll 8
      for (int i = 0; i < GS / 4; ++i) {
        const int g = 4 * j + i;
        const typename V::I codes = V::load(q + g * L);
        for (int r = 0; r < R; ++r) p[r] = V::dpbusd(p[r], V::set1(u[r * KGROUPS + g]), codes);
      }
      for (int r = 0; r < R; ++r) s1[r] = V::mac(s1[r], p[r], V::set1(sc[r * NGROUP + j]));
    }
    // The min term: int16 pairs of group mins x pairs of block sums.
    const int32_t* mn = &t.mn[b * R * NGROUP / 2];
    const int32_t* bs = &a.bsum[b * NGROUP / 2 * L];
    for (int r = 0; r < R; ++r) p[r] = V::zero();
    for (int k = 0; k < NGROUP / 2; ++k) {
      const typename V::I sums = V::load(bs + k * L);
      for (int r = 0; r < R; ++r) p[r] = V::dpwssd(p[r], sums, V::set1(mn[r * NGROUP / 2 + k]));
    }
    const typename V::F dx = V::fload(&a.dx[b * L]);
    for (int r = 0; r < R; ++r) {
      typename V::F acc = V::fmadd(s1[r], V::scale(t.d[b * R + r], dx), V::fload(out + r * L));
      V::fstore(out + r * L, V::fnmadd(p[r], V::scale(t.dmin[b * R + r], dx), acc));
    }
  }
}

// Elements per distinct group scale of a format (Q4_K, Q5_K: one 6-bit scale per 32).
template <class Format, class = void>
struct ScaleGroup {
  static constexpr int value = GROUP;
};
template <class Format>
struct ScaleGroup<Format, std::void_t<decltype(Format::scale_group)>> {
  static constexpr int value = Format::scale_group;
};

// Output rows [n0, n1) of a job of super-block format, in tiles of 8 rows, every pass of up
// to L activation rows over each decoded tile.
template <class Format, int L>
void lane_rows(const Job& job, int64_t n0, int64_t n1) {
  constexpr int R = LANE_TILE_ROWS;
  const int64_t nb = job.K / QK;
  const int64_t row_bytes = nb * Format::type_size;
  const LanePasses<L>& passes = LanePasses<L>::of(job, nb);
  const std::vector<int64_t>& first = passes.first;
  thread_local LaneTile tile;
  tile.resize(nb);
  alignas(64) float out[R * L];
  for (int64_t n = n0; n < n1; n += R) {
    const int64_t rows = std::min<int64_t>(R, n1 - n);
    decode_tile<Format>(job.weight + n * row_bytes, row_bytes, nb, rows, tile);
    const int64_t next = std::min<int64_t>(R, n1 - n - rows);  // the next tile's rows
    for (int64_t p = 0; p < passes.passes(); ++p) {
      lane_tile<L, ScaleGroup<Format>::value>(tile, passes.pass[p], nb, out, job.weight + (n + R) * row_bytes,
                                              p == 0 ? next * row_bytes : 0);
      for (int64_t m = first[p]; m < first[p + 1]; ++m)
        for (int64_t r = 0; r < rows; ++r) job.y[m * job.ldy + n + r] = out[r * L + (m - first[p])];
    }
  }
}

// Activation rows from which a job takes the lanes (fewer: fused_rows, which streams the
// weights at the memory's rate where the dots are cheap).
#ifndef MOESTREAM_LANE_MIN_ROWS
#define MOESTREAM_LANE_MIN_ROWS 8
#endif

// Lanes per pass for M activation rows: 8 (ymm) up to 8 rows, else 16 (zmm).
inline int lane_width(int64_t M) { return M <= 8 ? 8 : 16; }

template <class Format>
void run_lanes(const Job& job, int64_t n0, int64_t n1) {
  if (lane_width(job.M) == 8)
    lane_rows<Format, 8>(job, n0, n1);
  else
    lane_rows<Format, 16>(job, n0, n1);
}

}  // namespace moestream_cpu

#endif
