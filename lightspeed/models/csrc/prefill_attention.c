/* Causal attention of fresh prompts (no cached prefix) over their own q/k/v, read in place from
 * the fused projection output (fp32 or bf16; math in fp32, the output in the input's dtype).
 * Replaces torch's SDPA for prefill, which ran at ~30 GFLOP/s in fp32 here and took a quarter of
 * a bf16 prefill step.
 *
 * Layout: qkv [T, row_stride] holds each token's query heads, then its KV heads' keys, then their
 * values (head_dim floats each); prompt i owns tokens [starts[i], starts[i + 1]). out [T, heads *
 * head_dim] contiguous.
 *
 * Work item: (prompt, KV head, block of QB query tokens). Its rows are the QB tokens x G query
 * heads sharing that KV head, so every key and value row loaded serves all G heads. Flash-style:
 * for each block of KB = 16 keys up to the block's last query token, scores of all rows (a 6 x 16
 * register tile per row group: one broadcast q element times the transposed key block's two
 * vectors), the causal mask on the diagonal block, an online softmax (running max, rescale on a
 * new max), then the output rows += p . V (6 rows x 16 output dims per tile). Key blocks past a
 * query block's last token are never touched: half the work of a square product.
 *
 * Work items go to the caller's OpenMP team (torch's libgomp), dynamically (later query blocks
 * see more keys). The scalar path computes the same thing one row at a time (reference for tests
 * and non-AVX2 builds); both accumulate in fp32.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "isa.h"
#include "simd_exp.h"

#define QB 16         /* query tokens per work item */
#define KB 64         /* keys per block (scores in tiles of 16 keys) */
#define PF_MAX_G 8    /* query heads per KV head */
#define PF_MAX_D 256  /* head_dim */
#define PF_MAX_ROWS (QB * PF_MAX_G)

typedef struct ls_prefill_args {
    const void *qkv;
    void *out;
    const int64_t *starts; /* [num_prompts + 1] */
    int64_t num_prompts, row_stride, num_heads, num_kv_heads, head_dim;
    float scale;
    int is_bf16; /* qkv and out hold bf16 (raw uint16) */
} ls_prefill_args;

/* One work item's state: scaled queries, output accumulators, softmax running max and sum. */
typedef struct {
    float q[PF_MAX_ROWS][PF_MAX_D];
    float o[PF_MAX_ROWS][PF_MAX_D];
    float m[PF_MAX_ROWS], l[PF_MAX_ROWS];
    int64_t pos[PF_MAX_ROWS]; /* each row's query position in its prompt */
    int64_t rows;
} pf_item;

/* Element offsets of a token's key and value row for a KV head. */
static inline int64_t key_row(const ls_prefill_args *a, int64_t tok, int64_t kvh) {
    return tok * a->row_stride + (a->num_heads + kvh) * a->head_dim;
}

static inline int64_t value_row(const ls_prefill_args *a, int64_t tok, int64_t kvh) {
    return tok * a->row_stride + (a->num_heads + a->num_kv_heads + kvh) * a->head_dim;
}

static inline float elem(const ls_prefill_args *a, int64_t i) {
    return a->is_bf16 ? bf16_to_f32(((const uint16_t *)a->qkv)[i]) : ((const float *)a->qkv)[i];
}

/* Rows: token-major (row = t * G + g) for query tokens [t0, t1) of a prompt starting at `base`. */
static void item_init(const ls_prefill_args *a, pf_item *it, int64_t base, int64_t t0, int64_t t1, int64_t kvh) {
    const int64_t G = a->num_heads / a->num_kv_heads, D = a->head_dim;
    it->rows = (t1 - t0) * G;
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t g = 0; g < G; g++) {
            int64_t r = (t - t0) * G + g;
            const int64_t src = (base + t) * a->row_stride + (kvh * G + g) * D;
            for (int64_t d = 0; d < D; d++) it->q[r][d] = elem(a, src + d) * a->scale;
            memset(it->o[r], 0, (size_t)D * sizeof(float));
            it->m[r] = -INFINITY;
            it->l[r] = 0.0f;
            it->pos[r] = t;
        }
    }
}

/* Softmax update of row r for the n scores s (masked ones -inf): rescale o and l on a new max,
 * turn s into the probabilities p. Returns with s holding p. */
