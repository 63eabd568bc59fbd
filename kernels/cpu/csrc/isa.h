// Which instruction set the kernels are compiled for (-march=native decides at build time).
#pragma once

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__BMI2__)
#define MOESTREAM_AVX512_VNNI 1  // blocks decoded into registers, fused with the dot
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define MOESTREAM_AVX2 1  // portable decoders, AVX2 dot (u8 x s8 pairs, then int16 scales)
#include <immintrin.h>
#endif

namespace moestream_cpu {
#if defined(MOESTREAM_AVX512_VNNI)
constexpr const char* ISA = "avx512-vnni";
#elif defined(MOESTREAM_AVX2)
constexpr const char* ISA = "avx2";
#else
constexpr const char* ISA = "portable";
#endif
}  // namespace moestream_cpu
