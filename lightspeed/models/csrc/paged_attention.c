/* Paged decode attention: one query token per sequence, K/V read in place through the block table.
 *
 * Cache (per layer, as PagedLlama allocates it): [2, num_blocks, block_size, kv_heads, head_dim],
 * K then V. Sequence s attends to its first context_lens[s] tokens; token t lives in block
 * block_tables[s][t / block_size] at offset t % block_size. The query heads that share a KV head
 * (GQA) are handled together, so every K/V row is loaded once for all of them.
 *
 * Work items go to the caller's OpenMP team: the library links the libgomp torch already loaded,
 * so these regions reuse torch's own spinning worker threads. An item is a whole sequence (its
 * KV heads are adjacent in each token row, so a block is read as one dense stream) when there
 * are >= 4 sequences per thread, else one (sequence, KV head). Softmax is online (running max +
 * rescale) over chunks of 16 context tokens, in fp32; the output is written in the cache's
 * dtype (fp32, or bf16 as raw uint16 bits rounded to nearest even).
 *
 * SIMD path (AVX-512F; head_dim 32, 64 or 128; <= 8 query heads per KV head, each pair compiled
 * as its own specialisation from paged_attention_item.h): for 16 tokens at a time, each token's
 * q.k partial sums (one 16-lane vector per token) are reduced by a transpose-add tree to one
 * vector holding the 16 scores. bf16 is widened with one shift (even elements) and one mask
 * (odd elements) per 32 values, so lanes hold the head dims in even/odd order; q is loaded the
 * same way (the dot product does not care) and the V accumulators are re-interleaved when the
 * output is written. AVX2 path (AVX2 + FMA, any head_dim that is a multiple of 8; also used by
 * AVX-512 builds for dims like 40, 72, 80): 8-lane vectors, one (sequence, KV head) at a time,
 * chunks of 8 tokens whose partial sums a hadd tree reduces to one vector of 8 scores; bf16 is
 * widened in natural order (zero-extend + shift). AVX2-only builds get compile-time
 * specialisations (paged_attention_item_avx2.h) for 1-4 query heads per KV head and head_dim
 * 32, 64, 128; a runtime-size version covers the rest (~2x slower per byte: no unrolling, and
 * q / accumulators in memory). Other shapes or CPUs use the scalar path (same math, one token at
 * a time). csrc/isa.h picks the paths from the compiler's macros; ls_kernel_isa() reports it.
 * At 32 sequences x ~320 tokens the kernel is bound by reading the cache from DRAM, not by
 * arithmetic: software prefetching and vdpbf16ps dot products were measured and gained nothing.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "isa.h"
#include "simd_exp.h"

#define LS_PA_SIMD (LS_ISA_AVX512 || LS_ISA_AVX2)

#define CHUNK 16
#define MAX_GROUP 16   /* query heads per KV head */
#define MAX_DIM 256

typedef struct pa_args {
    const void *k_cache;        /* [num_blocks, block_size, kv_heads, head_dim] */
    const void *v_cache;
    const void *query;          /* [num_seqs, num_heads, head_dim], rows q_stride elements apart */
    void *out;                  /* [num_seqs, num_heads, head_dim] contiguous */
    const int32_t *block_tables;  /* [num_seqs, table_stride] */
    const int32_t *context_lens;  /* [num_seqs] */
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, table_stride, q_stride;
    float scale;
    int is_bf16;
} pa_args;

