// y[m, n] = sum_k x[m, k] W[n, k] straight from GGUF blocks, over all cores.
//
// Two routes: int8 activation blocks and integer dot products (this file), or float32
// activations and fp32 FMAs (exact.h). Work is a list of jobs (one weight matrix each)
// whose output rows form one index space, so e.g. an expert's gate and up projections run
// in a single parallel region; each thread takes a contiguous range of output rows and streams their weight bytes.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "avx2_k.h"
#include "decode_iq.h"
#include "decode_k.h"
#include "decode_legacy.h"
#include "dot.h"
#include "exact.h"
#include "gguf_constants.h"
#include "job.h"
#include "lanes.h"

namespace moestream_cpu {

// Calls fn(Format{}) for a supported GGML type id; false if the type has no CPU kernel.
template <class Fn>
bool with_format(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case GGML_TYPE_Q2_K: fn(Q2K{}); return true;
    case GGML_TYPE_Q3_K: fn(Q3K{}); return true;
    case GGML_TYPE_Q4_K: fn(Q4K{}); return true;
    case GGML_TYPE_Q5_K: fn(Q5K{}); return true;
    case GGML_TYPE_Q6_K: fn(Q6K{}); return true;
    case GGML_TYPE_IQ2_XXS: fn(IQ2XXS{}); return true;
    case GGML_TYPE_IQ2_XS: fn(IQ2XS{}); return true;
    case GGML_TYPE_IQ2_S: fn(IQ2S{}); return true;
    case GGML_TYPE_IQ3_XXS: fn(IQ3XXS{}); return true;
    case GGML_TYPE_IQ3_S: fn(IQ3S{}); return true;
    case GGML_TYPE_IQ4_XS: fn(IQ4XS{}); return true;
    case GGML_TYPE_Q8_0: fn(Q80{}); return true;
    case GGML_TYPE_Q4_0: fn(Q40{}); return true;
    case GGML_TYPE_Q4_1: fn(Q41{}); return true;
    case GGML_TYPE_Q5_0: fn(Q50{}); return true;
    case GGML_TYPE_Q5_1: fn(Q51{}); return true;
    case GGML_TYPE_IQ4_NL: fn(IQ4NL{}); return true;
    case GGML_TYPE_MXFP4: fn(MXFP4{}); return true;
    default: return false;
  }
}

// Activation rows quantised for one block family (256 or 32 elements per scale).
struct QuantizedRows {
  QuantizedRows() = default;
  QuantizedRows(QuantizedRows&&) = default;
  QuantizedRows(const QuantizedRows&) = delete;  // `data` points into the vectors

  std::vector<Act256> k;
  std::vector<Act32> legacy;
  const void* data = nullptr;
};

inline QuantizedRows quantize_for(int64_t qtype, const float* x, int64_t M, int64_t K, int64_t ldx) {
  QuantizedRows rows;
  with_format(qtype, [&](auto fmt) {
    using F = decltype(fmt);
    if constexpr (std::is_same_v<typename F::Act, Act256>) {
      rows.k = quantize_rows<Act256, QK>(x, M, K, ldx);
      rows.data = rows.k.data();
    } else {
      rows.legacy = quantize_rows<Act32, QB>(x, M, K, ldx);
      rows.data = rows.legacy.data();
    }
  });
  return rows;
}

// Activation rows per pass. For every M this beat decoding each block once into memory and
// dequantize + sgemm (measured: docs/CPU-KERNELS.md). AVX-512's 32 registers hold 8 rows'
// accumulators beside a decoded block (the decode then serves twice the rows: prefill of a
// MoE layer runs its experts at ~8 rows each); AVX2's 16 hold 4.
constexpr int FUSED_ROWS = 4;
#ifdef MOESTREAM_AVX512_VNNI
constexpr int INT8_FUSED_ROWS = 8;
#else
constexpr int INT8_FUSED_ROWS = FUSED_ROWS;
#endif
// With more than FUSED_ROWS activation rows the weights are read once per pass: passes run
// over tiles of this many weight bytes, which stay in L2 between passes.
constexpr int64_t ROW_TILE_BYTES = 256 * 1024;

template <int I, int MAX, class Rows>
inline void rows_of(int64_t n, Rows&& rows, int64_t t0, int64_t t1, int64_t m0) {
  if constexpr (I < MAX) {
    if (n == I) return rows(t0, t1, m0, std::integral_constant<int, I>{});
    rows_of<I + 1, MAX>(n, rows, t0, t1, m0);
  } else {
    rows(t0, t1, m0, std::integral_constant<int, MAX>{});
  }
}

