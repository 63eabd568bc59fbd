// The exact route: y = x W^T with the activations kept in float32 and fp32 accumulation.
// Each weight block is decoded (the same decoders as the int8 route) and turned into floats
// w = d * sc * u - dmin * mn per group of 16, then FMA'd against every activation row of the
// pass. Error: fp32 rounding only (relative ~1e-6), against ~0.7% for the int8 route.
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "floats.h"
#include "job.h"

namespace moestream_cpu {

#ifdef MOESTREAM_AVX512_VNNI

// Calls fn(std::integral_constant<int, J>) for J = 0 .. N - 1: lane selects need immediates.
template <class Fn, int... J>
inline void each_index(Fn&& fn, std::integer_sequence<int, J...>) {
  (fn(std::integral_constant<int, J>{}), ...);
}

// Floats per group of 16 of a super-block, in registers: w = a_j u - b_j.
struct Floats256 {
  alignas(64) float a[NGROUP];  // d * sc_j
  alignas(64) float b[NGROUP];  // dmin * mn_j

  explicit Floats256(const Regs256& r) {
    _mm512_store_ps(a, _mm512_mul_ps(_mm512_cvtepi32_ps(r.sc16), _mm512_set1_ps(r.d)));
    _mm512_store_ps(b, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(r.mn)), _mm512_set1_ps(r.dmin)));
  }

  template <int J>
  __m512 group(const Regs256& r) const {
    const __m128i bytes = _mm512_extracti32x4_epi32(r.u[J / 4], J % 4);
    const __m512 u = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
    return _mm512_fmsub_ps(_mm512_set1_ps(a[J]), u, _mm512_set1_ps(b[J]));
  }
};

// Floats of a 32-element block: w = d u + m.
struct Floats32 {
  __m512 d, m;

  explicit Floats32(const Regs32& r) : d(_mm512_set1_ps(r.d)), m(_mm512_set1_ps(r.m)) {}

  template <int J>
  __m512 group(const Regs32& r) const {
    const __m128i bytes = J == 0 ? _mm256_castsi256_si128(r.u) : _mm256_extracti128_si256(r.u, 1);
    return _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), m);
  }
};

template <class Regs>
struct FloatsFor;
template <>
struct FloatsFor<Regs256> {
  using Floats = Floats256;
};
template <>
struct FloatsFor<Regs32> {
  using Floats = Floats32;
};

// Rows [n0, n1) of the output against MT activation rows from m0: each block is decoded into
// registers once, turned into floats group by group, and FMA'd into every row's accumulators
// (several per row when MT is small, so consecutive FMAs do not wait on each other).
template <class F, int MT>
void exact_rows(const Job& job, int64_t n0, int64_t n1, int64_t m0) {
  using Regs = typename RegsFor<typename F::Act>::Regs;
  using Floats = typename FloatsFor<Regs>::Floats;
  constexpr int groups = F::block_size / 16;
  constexpr int chains = (4 + MT - 1) / MT;
  const int64_t nb = job.K / F::block_size;
  const int64_t row_bytes = nb * F::type_size;
  const float* x = static_cast<const float*>(job.act) + m0 * job.K;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MT][chains];
    for (auto& row : acc)
      for (auto& lane : row) lane = _mm512_setzero_ps();
    const uint8_t* weight = job.weight + n * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      Regs regs;
      F::decode_regs(weight + b * F::type_size, regs);
      const Floats floats(regs);
      const float* xb = x + b * F::block_size;
      each_index([&](auto index) {
        constexpr int j = decltype(index)::value;
        const __m512 w = floats.template group<j>(regs);
        for (int m = 0; m < MT; ++m)
          acc[m][j % chains] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + m * job.K + 16 * j), acc[m][j % chains]);
      }, std::make_integer_sequence<int, groups>{});
    }
    for (int m = 0; m < MT; ++m) {
      __m512 sum = acc[m][0];
      for (int c = 1; c < chains; ++c) sum = _mm512_add_ps(sum, acc[m][c]);
      job.y[(m0 + m) * job.ldy + n] = _mm512_reduce_add_ps(sum);
    }
  }
}

// Activation rows per pass, and weight bytes per tile (kept in L2 between passes), as in the
// int8 route (matmul.h).
constexpr int EXACT_ROWS = 4;
constexpr int64_t EXACT_TILE_BYTES = 256 * 1024;

template <class F>
void run_rows_exact(const Job& job, int64_t n0, int64_t n1) {
  const int64_t tile = std::max<int64_t>(1, EXACT_TILE_BYTES / (job.K / F::block_size * F::type_size));
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t m0 = 0; m0 < job.M; m0 += EXACT_ROWS) {
      switch (std::min<int64_t>(EXACT_ROWS, job.M - m0)) {
        case 1: exact_rows<F, 1>(job, t0, t1, m0); break;
        case 2: exact_rows<F, 2>(job, t0, t1, m0); break;
        case 3: exact_rows<F, 3>(job, t0, t1, m0); break;
        default: exact_rows<F, 4>(job, t0, t1, m0); break;
      }
    }
  }
}

#else

// 16 independent lanes: the compiler vectorises them without reordering any one sum.
inline float dot_floats(const float* w, const float* x, int64_t K) {
  constexpr int lanes = 16;
  float sum[lanes] = {};
  for (int64_t k = 0; k < K; k += lanes)
    for (int l = 0; l < lanes; ++l) sum[l] += w[k + l] * x[k + l];
  float total = 0.0f;
  for (float s : sum) total += s;
  return total;
}

// Float rows per tile: about half of L1, the rest holds activation and output rows.
constexpr int64_t EXACT_TILE_BYTES = 16 * 1024;

// Decode a tile of weight rows into floats once, then dot every activation row against it.
template <class F>
void run_rows_exact(const Job& job, int64_t n0, int64_t n1) {
  const int64_t nb = job.K / F::block_size;
  const int64_t row_bytes = nb * F::type_size;
  const int64_t tile = std::clamp<int64_t>(EXACT_TILE_BYTES / (job.K * int64_t(sizeof(float))), 1, n1 - n0);
  std::vector<float> w(tile * job.K);
  const float* x = static_cast<const float*>(job.act);
  for (int64_t r0 = n0; r0 < n1; r0 += tile) {
    const int64_t rows = std::min(tile, n1 - r0);
    for (int64_t r = 0; r < rows; ++r) row_to_float<F>(job.weight + (r0 + r) * row_bytes, nb, &w[r * job.K]);
    for (int64_t m = 0; m < job.M; ++m)
      for (int64_t r = 0; r < rows; ++r) job.y[m * job.ldy + r0 + r] = dot_floats(&w[r * job.K], x + m * job.K, job.K);
  }
}

#endif

}  // namespace moestream_cpu
