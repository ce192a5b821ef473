/* fp32 GEMM on panel-packed weights for the model's linears: y[m, n] = x[m, :] . w[n, :] + epilogue.
 *
 * Why our own: oneDNN's fp32 matmul on AVX2 runs the few-row products of decode steps at ~60% of
 * the FMA peak (and 2x short of memory bandwidth at one row); a register-blocked kernel on
 * weights packed for it reaches oneDNN's speed at prefill sizes and beats it at decode sizes
 * (bench/README.md, "panel GEMM"). One packed copy serves every row count.
 *
 * Packing (models/panel_gemm.py): w [N, K] becomes panels of NR = 16 output features,
 * [N / 16][K][16], so one k step of a panel is one 64-byte line. Weights may be fp32 or bf16
 * (raw uint16: a bf16 weight is the top half of an fp32 one), x and y are fp32. bf16 halves the
 * bytes a decode step streams; it is widened in registers per tile, or, where a panel serves
 * more than two tiles (prefill), once into a per-thread fp32 copy that stays in L2. The microkernel holds a tile of MR = 6 rows x 16 features in 12 ymm accumulators;
 * per k it loads the panel's two weight vectors once and broadcasts each row's x[k]. Every
 * output is one sequential fma chain over k, so a result does not depend on the batch it came
 * in (rows, threads, tile position) and the scalar path below reproduces it bit for bit.
 *
 * Threads: the panels of a call are split over the caller's OpenMP team (torch's libgomp, as for
 * the attention kernel). Rows go in blocks of MB = 256 so a block of x stays in L2 while every
 * panel streams past it; the first tile of a panel prefetches the next panel into L1.
 *
 * Epilogues: none, + other (residual add), silu, * other, and GLU: gate and up interleaved in
 * each panel (8 features of gate, then the same 8 of up), giving silu(gate) * up for 8 outputs
 * per panel: the MLP's gate/up product and its activation in one pass.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "isa.h"
#include "simd_exp.h"

#define NR 16
#define MR 6
#ifndef MB
#define MB 256 /* rows per block: 64 re-streamed the weights 4x as often, 11% slower at prefill */
#endif

enum { EPI_NONE = 0, EPI_ADD = 1, EPI_SILU = 2, EPI_MUL = 3, EPI_GLU = 4 };

typedef struct ls_gemm_args {
    const float *x;      /* [m, k], rows x_stride apart */
    const void *w;       /* [n_panels, k, 16] fp32 or bf16 */
    float *y;            /* [m, n], rows y_stride apart */
    const float *other;  /* [m, n] for ADD / MUL, rows other_stride apart */
    int64_t m, n, k, x_stride, y_stride, other_stride;
    int epilogue, w_bf16;
} ls_gemm_args;

/* Output columns one panel produces. */
static inline int64_t panel_cols(const ls_gemm_args *a) { return a->epilogue == EPI_GLU ? NR / 2 : NR; }

static inline float silu1(float v) { return v / (1.0f + expf(-v)); }

/* Applies the epilogue to one tile row of raw products (NR of them) and stores it. */
static void finish_row(const ls_gemm_args *a, int64_t row, int64_t p, const float *acc) {
    const int64_t cols = panel_cols(a), n0 = p * cols;
    const int64_t n = a->n - n0 < cols ? a->n - n0 : cols;
    float *y = a->y + row * a->y_stride + n0;
    const float *o = a->other ? a->other + row * a->other_stride + n0 : 0;
    for (int64_t j = 0; j < n; j++) {
        float v = acc[j];
        switch (a->epilogue) {
            case EPI_ADD: v += o[j]; break;
            case EPI_SILU: v = silu1(v); break;
            case EPI_MUL: v *= o[j]; break;
            case EPI_GLU: v = silu1(v) * acc[j + NR / 2]; break;
            default: break;
        }
        y[j] = v;
    }
}

/* ------------------------------------------------------------------ scalar path (the reference) */