static void softmax_row(pf_item *it, int64_t r, float *s, int n, int64_t D) {
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    float m_new = mx > it->m[r] ? mx : it->m[r];
    if (m_new > it->m[r]) {
        float alpha = expf(it->m[r] - m_new); /* exp(-inf) = 0 on the first block */
        for (int64_t d = 0; d < D; d++) it->o[r][d] *= alpha;
        it->l[r] *= alpha;
        it->m[r] = m_new;
    }
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        s[j] = s[j] == -INFINITY ? 0.0f : expf(s[j] - m_new);
        sum += s[j];
    }
    it->l[r] += sum;
}

static void item_finish(const ls_prefill_args *a, const pf_item *it, int64_t base, int64_t t0, int64_t kvh) {
    const int64_t G = a->num_heads / a->num_kv_heads, D = a->head_dim, width = a->num_heads * D;
    for (int64_t r = 0; r < it->rows; r++) {
        float inv = it->l[r] > 0.0f ? 1.0f / it->l[r] : 0.0f;
        const int64_t dst = (base + t0 + r / G) * width + (kvh * G + r % G) * D;
        for (int64_t d = 0; d < D; d++) {
            float v = it->o[r][d] * inv;
            if (a->is_bf16)
                ((uint16_t *)a->out)[dst + d] = f32_to_bf16(v);
            else
                ((float *)a->out)[dst + d] = v;
        }
    }
}

/* ------------------------------------------------------------------ scalar path (the reference) */

static void block_scalar(const ls_prefill_args *a, pf_item *it, int64_t base, int64_t k0, int n, int64_t kvh) {
    const int64_t D = a->head_dim;
    for (int64_t r = 0; r < it->rows; r++) {
        float s[KB];
        for (int j = 0; j < n; j++) {
            if (k0 + j > it->pos[r]) {
                s[j] = -INFINITY;
                continue;
            }
            const int64_t k = key_row(a, base + k0 + j, kvh);
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += it->q[r][d] * elem(a, k + d);
            s[j] = dot;
        }
        softmax_row(it, r, s, n, D);
        for (int j = 0; j < n; j++) {
            if (s[j] == 0.0f) continue;
            const int64_t v = value_row(a, base + k0 + j, kvh);
            for (int64_t d = 0; d < D; d++) it->o[r][d] += s[j] * elem(a, v + d);
        }
    }
}

/* ------------------------------------------------------------------ AVX2 + FMA path */
#if LS_ISA_AVX2

/* Scores of rows [r0, r0 + R) against 16 keys of the transposed keys kt[D][ks] (ks apart), into
 * columns 0..15 of s's rows (KB apart). */
#define DEFINE_SCORES(R)                                                                            \
    static void scores_##R(const pf_item *it, int64_t r0, const float *kt, int64_t ks, int64_t D,  \
                           float *s) {                                                              \
        __m256 c0[R], c1[R];                                                                        \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) c0[r] = c1[r] = _mm256_setzero_ps();   \
        for (int64_t d = 0; d < D; d++) {                                                           \
            __m256 k0 = _mm256_loadu_ps(kt + d * ks), k1 = _mm256_loadu_ps(kt + d * ks + 8);        \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                   \
                __m256 q = _mm256_broadcast_ss(&it->q[r0 + r][d]);                                  \
                c0[r] = _mm256_fmadd_ps(q, k0, c0[r]);                                              \
                c1[r] = _mm256_fmadd_ps(q, k1, c1[r]);                                              \
            }                                                                                       \
        }                                                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                       \
            _mm256_storeu_ps(s + (r0 + r) * KB, c0[r]);                                             \
            _mm256_storeu_ps(s + (r0 + r) * KB + 8, c1[r]);                                         \
        }                                                                                           \
    }

/* o[rows r0..r0+R)[c..c+16) += p . V for the n keys of the block (value rows at element offsets
 * vrow[j] of qkv, fp32 or bf16). */
