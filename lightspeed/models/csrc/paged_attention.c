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
 * rescale) over chunks of context tokens (16 on the AVX-512 path; 8 fp32 / 16 bf16 on the AVX2
 * path), in fp32; the output is written in the cache's dtype (fp32, or bf16 as raw uint16 bits
 * rounded to nearest even).
 *
 * SIMD path (AVX-512F; head_dim 32, 64 or 128; <= 8 query heads per KV head, each pair compiled
 * as its own specialisation from paged_attention_item.h): for 16 tokens at a time, each token's
 * q.k partial sums (one 16-lane vector per token) are reduced by a transpose-add tree to one
 * vector holding the 16 scores. bf16 is widened with one shift (even elements) and one mask
 * (odd elements) per 32 values, so lanes hold the head dims in even/odd order; q is loaded the
 * same way (the dot product does not care) and the V accumulators are re-interleaved when the
 * output is written. AVX2 path (AVX2 + FMA, any head_dim that is a multiple of 8; details in
 * paged_attention_item_avx2.h): 8-lane vectors; per chunk and KV head, query head outer loops
 * (q, then the accumulators, in registers across the chunk's tokens: the whole group's would
 * not fit in 16), a hadd tree turning 8 tokens' partial sums into 8 scores, bf16 widened in
 * registers in the same even/odd order per 16 values; and the next chunk's rows prefetched,
 * spread over the chunk's work. Compile-time specialisations for 1-4 query heads per KV head
 * and head_dim 32, 64, 128, which AVX-512 builds use too, ahead of their own items (faster
 * when the cache streams from DRAM, as in decode); a runtime-size version covers the rest (and
 * serves AVX-512 builds for dims like 40, 72, 80). Other shapes or CPUs use the scalar path
 * (same math, one token at a time). csrc/isa.h picks the paths from the compiler's macros;
 * ls_kernel_isa() reports it. At 32 sequences x ~320 tokens decode reads the cache from DRAM:
 * the AVX2 path's prefetching is what brings it near bandwidth (measured: ~2.3x slower without
 * it); vdpbf16ps dot products were measured and gained nothing.
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
/* Tokens per online-softmax step, a multiple of 8 (one vector of scores): 8 for fp32, 16 for
 * bf16, the same bytes. Longer chunks spread the max / rescale / exp bookkeeping over more
 * tokens, but the next chunk is what gets prefetched, and DRAM-bound decode (SmolLM2, 32 x 320
 * tokens, Zen 4) measured fastest with ~6 KiB of K (and of V) per chunk. CHUNK_A2 bounds them. */
#define CHUNK_A2 16
#define A2_CHUNK(bf) ((bf) ? 16 : 8)

/* r[i] = sum of the lanes of v[i], for 8 vectors (scores of 8 tokens, in token order). */
static inline __attribute__((always_inline)) __m256 reduce8(const __m256 *v) {
    __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    t0 = _mm256_hadd_ps(t0, t1); /* [v0..v3 low-lane sums | v0..v3 high-lane sums] */
    t2 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t2, 0x20), _mm256_permute2f128_ps(t0, t2, 0x31));
}

/* bf16 rows are widened in "pair order": each 16 values become their 8 even-indexed then their
 * 8 odd-indexed elements, one shift and one mask per 16 (zero-extending costs two ops per 8).
 * q, K, V and the accumulators all use that order, which dot products and p * V do not notice;
 * the output is re-interleaved when stored. A last 8 (head_dim not a multiple of 16) is widened
 * in natural order. This is a2vec's order too (paged_attention_item_avx2.h). */
static inline void a2widen_row(const uint16_t *src, float *dst, int64_t vecs) {
    const __m256i hi_mask = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t c = 0; c + 1 < vecs; c += 2) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(src + 8 * c));
        _mm256_store_ps(dst + 8 * c, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
        _mm256_store_ps(dst + 8 * c + 8, _mm256_castsi256_ps(_mm256_and_si256(x, hi_mask)));
    }
    if (vecs % 2) _mm256_store_ps(dst + 8 * (vecs - 1), load8(src, 8 * (vecs - 1), 1));
}

