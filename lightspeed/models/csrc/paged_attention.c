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
 * chunks of 8 tokens, each token's score reduced horizontally, head_dim a runtime value. Other
 * shapes or CPUs use the scalar path (same math, one token at a time). csrc/isa.h picks the
 * paths from the compiler's macros; ls_kernel_isa() reports the result.
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

/* Per-head state of the AVX2 path; rows of head_dim / 8 vectors (head_dim a multiple of 8). */
typedef struct {
    __m256 q[MAX_GROUP][MAX_DIM / 8], acc[MAX_GROUP][MAX_DIM / 8];
    float m[MAX_GROUP], l[MAX_GROUP];
    int64_t G, V;
} avx2_state;

static void avx2_init(const pa_args *a, avx2_state *st, int64_t s, int64_t kvh) {
    st->G = a->num_heads / a->num_kv_heads;
    st->V = a->head_dim / 8;
    const __m256 scale = _mm256_set1_ps(a->scale);
    for (int64_t g = 0; g < st->G; g++) {
        int64_t row = s * a->q_stride + (kvh * st->G + g) * a->head_dim;
        for (int64_t c = 0; c < st->V; c++) {
            st->q[g][c] = _mm256_mul_ps(load8(a->query, row + 8 * c, a->is_bf16), scale);
            st->acc[g][c] = _mm256_setzero_ps();
        }
        st->m[g] = -INFINITY;
        st->l[g] = 0.0f;
    }
}

/* q.k of `n` (<= 8) tokens for every query head of the group, one K row load per token;
 * lanes past n hold -inf. */
static inline void avx2_scores(const pa_args *a, const avx2_state *st, const int64_t *off, int n,
                               float scores[][CHUNK8]) {
    for (int64_t g = 0; g < st->G; g++)
        for (int j = n; j < CHUNK8; j++) scores[g][j] = -INFINITY;
    for (int j = 0; j < n; j++) {
        __m256 k[MAX_DIM / 8];
        for (int64_t c = 0; c < st->V; c++) k[c] = load8(a->k_cache, off[j] + 8 * c, a->is_bf16);
        for (int64_t g = 0; g < st->G; g++) {
            __m256 sum = _mm256_mul_ps(st->q[g][0], k[0]);
            for (int64_t c = 1; c < st->V; c++) sum = _mm256_fmadd_ps(st->q[g][c], k[c], sum);
            scores[g][j] = hsum8(sum);
        }
    }
}

/* Online softmax over one chunk of 8 tokens (rescale on a new max), then acc += p * v. */
static void avx2_update(const pa_args *a, avx2_state *st, const int64_t *off, int n) {
    float scores[MAX_GROUP][CHUNK8], p[MAX_GROUP][CHUNK8];
    avx2_scores(a, st, off, n, scores);
    for (int64_t g = 0; g < st->G; g++) {
        __m256 sc = _mm256_loadu_ps(scores[g]);
        __m128 mx = _mm_max_ps(_mm256_castps256_ps128(sc), _mm256_extractf128_ps(sc, 1));
        mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
        float m_new = fmaxf(st->m[g], _mm_cvtss_f32(_mm_max_ss(mx, _mm_movehdup_ps(mx))));
        if (m_new > st->m[g]) {
            __m256 alpha = _mm256_set1_ps(expf(st->m[g] - m_new));
            for (int64_t c = 0; c < st->V; c++) st->acc[g][c] = _mm256_mul_ps(st->acc[g][c], alpha);
            st->l[g] *= expf(st->m[g] - m_new);
            st->m[g] = m_new;
        }
        /* -inf lanes clamp to exp(-87) inside exp256: zero them explicitly */
        __m256 valid = _mm256_cmp_ps(sc, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        __m256 e = _mm256_and_ps(valid, exp256(_mm256_sub_ps(sc, _mm256_set1_ps(m_new))));
        st->l[g] += hsum8(e);
        _mm256_storeu_ps(p[g], e);
    }
    for (int j = 0; j < n; j++) {
        __m256 v[MAX_DIM / 8];
        for (int64_t c = 0; c < st->V; c++) v[c] = load8(a->v_cache, off[j] + 8 * c, a->is_bf16);
        for (int64_t g = 0; g < st->G; g++) {
            __m256 pj = _mm256_set1_ps(p[g][j]);
            for (int64_t c = 0; c < st->V; c++) st->acc[g][c] = _mm256_fmadd_ps(pj, v[c], st->acc[g][c]);
        }
    }
}

/* One (sequence, KV head) at a time, 8 tokens per chunk: head dims are runtime values here (no
 * per-shape specialisation), so this path also covers dims like 40, 72 or 80 in AVX-512 builds. */
static void item_avx2(const pa_args *a, int64_t s, int64_t kv_lo, int64_t kv_hi) {
    const int64_t D = a->head_dim, ctx = a->context_lens[s];
    avx2_state st;
    for (int64_t kvh = kv_lo; kvh < kv_hi; kvh++) {
        avx2_init(a, &st, s, kvh);
        token_cursor cur = cursor_start(a, a->block_tables + s * a->table_stride);
        int64_t off[CHUNK8];
        for (int64_t t0 = 0; t0 < ctx; t0 += CHUNK8) {
            int n = ctx - t0 < CHUNK8 ? (int)(ctx - t0) : CHUNK8;
            for (int j = 0; j < n; j++) off[j] = cursor_next(a, &cur) + kvh * D;
            avx2_update(a, &st, off, n);
        }
        for (int64_t g = 0; g < st.G; g++) {
            int64_t row = (s * a->num_heads + kvh * st.G + g) * D;
            __m256 inv = _mm256_set1_ps(st.l[g] > 0.0f ? 1.0f / st.l[g] : 0.0f);
            for (int64_t c = 0; c < st.V; c++)
                store8(a->out, row + 8 * c, _mm256_mul_ps(st.acc[g][c], inv), a->is_bf16);
        }
    }
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
    if (!item && a->head_dim % 8 == 0) item = item_avx2;
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