#define DEFINE_PV(R)                                                                                \
    static void pv_##R(pf_item *it, int64_t r0, int64_t c, const float *p, const ls_prefill_args *a, \
                       const int64_t *vrow, int n) {                                                \
        __m256 a0[R], a1[R];                                                                        \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                       \
            a0[r] = _mm256_loadu_ps(&it->o[r0 + r][c]);                                             \
            a1[r] = _mm256_loadu_ps(&it->o[r0 + r][c + 8]);                                         \
        }                                                                                           \
        for (int j = 0; j < n; j++) {                                                               \
            __m256 v0 = load8(a->qkv, vrow[j] + c, a->is_bf16);                                     \
            __m256 v1 = load8(a->qkv, vrow[j] + c + 8, a->is_bf16);                                 \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                   \
                __m256 pj = _mm256_broadcast_ss(p + (r0 + r) * KB + j);                             \
                a0[r] = _mm256_fmadd_ps(pj, v0, a0[r]);                                             \
                a1[r] = _mm256_fmadd_ps(pj, v1, a1[r]);                                             \
            }                                                                                       \
        }                                                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                       \
            _mm256_storeu_ps(&it->o[r0 + r][c], a0[r]);                                             \
            _mm256_storeu_ps(&it->o[r0 + r][c + 8], a1[r]);                                         \
        }                                                                                           \
    }

DEFINE_SCORES(1) DEFINE_SCORES(2) DEFINE_SCORES(3) DEFINE_SCORES(4) DEFINE_SCORES(5) DEFINE_SCORES(6)
DEFINE_PV(1) DEFINE_PV(2) DEFINE_PV(3) DEFINE_PV(4) DEFINE_PV(5) DEFINE_PV(6)

typedef void (*scores_fn)(const pf_item *, int64_t, const float *, int64_t, int64_t, float *);
typedef void (*pv_fn)(pf_item *, int64_t, int64_t, const float *, const ls_prefill_args *, const int64_t *, int);
static const scores_fn score_tiles[7] = {0, scores_1, scores_2, scores_3, scores_4, scores_5, scores_6};
static const pv_fn pv_tiles[7] = {0, pv_1, pv_2, pv_3, pv_4, pv_5, pv_6};

/* softmax_row for a block of KB scores (nv vectors of 8; masked ones -inf). */
static void softmax_block(pf_item *it, int64_t r, float *s, int nv, int64_t D) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 vmax = ninf;
    for (int c = 0; c < nv; c++) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + 8 * c));
    float mx = hmax8(vmax);
    if (mx > it->m[r]) {
        __m256 alpha = _mm256_set1_ps(expf(it->m[r] - mx)); /* exp(-inf) = 0 on the first block */
        for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(&it->o[r][d], _mm256_mul_ps(_mm256_loadu_ps(&it->o[r][d]), alpha));
        it->l[r] *= _mm256_cvtss_f32(alpha);
        it->m[r] = mx;
    }
    if (it->m[r] == -INFINITY) { /* nothing visible yet: no probability mass */
        for (int c = 0; c < nv; c++) _mm256_storeu_ps(s + 8 * c, _mm256_setzero_ps());
        return;
    }
    const __m256 m = _mm256_set1_ps(it->m[r]);
    __m256 sum = _mm256_setzero_ps();
    for (int c = 0; c < nv; c++) {
        __m256 x = _mm256_loadu_ps(s + 8 * c);
        __m256 e = _mm256_and_ps(_mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ), exp256(_mm256_sub_ps(x, m)));
        _mm256_storeu_ps(s + 8 * c, e);
        sum = _mm256_add_ps(sum, e);
    }
    it->l[r] += hsum8(sum);
}

/* One key block against the item's rows; kt: the prompt's transposed keys [D][ks]. */
static void block_avx2(const ls_prefill_args *a, pf_item *it, int64_t base, int64_t k0, int n, int64_t kvh,
                       const float *kt, int64_t ks) {
    const int64_t D = a->head_dim;
    float s[PF_MAX_ROWS * KB];
    int64_t vrow[KB];
    for (int j = 0; j < n; j++) vrow[j] = value_row(a, base + k0 + j, kvh);
    const int nv = (n + 7) / 8; /* score vectors per row; tiles of 16 keys may run past n */
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        for (int64_t r0 = 0; r0 < it->rows; r0 += 6) {
            int64_t rr = it->rows - r0 < 6 ? it->rows - r0 : 6;
            score_tiles[rr](it, r0, kt + k0 + j0, ks, D, s + j0);
        }
    }
    /* the causal mask and keys past the prompt: only where the block passes the first row */
    const int masked = k0 + 8 * nv - 1 > it->pos[0];
    for (int64_t r = 0; r < it->rows; r++) {
        float *row = s + r * KB;
        for (int j = 0; masked && j < 8 * nv; j++)
            if (j >= n || k0 + j > it->pos[r]) row[j] = -INFINITY;
        softmax_block(it, r, row, nv, D);
    }
    for (int64_t r0 = 0; r0 < it->rows; r0 += 6) {
        int64_t rr = it->rows - r0 < 6 ? it->rows - r0 : 6;
        for (int64_t c = 0; c < D; c += 16) pv_tiles[rr](it, r0, c, s, a, vrow, n);
    }
}
#endif

