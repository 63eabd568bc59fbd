// Which instruction set the kernels are compiled for (-march=native decides at build time).
#pragma once

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__BMI2__)
#define MOESTREAM_AVX512_VNNI 1
#include <immintrin.h>
#endif

namespace moestream_cpu {
#ifdef MOESTREAM_AVX512_VNNI
constexpr const char* ISA = "avx512-vnni";
#else
constexpr const char* ISA = "portable";
#endif
}  // namespace moestream_cpu