/* Panel p's first weight (panels are k * 16 weights of 2 or 4 bytes). */
static inline const char *panel_at(const ls_gemm_args *a, int64_t p) {
    return (const char *)a->w + p * a->k * NR * (a->w_bf16 ? 2 : 4);
}

static inline float weight_at(const ls_gemm_args *a, int64_t idx) {
    if (!a->w_bf16) return ((const float *)a->w)[idx];
    union { uint32_t u; float f; } cvt = {(uint32_t)((const uint16_t *)a->w)[idx] << 16};
    return cvt.f;
}

static void tile_scalar(const ls_gemm_args *a, int64_t m0, int64_t rows, int64_t p) {
    const int64_t base = p * a->k * NR;
    for (int64_t r = 0; r < rows; r++) {
        const float *x = a->x + (m0 + r) * a->x_stride;
        float acc[NR];
        for (int j = 0; j < NR; j++) {
            float c = 0.0f;
            for (int64_t k = 0; k < a->k; k++) c = fmaf(x[k], weight_at(a, base + k * NR + j), c);
            acc[j] = c;
        }
        finish_row(a, m0 + r, p, acc);
    }
}

/* ------------------------------------------------------------------ AVX2 + FMA path */
#if LS_ISA_AVX2

static inline __attribute__((always_inline)) void load_w(const void *w, int bf16, int64_t idx, __m256 *w0, __m256 *w1) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + idx));
        *w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
        *w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
    } else {
        *w0 = _mm256_loadu_ps((const float *)w + idx);
        *w1 = _mm256_loadu_ps((const float *)w + idx + 8);
    }
}

static inline __m256 silu8(__m256 v) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), v));
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* finish_row on registers for a whole panel; a partial last panel takes the scalar route. */
static inline void finish_row8(const ls_gemm_args *a, int64_t row, int64_t p, __m256 c0, __m256 c1) {
    const int64_t cols = panel_cols(a), n0 = p * cols;
    if (a->n - n0 < cols) {
        float acc[NR];
        _mm256_storeu_ps(acc, c0);
        _mm256_storeu_ps(acc + 8, c1);
        finish_row(a, row, p, acc);
        return;
    }
    float *y = a->y + row * a->y_stride + n0;
    const float *o = a->other ? a->other + row * a->other_stride + n0 : 0;
    switch (a->epilogue) {
        case EPI_GLU: _mm256_storeu_ps(y, _mm256_mul_ps(silu8(c0), c1)); return;
        case EPI_ADD:
            c0 = _mm256_add_ps(c0, _mm256_loadu_ps(o));
            c1 = _mm256_add_ps(c1, _mm256_loadu_ps(o + 8));
            break;
        case EPI_MUL:
            c0 = _mm256_mul_ps(c0, _mm256_loadu_ps(o));
            c1 = _mm256_mul_ps(c1, _mm256_loadu_ps(o + 8));
            break;
        case EPI_SILU:
            c0 = silu8(c0);
            c1 = silu8(c1);
            break;
        default: break;
    }
    _mm256_storeu_ps(y, c0);
    _mm256_storeu_ps(y + 8, c1);
}

/* R rows x 16 features of panel p, whose weights are at `w` (fp32, or bf16 when `bf16`); R is a
 * constant in each instance, so the row loops unroll and the accumulators stay in registers.
 * `next`: the panel to prefetch (NULL: none). */
#define DEFINE_TILE(R)                                                                                   \
    static void tile_##R(const ls_gemm_args *a, int64_t m0, int64_t p, const void *w, int bf16,          \
                         const char *next) {                                                             \
        __m256 c0[R], c1[R];                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) c0[r] = c1[r] = _mm256_setzero_ps();        \
        const float *x = a->x + m0 * a->x_stride;                                                        \
        const int64_t xs = a->x_stride, K = a->k;                                                        \
        const int64_t line = a->w_bf16 ? NR * 2 : NR * 4; /* bytes per k step of the next panel */       \
        for (int64_t k = 0; k < K; k++) {                                                                \
            __m256 w0, w1;                                                                               \
            load_w(w, bf16, k * NR, &w0, &w1);                                                           \
            if (next) _mm_prefetch(next + k * line, _MM_HINT_T0);                                        \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                        \
                __m256 xv = _mm256_broadcast_ss(x + r * xs + k);                                         \
                c0[r] = _mm256_fmadd_ps(xv, w0, c0[r]);                                                  \
                c1[r] = _mm256_fmadd_ps(xv, w1, c1[r]);                                                  \
            }                                                                                            \
        }                                                                                                \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) finish_row8(a, m0 + r, p, c0[r], c1[r]);    \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)