static inline float load_elem(const void *base, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* Walks a sequence's tokens in order, yielding each one's element offset in the K or V cache
 * (a division per token would cost more than the token's dot products). */
typedef struct {
    const int32_t *table;
    int64_t block, in_block;
} token_cursor;

static inline token_cursor cursor_start(const pa_args *a, const int32_t *table) {
    (void)a;
    token_cursor c = {table, 0, 0};
    return c;
}

/* Offset of the next token's row (all KV heads; head h starts h * head_dim further). */
static inline int64_t cursor_next(const pa_args *a, token_cursor *c) {
    const int64_t row = a->num_kv_heads * a->head_dim;
    int64_t off = ((int64_t)c->table[c->block] * a->block_size + c->in_block) * row;
    if (++c->in_block == a->block_size) {
        c->in_block = 0;
        c->block++;
    }
    return off;
}

/* Processes KV heads [kv_lo, kv_hi) of one sequence. */
typedef void (*item_fn)(const pa_args *, int64_t s, int64_t kv_lo, int64_t kv_hi);

/* ------------------------------------------------------------------ scalar path */

static void head_scalar(const pa_args *a, int64_t s, int64_t kvh) {
    const int64_t D = a->head_dim, G = a->num_heads / a->num_kv_heads, ctx = a->context_lens[s];
    const int32_t *table = a->block_tables + s * a->table_stride;
    float q[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM], m[MAX_GROUP], l[MAX_GROUP];
    for (int64_t g = 0; g < G; g++) {
        int64_t row = s * a->q_stride + (kvh * G + g) * D;
        for (int64_t d = 0; d < D; d++) {
            q[g][d] = load_elem(a->query, row + d, a->is_bf16) * a->scale;
            acc[g][d] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    token_cursor cur = cursor_start(a, table);
    for (int64_t t = 0; t < ctx; t++) {
        int64_t off = cursor_next(a, &cur) + kvh * D;
        for (int64_t g = 0; g < G; g++) {
            float score = 0.0f;
            for (int64_t d = 0; d < D; d++) score += q[g][d] * load_elem(a->k_cache, off + d, a->is_bf16);
            float m_new = score > m[g] ? score : m[g];
            float alpha = expf(m[g] - m_new), p = expf(score - m_new);
            l[g] = l[g] * alpha + p;
            for (int64_t d = 0; d < D; d++)
                acc[g][d] = acc[g][d] * alpha + p * load_elem(a->v_cache, off + d, a->is_bf16);
            m[g] = m_new;
        }
    }
    for (int64_t g = 0; g < G; g++) {
        int64_t row = (s * a->num_heads + kvh * G + g) * D;
        float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int64_t d = 0; d < D; d++) {
            float v = acc[g][d] * inv;
            if (a->is_bf16) ((uint16_t *)a->out)[row + d] = f32_to_bf16(v);
            else ((float *)a->out)[row + d] = v;
        }
    }
}

static void item_scalar(const pa_args *a, int64_t s, int64_t kv_lo, int64_t kv_hi) {
    for (int64_t kvh = kv_lo; kvh < kv_hi; kvh++) head_scalar(a, s, kvh);
}

/* ------------------------------------------------------------------ AVX2 path */
#if LS_ISA_AVX2
#define CHUNK8 8

/* r[i] = sum of the lanes of v[i], for 8 vectors (scores of 8 tokens, in token order). */
static inline __attribute__((always_inline)) __m256 reduce8(const __m256 *v) {
    __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    t0 = _mm256_hadd_ps(t0, t1); /* [v0..v3 low-lane sums | v0..v3 high-lane sums] */
    t2 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t2, 0x20), _mm256_permute2f128_ps(t0, t2, 0x31));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* The generic version: any group size and head_dim a multiple of 8 (runtime values). */
#define A2_NAME any
#define A2_G ((int64_t)(a->num_heads / a->num_kv_heads))
#define A2_V (a->head_dim / 8)
#define A2_GMAX MAX_GROUP
#define A2_VMAX (MAX_DIM / 8)
#include "paged_attention_item_avx2.h"

/* AVX2-only builds: compile-time sizes for 1-4 query heads per KV head and head_dim 32, 64 or
 * 128 (AVX-512 builds have their own specialisations for these). */
#if !LS_ISA_AVX512
#define A2_NAME 1_4
#define A2_G 1
#define A2_V 4
#define A2_GMAX 1
#define A2_VMAX 4
#include "paged_attention_item_avx2.h"
#define A2_NAME 1_8
#define A2_G 1
#define A2_V 8
#define A2_GMAX 1
#define A2_VMAX 8
#include "paged_attention_item_avx2.h"
#define A2_NAME 1_16
#define A2_G 1
#define A2_V 16
#define A2_GMAX 1
#define A2_VMAX 16
#include "paged_attention_item_avx2.h"
#define A2_NAME 2_4
#define A2_G 2
#define A2_V 4
#define A2_GMAX 2
#define A2_VMAX 4
#include "paged_attention_item_avx2.h"
#define A2_NAME 2_8
#define A2_G 2
#define A2_V 8
#define A2_GMAX 2
#define A2_VMAX 8
#include "paged_attention_item_avx2.h"
#define A2_NAME 2_16
#define A2_G 2
#define A2_V 16
#define A2_GMAX 2
#define A2_VMAX 16
#include "paged_attention_item_avx2.h"
#define A2_NAME 3_4
#define A2_G 3
#define A2_V 4
#define A2_GMAX 3
#define A2_VMAX 4
#include "paged_attention_item_avx2.h"
#define A2_NAME 3_8
#define A2_G 3
#define A2_V 8
#define A2_GMAX 3
#define A2_VMAX 8
#include "paged_attention_item_avx2.h"
#define A2_NAME 3_16
#define A2_G 3
#define A2_V 16
#define A2_GMAX 3
#define A2_VMAX 16
#include "paged_attention_item_avx2.h"
#define A2_NAME 4_4
#define A2_G 4
#define A2_V 4
#define A2_GMAX 4
#define A2_VMAX 4
#include "paged_attention_item_avx2.h"
#define A2_NAME 4_8
#define A2_G 4
#define A2_V 8
#define A2_GMAX 4
#define A2_VMAX 8
#include "paged_attention_item_avx2.h"
#define A2_NAME 4_16
#define A2_G 4
#define A2_V 16
#define A2_GMAX 4
#define A2_VMAX 16
#include "paged_attention_item_avx2.h"

/* [G - 1][log2(D / 32)] for D in 32, 64, 128 */
static const item_fn avx2_items[4][3] = {
    {item_avx2_1_4, item_avx2_1_8, item_avx2_1_16},
    {item_avx2_2_4, item_avx2_2_8, item_avx2_2_16},
    {item_avx2_3_4, item_avx2_3_8, item_avx2_3_16},
    {item_avx2_4_4, item_avx2_4_8, item_avx2_4_16},
};
#endif

static item_fn avx2_item(const pa_args *a) {
    const int64_t G = a->num_heads / a->num_kv_heads, D = a->head_dim;
    if (D % 8 != 0) return 0;
#if !LS_ISA_AVX512
    if (G <= 4 && (D == 32 || D == 64 || D == 128))
        return avx2_items[G - 1][D == 32 ? 0 : D == 64 ? 1 : 2];
#endif
    (void)G;
    return item_avx2_any;
}
#endif

/* ------------------------------------------------------------------ AVX-512 path */
#if LS_ISA_AVX512


/* 16 values as fp32: 16 floats, or (bf16) the even or odd half of 32 values. */
static inline __attribute__((always_inline)) void load_row(const void *base, int64_t off, int64_t D, int is_bf16, __m512 *out) {
    if (is_bf16) {
        const __m512i hi_mask = _mm512_set1_epi32((int)0xFFFF0000u);
        for (int64_t c = 0; c < D / 32; c++) {
            __m512i x = _mm512_loadu_si512((const uint16_t *)base + off + 32 * c);
            out[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
            out[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, hi_mask));
        }
    } else {
        for (int64_t c = 0; c < D / 16; c++) out[c] = _mm512_loadu_ps((const float *)base + off + 16 * c);
    }
}

/* r[i] = sum of the lanes of v[i], for 16 vectors. */
static inline __attribute__((always_inline)) __m512 reduce16(__m512 *v) {
    __m512 c[8], d[4];
    for (int i = 0; i < 8; i++)  /* [a.q0+a.q2, a.q1+a.q3, b.q0+b.q2, b.q1+b.q3] (128-bit quarters) */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int j = 0; j < 4; j++)  /* quarter k: 4 partial sums of v[4j + k] */
        d[j] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0xDD));
    __m512 e01 = _mm512_add_ps(_mm512_unpacklo_ps(d[0], d[1]), _mm512_unpackhi_ps(d[0], d[1]));
    __m512 e23 = _mm512_add_ps(_mm512_unpacklo_ps(d[2], d[3]), _mm512_unpackhi_ps(d[2], d[3]));
    __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e01, e23, 0x44), _mm512_shuffle_ps(e01, e23, 0xEE));
    /* f[4k + j] = sum(v[4j + k]): transpose back to token order */
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(idx, f);
}

