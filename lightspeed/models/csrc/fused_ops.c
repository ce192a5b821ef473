/* Fused elementwise ops around attention: what torch ran as ~10 separate kernels per layer.
 *
 * ls_rope_write_kv: rotary embedding of every q and k head of a fused qkv projection, in place,
 * plus the write of the rotated k and the v heads into their KV-cache slots. Torch ran this as
 * mul + roll (a cat) + addcmul over q and k, then two index_copy_ calls: ~7 passes and ~7 op
 * dispatches per layer. Here it is one pass over each token's row (the row is hot in L1 by the
 * time k and v are copied out).
 *
 * ls_rms_norm: RMSNorm without a weight (the model folds norm weights into the next matmul):
 * out = x / sqrt(mean(x^2) + eps), the sum of squares accumulated in fp32 in a fixed order
 * (16 lane-wise partial sums, then a fixed tree), so a row's result never depends on how many
 * rows share the call. Torch needed 6 ops (norm, square, div, add, rsqrt, cast) plus the mul.
 *
 * Both work in fp32 registers and write fp32 or bf16 (round to nearest even, like torch's cast);
 * loops are plain C over contiguous rows, which gcc -O3 -march=native vectorizes. Work is split
 * over the caller's OpenMP team (torch's, see paged_attention.py) only when there is enough of
 * it to pay for waking the team: a decode step's 32 rows are cheaper on one thread.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define PAR_MIN_ELEMS 65536 /* below this, one thread: the fork/join would cost more */
#define LANES 16
#define MAX_HALF 256       /* head_dim <= 512 */

typedef struct ls_rope_args {
    void *qkv;                  /* [tokens, row_stride]: q heads, k heads, v heads, ... */
    void *k_cache;              /* [slots, num_kv_heads * head_dim] */
    void *v_cache;
    const int64_t *positions;   /* [tokens] */
    const int64_t *slots;       /* [tokens] */
    const float *cos;           /* [max_position, head_dim / 2] */
    const float *sin;
    int64_t tokens, row_stride, num_heads, num_kv_heads, head_dim;
    int is_bf16;
} ls_rope_args;

/* HF rotate_half rotary of one head: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s). Widened into
 * fp32 scratch first: with loads, math and stores in one loop gcc's vectorized version sat behind
 * an aliasing check that failed (x1 and x2 are one array) and the scalar loop ran, ~8x slower. */
static inline void rope_head_bf16(uint16_t *restrict x, const float *restrict c,
                                  const float *restrict s, int64_t half) {
    float a[MAX_HALF], b[MAX_HALF];
    for (int64_t i = 0; i < half; i++) {
        a[i] = bf16_to_f32(x[i]);
        b[i] = bf16_to_f32(x[i + half]);
    }
    for (int64_t i = 0; i < half; i++) {
        x[i] = f32_to_bf16(a[i] * c[i] - b[i] * s[i]);
        x[i + half] = f32_to_bf16(b[i] * c[i] + a[i] * s[i]);
    }
}

static inline void rope_head_f32(float *restrict x, const float *restrict c,
                                 const float *restrict s, int64_t half) {
    float a[MAX_HALF], b[MAX_HALF];
    memcpy(a, x, half * sizeof(float));
    memcpy(b, x + half, half * sizeof(float));
    for (int64_t i = 0; i < half; i++) {
        x[i] = a[i] * c[i] - b[i] * s[i];
        x[i + half] = b[i] * c[i] + a[i] * s[i];
    }
}

static void rope_token(const ls_rope_args *a, int64_t t) {
    const int64_t dim = a->head_dim, half = dim / 2, esize = a->is_bf16 ? 2 : 4;
    const int64_t kv_width = a->num_kv_heads * dim;
    const float *c = a->cos + a->positions[t] * half, *s = a->sin + a->positions[t] * half;
    char *row = (char *)a->qkv + t * a->row_stride * esize;
    for (int64_t h = 0; h < a->num_heads + a->num_kv_heads; h++) {
        if (a->is_bf16)
            rope_head_bf16((uint16_t *)row + h * dim, c, s, half);
        else
            rope_head_f32((float *)row + h * dim, c, s, half);
    }
    const char *k = row + a->num_heads * dim * esize;
    const int64_t slot_off = a->slots[t] * kv_width * esize;
    memcpy((char *)a->k_cache + slot_off, k, kv_width * esize);
    memcpy((char *)a->v_cache + slot_off, k + kv_width * esize, kv_width * esize);
}

int ls_rope_write_kv(const ls_rope_args *a) {
    if (a->head_dim % 2 != 0 || a->head_dim > 2 * MAX_HALF || a->row_stride < (a->num_heads + 2 * a->num_kv_heads) * a->head_dim)
        return 1;
    const int64_t elems = a->tokens * a->row_stride;
#pragma omp parallel for schedule(static) if (elems >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < a->tokens; t++)
        rope_token(a, t);
    return 0;
}

