/* bf16 <-> fp32 conversion and 8-lane horizontal reductions shared by the CPU kernels. */
#ifndef LS_BF16_H
#define LS_BF16_H

#include <stdint.h>
#include <string.h>

#include "isa.h"

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; finite inputs */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#if LS_ISA_AVX2
/* 8 values at element i as fp32: bf16 widens with a zero-extend and a shift (no F16C needed). */
static inline __m256 load8(const void *base, int64_t i, int is_bf16) {
    if (!is_bf16)
        return _mm256_loadu_ps((const float *)base + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 fp32 values stored at element i, bf16 rounded to nearest even exactly as f32_to_bf16. */
static inline void store8(void *base, int64_t i, __m256 v, int is_bf16) {
    if (!is_bf16) {
        _mm256_storeu_ps((float *)base + i, v);
        return;
    }
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    /* packus works within 128-bit lanes: pack, then gather the two low quarters */
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
    _mm_storeu_si128((__m128i *)((uint16_t *)base + i), _mm256_castsi256_si128(packed));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
#endif

#endif
