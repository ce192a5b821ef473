/* Which SIMD path the kernels compile, from the compiler's predefined macros: -march=native
 * picks the widest the CPU has, LIGHTSPEED_KERNEL_ISA=avx2 adds -mno-avx512f (an AVX2-only CPU,
 * emulated), and LS_PA_SCALAR forces the portable reference path on any CPU. */
#ifndef LS_ISA_H
#define LS_ISA_H

#if !defined(LS_PA_SCALAR) && defined(__AVX512F__)
#define LS_ISA_AVX512 1
#define LS_ISA_NAME "avx512"
#else
#define LS_ISA_AVX512 0
#endif

/* AVX2 + FMA: also compiled into AVX-512 builds, where it serves head dims the AVX-512
 * specialisations do not cover (multiples of 8 other than 32, 64, 128). */
#if !defined(LS_PA_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define LS_ISA_AVX2 1
#ifndef LS_ISA_NAME
#define LS_ISA_NAME "avx2"
#endif
#else
#define LS_ISA_AVX2 0
#endif

#ifndef LS_ISA_NAME
#define LS_ISA_NAME "scalar"
#endif

#if LS_ISA_AVX2
#include <immintrin.h>
#endif

#endif