/* exp(x) for x <= 0 (scores minus their max). */
static inline __m512 exp512(__m512 x) {
    return exp512_poly(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)));
}


/* Offsets of the next min(left, 16) tokens; returns how many. */
static inline int next_chunk(const pa_args *a, token_cursor *cur, int64_t left, int64_t *off) {
    int n = left < CHUNK ? (int)(left > 0 ? left : 0) : CHUNK;
    for (int j = 0; j < n; j++) off[j] = cursor_next(a, cur);
    return n;
}

/* Write one output row (acc * inv) in the output dtype; bf16 rows are re-interleaved from the
 * even/odd lane order load_row produced, rounding to nearest even. */
static inline void store_row(const pa_args *a, int64_t row, const __m512 *acc, int V, float inv_l) {
    const __m512 inv = _mm512_set1_ps(inv_l);
    if (!a->is_bf16) {
        for (int c = 0; c < V; c++) _mm512_storeu_ps((float *)a->out + row + 16 * c, _mm512_mul_ps(acc[c], inv));
        return;
    }
    const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const __m512i hi_mask = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int c = 0; c < V / 2; c++) {  /* even dims -> low halves, odd -> high halves */
        __m512i ev = _mm512_castps_si512(_mm512_mul_ps(acc[2 * c], inv));
        __m512i od = _mm512_castps_si512(_mm512_mul_ps(acc[2 * c + 1], inv));
        ev = _mm512_add_epi32(ev, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(ev, 16), one)));
        od = _mm512_add_epi32(od, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(od, 16), one)));
        __m512i packed = _mm512_or_si512(_mm512_srli_epi32(ev, 16), _mm512_and_si512(od, hi_mask));
        _mm512_storeu_si512((uint16_t *)a->out + row + 32 * c, packed);
    }
}