/* Sum of squares in a fixed association: lane j sums elements j, j+16, ...; then a tree. */
static inline float sum_squares(const void *x, int64_t dim, int is_bf16) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= dim; i += LANES)
        for (int j = 0; j < LANES; j++) {
            float v = is_bf16 ? bf16_to_f32(((const uint16_t *)x)[i + j]) : ((const float *)x)[i + j];
            acc[j] += v * v;
        }
    for (int j = 0; i < dim; i++, j++) {
        float v = is_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
        acc[j] += v * v;
    }
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++)
            acc[j] += acc[j + width];
    return acc[0];
}

static void rms_row(const void *x, void *out, int64_t dim, float eps, int is_bf16) {
    const float r = 1.0f / sqrtf(sum_squares(x, dim, is_bf16) / (float)dim + eps);
    if (is_bf16) {
        const uint16_t *in = x;
        uint16_t *o = out;
        for (int64_t i = 0; i < dim; i++)
            o[i] = f32_to_bf16(bf16_to_f32(in[i]) * r);
    } else {
        const float *in = x;
        float *o = out;
        for (int64_t i = 0; i < dim; i++)
            o[i] = in[i] * r;
    }
}

int ls_rms_norm(const void *x, void *out, int64_t rows, int64_t dim, int64_t x_stride,
                float eps, int is_bf16) {
    const int64_t esize = is_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (rows * dim >= PAR_MIN_ELEMS)
    for (int64_t r = 0; r < rows; r++)
        rms_row((const char *)x + r * x_stride * esize, (char *)out + r * dim * esize, dim, eps,
                is_bf16);
    return 0;
}

/* ls_silu_mul: out = silu(gate) * up for rows of a fused [gate | up] projection ([T, 2F] in,
 * [T, F] out), math in fp32. One wide matmul plus this pass is cheaper than two matmuls with
 * oneDNN's swish and mul epilogues (at 2,048 rows: ~2.8 ms against ~3.4 ms per layer). */
#include "simd_exp.h"

#if LS_ISA_AVX512

/* exp(x), clamped into the range the polynomial covers. */
static inline __m512 exp512_full(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    return exp512_poly(x);
}

static inline __m512 load16(const void *p, int is_bf16) {
    if (!is_bf16)
        return _mm512_loadu_ps(p);
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void store16(void *p, __m512 v, int is_bf16) {
    if (!is_bf16) {
        _mm512_storeu_ps(p, v);
        return;
    }
    __m512i bits = _mm512_castps_si512(v); /* round to nearest even, as f32_to_bf16 */
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
#endif

static inline float load1(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#if LS_ISA_AVX2 && !LS_ISA_AVX512
/* The AVX-512 loop below on 8 lanes; the reciprocal estimate is 12-bit here, so the Newton
 * step leaves ~22 bits (the fp32 tests hold it to 1e-6 relative). */
static inline int64_t silu_mul_avx2(const void *gate, const void *up, void *out, int64_t f, int is_bf16) {
    int64_t i = 0;
    for (; i + 8 <= f; i += 8) {
        __m256 g = load8(gate, i, is_bf16), u = load8(up, i, is_bf16);
        __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g)));
        __m256 r = _mm256_rcp_ps(den);
        r = _mm256_mul_ps(r, _mm256_fnmadd_ps(den, r, _mm256_set1_ps(2.0f)));
        store8(out, i, _mm256_mul_ps(_mm256_mul_ps(g, r), u), is_bf16);
    }
    return i;
}
#endif

static void silu_mul_row(const void *gate, const void *up, void *out, int64_t f, int is_bf16) {
    int64_t i = 0;
#if LS_ISA_AVX2 && !LS_ISA_AVX512
    i = silu_mul_avx2(gate, up, out, f, is_bf16);
#endif
#if LS_ISA_AVX512
    const int64_t esize = is_bf16 ? 2 : 4;
    for (; i + 16 <= f; i += 16) {
        __m512 g = load16((const char *)gate + i * esize, is_bf16);
        __m512 u = load16((const char *)up + i * esize, is_bf16);
        __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp512_full(_mm512_sub_ps(
            _mm512_setzero_ps(), g)));
        /* 1 / den: 14-bit estimate + one Newton step (~23 bits); vdivps was the bottleneck */
        __m512 r = _mm512_rcp14_ps(den);
        r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.0f)));
        store16((char *)out + i * esize, _mm512_mul_ps(_mm512_mul_ps(g, r), u), is_bf16);
    }
#endif
    for (; i < f; i++) {
        float g = load1(gate, i, is_bf16), v = g / (1.0f + expf(-g)) * load1(up, i, is_bf16);
        if (is_bf16)
            ((uint16_t *)out)[i] = f32_to_bf16(v);
        else
            ((float *)out)[i] = v;
    }
}

int ls_silu_mul(const void *gate_up, void *out, int64_t rows, int64_t f, int64_t in_stride,
                int is_bf16) {
    const int64_t esize = is_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (rows * f >= PAR_MIN_ELEMS)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)gate_up + r * in_stride * esize;
        silu_mul_row(row, row + f * esize, (char *)out + r * f * esize, f, is_bf16);
    }
    return 0;
}