// Passes of up to MAX activation rows over tiles of weight rows: rows(t0, t1, m0, mt) with a
// compile-time row count mt. The rows are split into equal passes (M = 10 as 5 + 5, not 8 + 2).
template <int MAX = FUSED_ROWS, class Rows>
void row_passes(const Job& job, int64_t n0, int64_t n1, int64_t tile, Rows&& rows) {
  const int64_t passes = (job.M + MAX - 1) / MAX;
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t p = 0, m0 = 0; p < passes; ++p) {
      const int64_t mt = (job.M - m0) / (passes - p);
      rows_of<1, MAX>(mt, rows, t0, t1, m0);
      m0 += mt;
    }
  }
}

// Passes of 5-8 rows are compute-bound with the weights coming from DRAM: the decode and
// eight rows' dots fill the out-of-order window, so loads are not issued early enough and
// the passes ran at 102 GMAC/s (Q4_K, 2 threads) against 117 with the next 2 KiB of weight
// bytes prefetched (and 88 -> 99 for Q6_K; `python -m bench.cpu_prefetch`). Fewer rows are
// bandwidth-bound, and a variant that prefetched for every pass read one row at 21 GB/s
// against 28 without (docs/CPU-KERNELS.md), so they run without it.
#ifndef MOESTREAM_PREFETCH_BYTES
#define MOESTREAM_PREFETCH_BYTES 2048
#endif
constexpr int PREFETCH_MIN_ROWS = 5;

#ifdef MOESTREAM_AVX512_VNNI

// Each block is decoded into registers once per FUSED_ROWS activation rows and dotted with
// all of them while it is there; the accumulators stay in registers too.
template <class F, int MT>
void fused_rows(const Job& job, int64_t n0, int64_t n1, int64_t m0) {
  using Act = typename F::Act;
  using Kernel = RegsFor<Act>;
  const int64_t nb = job.K / F::block_size;
  const int64_t row_bytes = nb * F::type_size;
  const Act* act = static_cast<const Act*>(job.act) + m0 * nb;
  for (int64_t n = n0; n < n1; ++n) {
    typename Kernel::Acc acc[MT];
    const uint8_t* row = job.weight + n * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      typename Kernel::Regs regs;
      if constexpr (MT >= PREFETCH_MIN_ROWS && MOESTREAM_PREFETCH_BYTES > 0) {
        const uint8_t* ahead = row + b * F::type_size + MOESTREAM_PREFETCH_BYTES;
        for (int i = 0; i < F::type_size; i += 64) __builtin_prefetch(ahead + i, 0, 3);
      }
      F::decode_regs(row + b * F::type_size, regs);
      for (int m = 0; m < MT; ++m) acc[m].template add<F::narrow>(regs, act[m * nb + b]);
    }
    for (int m = 0; m < MT; ++m) job.y[(m0 + m) * job.ldy + n] = acc[m].total();
  }
}

template <class F>
void run_rows(const Job& job, int64_t n0, int64_t n1) {
  // One Q6_K row streams faster through the AVX2 register path (32 weights a step): 33.5
  // against 29.5-31 GB/s from DRAM on 2 threads here (its 64-weight AVX-512 decode spends
  // more per byte: the two bits' inserts). Q4_K streams alike on both (32 GB/s).
  if constexpr (std::is_same_v<F, Q6K>)
    if (job.M == 1) return avx2_rows<F, 1>(job, n0, n1, 0);
  if constexpr (std::is_same_v<typename F::Act, Act256>)
    if (job.M >= MOESTREAM_LANE_MIN_ROWS) return run_lanes<F>(job, n0, n1);
  const int64_t tile = std::max<int64_t>(1, ROW_TILE_BYTES / (job.K / F::block_size * F::type_size));
  row_passes<INT8_FUSED_ROWS>(job, n0, n1, tile, [&](int64_t t0, int64_t t1, int64_t m0, auto mt) {
    fused_rows<F, decltype(mt)::value>(job, t0, t1, m0);
  });
}

#else

// Decoded rows per tile: about half of L1, the rest holds activation and output rows.
constexpr int64_t TILE_BYTES = 24 * 1024;