/* One specialised item function per (query heads per KV head, head_dim / 16): with both known at
 * compile time every loop unrolls and the accumulators stay in registers. */
#define PA_G 1
#define PA_V 2
#include "paged_attention_item.h"
#define PA_V 4
#include "paged_attention_item.h"
#define PA_V 8
#include "paged_attention_item.h"
#undef PA_G
#define PA_G 2
#define PA_V 2
#include "paged_attention_item.h"
#define PA_V 4
#include "paged_attention_item.h"
#define PA_V 8
#include "paged_attention_item.h"
#undef PA_G
#define PA_G 3
#define PA_V 2
#include "paged_attention_item.h"
#define PA_V 4
#include "paged_attention_item.h"
#define PA_V 8
#include "paged_attention_item.h"
#undef PA_G
#define PA_G 4
#define PA_V 2
#include "paged_attention_item.h"
#define PA_V 4
#include "paged_attention_item.h"
#define PA_V 8
#include "paged_attention_item.h"
#undef PA_G
#define PA_G 5
#define PA_V 2
#include "paged_attention_item.h"
#define PA_V 4
#include "paged_attention_item.h"
#define PA_V 8
#include "paged_attention_item.h"
#undef PA_G
#define PA_G 6
#define PA_V 2
#include "paged_attention_item.h"
#define PA_V 4
#include "paged_attention_item.h"
#define PA_V 8
#include "paged_attention_item.h"
#undef PA_G
#define PA_G 7
#define PA_V 2
#include "paged_attention_item.h"
#define PA_V 4
#include "paged_attention_item.h"
#define PA_V 8
#include "paged_attention_item.h"
#undef PA_G
#define PA_G 8
#define PA_V 2
#include "paged_attention_item.h"
#define PA_V 4
#include "paged_attention_item.h"
#define PA_V 8
#include "paged_attention_item.h"
#undef PA_G

/* [G - 1][log2(D / 32)] for D in 32, 64, 128 */
static const item_fn simd_items[8][3] = {
    {item_1_2, item_1_4, item_1_8}, {item_2_2, item_2_4, item_2_8},
    {item_3_2, item_3_4, item_3_8}, {item_4_2, item_4_4, item_4_8},
    {item_5_2, item_5_4, item_5_8}, {item_6_2, item_6_4, item_6_8},
    {item_7_2, item_7_4, item_7_8}, {item_8_2, item_8_4, item_8_8},
};

static item_fn simd_item(const pa_args *a) {
    const int64_t G = a->num_heads / a->num_kv_heads, D = a->head_dim;
    if (G < 1 || G > 8) return 0;
    switch (D) {
        case 32: return simd_items[G - 1][0];
        case 64: return simd_items[G - 1][1];
        case 128: return simd_items[G - 1][2];
        default: return 0;
    }
}
#endif

/* ------------------------------------------------------------------ entry points */

int ls_pa_simd(void) { return LS_PA_SIMD; }

/* The SIMD path this library was compiled with: "avx512", "avx2" or "scalar". */
const char *ls_kernel_isa(void) { return LS_ISA_NAME; }

/* The widest path that handles this shape; the scalar one handles every shape. */
static item_fn pick_item(const pa_args *a) {
    item_fn item = 0;
    (void)a;  /* unused in scalar builds */
#if LS_ISA_AVX512
    item = simd_item(a);
#endif
#if LS_ISA_AVX2
    if (!item) item = avx2_item(a);
#endif
    return item ? item : item_scalar;
}

/* 0 on success, -1 for shapes this kernel does not handle (the caller falls back). */
int ls_paged_decode_attention(const pa_args *a) {
    if (a->num_kv_heads < 1 || a->num_heads % a->num_kv_heads != 0
        || a->num_heads / a->num_kv_heads > MAX_GROUP || a->head_dim > MAX_DIM || a->head_dim < 1)
        return -1;
    item_fn item = pick_item(a);
    /* Whole sequences (dense reads) when there are enough of them to keep every thread busy;
     * else one KV head per item, so a few long sequences still spread over the cores. */
    const int64_t per_item = a->num_seqs >= 4 * omp_get_max_threads() ? a->num_kv_heads : 1;
    const int64_t splits = a->num_kv_heads / per_item, items = a->num_seqs * splits;
#pragma omp parallel for schedule(dynamic, 1) if (items > 1)
    for (int64_t i = 0; i < items; i++) {
        int64_t kv_lo = (i % splits) * per_item;
        item(a, i / splits, kv_lo, kv_lo + per_item);
    }
    return 0;
}
