// One weight matrix's share of a parallel region (see matmul.h: run_jobs).
#pragma once

#include <cstdint>

namespace moestream_cpu {

struct Job {
  const uint8_t* weight;  // N rows of K / block_size GGUF blocks
  int64_t qtype, N, K;
  // Activations, M rows: float32 [M, K] rows for the exact route, else int8 blocks of the
  // type's family (QuantizedRows).
  const void* act;
  int64_t M;
  float* y;               // y[m * ldy + n]
  int64_t ldy;
  bool exact;             // fp32 activations and fp32 accumulation (exact.h)
};

}  // namespace moestream_cpu