// Decode a tile of rows once into memory, then dot every activation row against it; on AVX2
// the K-quants of the Q4_K_M mixes are decoded in registers instead (avx2_k.h).
template <class F>
void run_rows(const Job& job, int64_t n0, int64_t n1) {
#ifdef MOESTREAM_AVX2
  if constexpr (Avx2Regs<F>::value) {
    const int64_t tile = std::max<int64_t>(1, ROW_TILE_BYTES / (job.K / F::block_size * F::type_size));
    row_passes(job, n0, n1, tile, [&](int64_t t0, int64_t t1, int64_t m0, auto mt) {
      avx2_rows<F, decltype(mt)::value>(job, t0, t1, m0);
    });
    return;
  }
#endif
  using Dec = typename F::Decoded;
  using Act = typename F::Act;
  const int64_t nb = job.K / F::block_size;
  const int64_t row_bytes = nb * F::type_size;
  const int64_t tile = std::clamp<int64_t>(TILE_BYTES / (nb * int64_t(sizeof(Dec))), 1, n1 - n0);
  std::vector<Dec> dec(tile * nb);
  const Act* act = static_cast<const Act*>(job.act);
  for (int64_t r0 = n0; r0 < n1; r0 += tile) {
    const int64_t rows = std::min(tile, n1 - r0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < nb; ++b) F::decode(job.weight + (r0 + r) * row_bytes + b * F::type_size, dec[r * nb + b]);
    for (int64_t m = 0; m < job.M; ++m)
      for (int64_t r = 0; r < rows; ++r) job.y[m * job.ldy + r0 + r] = dot_row<F::narrow>(&dec[r * nb], act + m * nb, nb);
  }
}

#endif

// The exact route: in registers on AVX2 for the K-quants of the Q4_K_M mixes (avx2_k.h),
// else exact.h's path for the build.
template <class F>
void run_exact(const Job& job, int64_t n0, int64_t n1) {
#ifdef MOESTREAM_AVX2
  if constexpr (Avx2Regs<F>::value) {
    const int64_t tile = std::max<int64_t>(1, ROW_TILE_BYTES / (job.K / F::block_size * F::type_size));
    row_passes(job, n0, n1, tile, [&](int64_t t0, int64_t t1, int64_t m0, auto mt) {
      avx2_exact_rows<F, decltype(mt)::value>(job, t0, t1, m0);
    });
    return;
  }
#endif
  run_rows_exact<F>(job, n0, n1);
}

// Bytes of weights (times activation rows) per parallel task: small matrices stay on one core.
constexpr int64_t TASK_WORK = 64 * 1024;

// The cost of one output row per K element, in quarters of an activation row's dot: passes
// of activation rows in lanes cost by the pass, not by the row (lanes.h; measured on Q4_K and
// Q6_K [768, 2048] from DRAM: a tile's decode ~3 rows, an 8-lane pass ~4.4, a 16-lane one ~8).
inline int64_t row_cost(const Job& job) {
  int64_t cost = 4 * job.M;
#ifdef MOESTREAM_AVX512_VNNI
  if (!job.exact && job.M >= MOESTREAM_LANE_MIN_ROWS)
    with_format(job.qtype, [&](auto fmt) {
      if constexpr (std::is_same_v<typename decltype(fmt)::Act, Act256>)
        cost = lane_width(job.M) == 8 ? 30 : 12 + 32 * ((job.M + 15) / 16);
    });
#endif
  return cost;
}

// The jobs' output rows as one index space, each row weighted by its work (K * row_cost):
// threads get equal shares of work even when jobs differ in M (a layer's experts during
// prefill). Thread ranges cut between rows; a row belongs to the range holding its start,
// and every output element is computed the same way whichever thread computes it.
inline void run_jobs(const std::vector<Job>& jobs) {
  int64_t total_work = 0;
  for (const Job& job : jobs) total_work += job.N * job.K * row_cost(job);
  const int64_t grain = 8 * TASK_WORK;  // work counts quarter elements: ~2 elements per byte of the K-quants
  at::parallel_for(0, total_work, grain, [&](int64_t begin, int64_t end) {
#ifdef MOESTREAM_AVX512_VNNI
    ++lane_epoch();  // activation rows transposed for lanes are reused within this share only
#endif
    int64_t offset = 0;
    for (const Job& job : jobs) {
      const int64_t row_work = job.K * row_cost(job);
      const int64_t job_end = offset + job.N * row_work;
      if (row_work > 0 && begin < job_end && end > offset) {
        // Rows whose start offset + n * row_work lies in [begin, end).
        const int64_t lo = std::max<int64_t>(0, (begin - offset + row_work - 1) / row_work);
        const int64_t hi = std::min(job.N, (end - offset + row_work - 1) / row_work);
        if (lo < hi)
          with_format(job.qtype, [&](auto fmt) {
            using F = decltype(fmt);
            job.exact ? run_exact<F>(job, lo, hi) : run_rows<F>(job, lo, hi);
          });
      }
      offset = job_end;
    }
  });
}

}  // namespace moestream_cpu