/* The inverse for one output row, times scale: fp32 in pair order to bf16 in natural order,
 * rounded to nearest even as f32_to_bf16. */
static inline void a2narrow_row(const float *src, uint16_t *dst, int64_t vecs, __m256 scale) {
    const __m256i round = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    const __m256i hi_mask = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t c = 0; c + 1 < vecs; c += 2) {
        __m256i ev = _mm256_castps_si256(_mm256_mul_ps(_mm256_load_ps(src + 8 * c), scale));
        __m256i od = _mm256_castps_si256(_mm256_mul_ps(_mm256_load_ps(src + 8 * c + 8), scale));
        ev = _mm256_add_epi32(ev, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(ev, 16), one)));
        od = _mm256_add_epi32(od, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(od, 16), one)));
        __m256i packed = _mm256_or_si256(_mm256_srli_epi32(ev, 16), _mm256_and_si256(od, hi_mask));
        _mm256_storeu_si256((__m256i *)(dst + 8 * c), packed);
    }
    if (vecs % 2) store8(dst, 8 * (vecs - 1), _mm256_mul_ps(_mm256_load_ps(src + 8 * (vecs - 1)), scale), 1);
}

/* Offsets of the next min(left, chunk) tokens (none if left <= 0); returns how many. Up to the
 * next multiple of 8 the list is padded with the first token's offset: a finite row whose
 * scores are then masked, so a partial group of 8 needs no branches. */
static inline int chunk_offsets(const pa_args *a, token_cursor *cur, int64_t left, int chunk, int64_t *off) {
    int n = left < chunk ? (int)(left > 0 ? left : 0) : chunk;
    for (int j = 0; j < n; j++) off[j] = cursor_next(a, cur);
    for (int j = n; j < (n + 7) / 8 * 8; j++) off[j] = off[0];
    return n;
}

/* Lines first, first + step, ... (< lines) of a row, prefetched to L2. Inlined by force: as a
 * function gcc finds it free of side effects and deletes the calls. */
static inline __attribute__((always_inline)) void a2prefetch(const char *row, int64_t first, int64_t step,
                                                             int64_t lines) {
    for (int64_t l = first; l < lines; l += step) _mm_prefetch(row + 64 * l, _MM_HINT_T1);
}

/* The next chunk's rows of one KV head, prefetched while this chunk computes. Each block lives
 * elsewhere in the cache and the hardware prefetcher stops at 4 KiB pages, so without this
 * every block's rows wait for DRAM (measured: the DRAM-bound decode step ~2.3x slower). The
 * requests are spread evenly over the chunk's work: each KV head asks for its own rows, and of
 * those each query head's score pass (K) and value pass (V) asks for every G-th line of each
 * token's row. Issued in bursts instead, they fill the miss queue, stall the core and leave
 * DRAM idle while the rest of the chunk computes (measured ~15% slower). */
typedef struct {
    const char *k[CHUNK_A2], *v[CHUNK_A2]; /* past the next chunk's end: an idle address */
} a2next;

/* Rows of tokens off[0 .. n), from element `head` of each token's row. */
static inline __attribute__((always_inline)) void a2next_rows(const pa_args *a, a2next *pf, const int64_t *off, int n,
                                                              int64_t head, const void *idle, int bf) {
    const int64_t size = bf ? 2 : 4;
    for (int j = 0; j < A2_CHUNK(bf); j++) {
        pf->k[j] = j < n ? (const char *)a->k_cache + (off[j] + head) * size : (const char *)idle;
        pf->v[j] = j < n ? (const char *)a->v_cache + (off[j] + head) * size : (const char *)idle;
    }
}

/* The first chunk's rows (dim elements from element `head` of each of the n tokens' rows), all
 * at once: there is nothing yet to overlap them with. */
static inline __attribute__((always_inline)) void a2first(const pa_args *a, const int64_t *off, int n, int64_t head,
                                                          int64_t dim, int bf) {
    const int64_t size = bf ? 2 : 4, lines = (dim * size + 63) / 64;
    for (int j = 0; j < n; j++) {
        a2prefetch((const char *)a->k_cache + (off[j] + head) * size, 0, 1, lines);
        a2prefetch((const char *)a->v_cache + (off[j] + head) * size, 0, 1, lines);
    }
}