/* ------------------------------------------------------------------ entry points */

#if LS_ISA_AVX2
/* A per-thread buffer for a prompt's transposed keys (grown as needed, kept for the thread). */
static __thread float *kt_buf;
static __thread int64_t kt_cap;

/* The prompt's keys for KV head kvh as kt[D][ks] (ks: len rounded up to KB, zero padded), read
 * by every query block of the prompt; NULL if no memory (the caller takes the scalar path). */
static const float *transpose_keys(const ls_prefill_args *a, int64_t base, int64_t len, int64_t kvh, int64_t *ks) {
    const int64_t D = a->head_dim;
    *ks = (len + KB - 1) / KB * KB;
    if (*ks * D > kt_cap) {
        free(kt_buf);
        kt_buf = malloc((size_t)(*ks * D) * sizeof(float));
        kt_cap = kt_buf ? *ks * D : 0;
        if (!kt_buf) return 0;
    }
    for (int64_t t = 0; t < *ks; t++) {
        const int64_t k = t < len ? key_row(a, base + t, kvh) : -1;
        for (int64_t d = 0; d < D; d++) kt_buf[d * *ks + t] = k >= 0 ? elem(a, k + d) : 0.0f;
    }
    return kt_buf;
}
#endif

/* Query tokens [t0, t1) of the prompt at `base` for KV head kvh: scalar, or SIMD with kt. */
static void run_block(const ls_prefill_args *a, int64_t base, int64_t t0, int64_t t1, int64_t kvh,
                      const float *kt, int64_t ks) {
    pf_item it;
    item_init(a, &it, base, t0, t1, kvh);
    for (int64_t k0 = 0; k0 < t1; k0 += KB) {
        int n = (int)(t1 - k0 < KB ? t1 - k0 : KB);
#if LS_ISA_AVX2
        if (kt) {
            block_avx2(a, &it, base, k0, n, kvh, kt, ks);
            continue;
        }
#endif
        (void)kt;
        (void)ks;
        block_scalar(a, &it, base, k0, n, kvh);
    }
    item_finish(a, &it, base, t0, kvh);
}

/* Every query block of prompt p for KV head kvh (its keys transposed once for all of them). */
static void run_item(const ls_prefill_args *a, int64_t p, int64_t kvh, int ref) {
    const int64_t base = a->starts[p], len = a->starts[p + 1] - base;
    int64_t ks = 0;
    const float *kt = 0;
#if LS_ISA_AVX2
    if (!ref) kt = transpose_keys(a, base, len, kvh, &ks);
#endif
    (void)ref;
    for (int64_t t0 = 0; t0 < len; t0 += QB) run_block(a, base, t0, t0 + QB < len ? t0 + QB : len, kvh, kt, ks);
}

static int prefill(const ls_prefill_args *a, int ref) {
    const int64_t H = a->num_heads, KV = a->num_kv_heads, D = a->head_dim;
    if (KV < 1 || H % KV || H / KV > PF_MAX_G || D < 16 || D > PF_MAX_D || D % 16) return -1;
    if (a->row_stride < (H + 2 * KV) * D || a->num_prompts < 0) return -1;
    for (int64_t p = 0; p < a->num_prompts; p++)
        if (a->starts[p + 1] < a->starts[p]) return -1;
    const int64_t items = a->num_prompts * KV; /* (prompt, KV head) */
#pragma omp parallel for schedule(dynamic, 1) if (items > 1)
    for (int64_t i = 0; i < items; i++) run_item(a, i / KV, i % KV, ref);
    return 0;
}

/* 0 on success, -1 for shapes this kernel does not take (the caller falls back to SDPA). */
int ls_prefill_attention(const ls_prefill_args *a) { return prefill(a, 0); }

/* The same through the scalar path, whatever this build's ISA (tests compare the two). */
int ls_prefill_attention_reference(const ls_prefill_args *a) { return prefill(a, 1); }