typedef void (*tile_fn)(const ls_gemm_args *, int64_t, int64_t, const void *, int, const char *);
static const tile_fn tiles[MR + 1] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6};

/* A per-thread fp32 copy of one bf16 panel (grown as needed, kept for the thread's life). */
static __thread float *widened;
static __thread int64_t widened_cap;

static const float *widen_panel(const uint16_t *w, int64_t n) {
    if (n > widened_cap) {
        free(widened);
        widened = aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
        widened_cap = widened ? n : 0;
        if (!widened) return 0;
    }
    for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(widened + i, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + i))), 16)));
    return widened;
}

/* Rows [mb, me) against panel p, its first tile prefetching the panel after it: a bf16 panel
 * shared by more than two tiles is widened once into an L2-resident fp32 copy (exact), so
 * prefill-sized blocks pay no per-tile conversion. */
static void run_panel(const ls_gemm_args *a, int64_t p, int64_t panels, int64_t mb, int64_t me) {
    const char *next = p + 1 < panels ? panel_at(a, p + 1) : 0;
    const void *w = panel_at(a, p);
    int bf16 = a->w_bf16;
    if (bf16 && me - mb > 2 * MR) {
        const float *copy = widen_panel(w, a->k * NR);
        if (copy) {
            w = copy;
            bf16 = 0;
        }
    }
    for (int64_t m0 = mb; m0 < me; m0 += MR) {
        int64_t rows = me - m0 < MR ? me - m0 : MR;
        tiles[rows](a, m0, p, w, bf16, m0 == mb ? next : 0);
    }
}
#endif

/* ------------------------------------------------------------------ entry points */

/* One panel against rows [mb, me): the SIMD path, or the scalar one (`ref`, or no SIMD build). */
static void panel_rows(const ls_gemm_args *a, int64_t p, int64_t panels, int64_t mb, int64_t me, int ref) {
#if LS_ISA_AVX2
    if (!ref) {
        run_panel(a, p, panels, mb, me);
        return;
    }
#endif
    (void)ref;
    (void)panels;
    for (int64_t m0 = mb; m0 < me; m0 += MR) tile_scalar(a, m0, me - m0 < MR ? me - m0 : MR, p);
}

static int gemm(const ls_gemm_args *a, int ref) {
    if (a->m < 0 || a->n < 1 || a->k < 1 || a->epilogue < EPI_NONE || a->epilogue > EPI_GLU) return -1;
    if (a->m > 0 && (a->epilogue == EPI_ADD || a->epilogue == EPI_MUL) && !a->other) return -1;
    const int64_t cols = panel_cols(a), panels = (a->n + cols - 1) / cols;
    for (int64_t mb = 0; mb < a->m; mb += MB) {
        const int64_t me = mb + MB < a->m ? mb + MB : a->m;
#pragma omp parallel for schedule(static) if (panels > 1 && (me - mb) * a->n * a->k >= 32768)
        for (int64_t p = 0; p < panels; p++) panel_rows(a, p, panels, mb, me, ref);
    }
    return 0;
}

/* 0 on success, -1 for arguments the kernel does not take (the caller checks shapes first). */
int ls_gemm(const ls_gemm_args *a) { return gemm(a, 0); }

/* The same product through the scalar path whatever this build's ISA (tests compare the two). */
int ls_gemm_reference(const ls_gemm_args *a) { return gemm(a, 1); }

/* Panel width (features per panel): the packing in models/panel_gemm.py must match. */
int ls_gemm_panel_width(void) { return NR; }