/* The generic version: any group size and head_dim a multiple of 8 (runtime values). */
#define A2_NAME any
#define A2_G ((int64_t)(a->num_heads / a->num_kv_heads))
#define A2_V (a->head_dim / 8)
#define A2_GMAX MAX_GROUP
#include "paged_attention_item_avx2.h"

/* Compile-time sizes for 1-4 query heads per KV head and head_dim 32, 64 or 128. AVX-512 builds
 * use them too, ahead of their own items: when the cache streams from DRAM they are faster
 * (SmolLM2 decode step, 32 x 320 tokens: fp32 1.7x, bf16 2.2x; the prefetching is most of it),
 * though up to ~1.2x slower when K and V already sit in cache. See bench/README.md. */
#define A2_NAME 1_4
#define A2_G 1
#define A2_V 4
#define A2_GMAX 1
#include "paged_attention_item_avx2.h"
#define A2_NAME 1_8
#define A2_G 1
#define A2_V 8
#define A2_GMAX 1
#include "paged_attention_item_avx2.h"
#define A2_NAME 1_16
#define A2_G 1
#define A2_V 16
#define A2_GMAX 1
#include "paged_attention_item_avx2.h"
#define A2_NAME 2_4
#define A2_G 2
#define A2_V 4
#define A2_GMAX 2
#include "paged_attention_item_avx2.h"
#define A2_NAME 2_8
#define A2_G 2
#define A2_V 8
#define A2_GMAX 2
#include "paged_attention_item_avx2.h"
#define A2_NAME 2_16
#define A2_G 2
#define A2_V 16
#define A2_GMAX 2
#include "paged_attention_item_avx2.h"
#define A2_NAME 3_4
#define A2_G 3
#define A2_V 4
#define A2_GMAX 3
#include "paged_attention_item_avx2.h"
#define A2_NAME 3_8
#define A2_G 3
#define A2_V 8
#define A2_GMAX 3
#include "paged_attention_item_avx2.h"
#define A2_NAME 3_16
#define A2_G 3
#define A2_V 16
#define A2_GMAX 3
#include "paged_attention_item_avx2.h"
#define A2_NAME 4_4
#define A2_G 4
#define A2_V 4
#define A2_GMAX 4
#include "paged_attention_item_avx2.h"
#define A2_NAME 4_8
#define A2_G 4
#define A2_V 8
#define A2_GMAX 4
#include "paged_attention_item_avx2.h"
#define A2_NAME 4_16
#define A2_G 4
#define A2_V 16
#define A2_GMAX 4
#include "paged_attention_item_avx2.h"

/* [G - 1][log2(D / 32)] for D in 32, 64, 128 */
static const item_fn avx2_items[4][3] = {
    {item_avx2_1_4, item_avx2_1_8, item_avx2_1_16},
    {item_avx2_2_4, item_avx2_2_8, item_avx2_2_16},
    {item_avx2_3_4, item_avx2_3_8, item_avx2_3_16},
    {item_avx2_4_4, item_avx2_4_8, item_avx2_4_16},
};

/* The compile-time AVX2 item for this shape, or 0. */
static item_fn avx2_special(const pa_args *a) {
    const int64_t G = a->num_heads / a->num_kv_heads, D = a->head_dim;
    if (G > 4 || (D != 32 && D != 64 && D != 128)) return 0;
    return avx2_items[G - 1][D == 32 ? 0 : D == 64 ? 1 : 2];
}

/* Any AVX2 item for this shape (the generic one if no specialisation), or 0. */
static item_fn avx2_item(const pa_args *a) {
    if (a->head_dim % 8 != 0) return 0;
    item_fn item = avx2_special(a);
    return item ? item : item_avx2_any;
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
#if LS_ISA_AVX2
    item = avx2_special(a);  /* ahead of AVX-512's items: see the AVX2 specialisations */
#endif
#if LS_ISA_AVX512
    if (!item) item = simd_item(a);
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
