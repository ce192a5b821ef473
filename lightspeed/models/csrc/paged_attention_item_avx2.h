/* One work item of the AVX2 path (a sequence, some of its KV heads), 8-lane vectors. Included by
 * paged_attention.c once per specialisation: it defines A2_NAME (suffix), A2_G / A2_V (query
 * heads per KV head, head_dim / 8: constants, or expressions of `a` for the generic version)
 * and A2_GMAX (an array bound). Constant sizes let gcc unroll every loop.
 *
 * AVX2 has 16 registers: q and the accumulators of a whole GQA group (G=3, D=64: 48 vectors)
 * cannot stay in them while each token is visited once, so the work is reordered instead. For
 * each chunk of tokens (offsets gathered once) and each KV head:
 *   1. scores, query head outer (its q, <= 8 vectors, in registers), tokens inner: the K rows
 *      come from L1 after the first query head; reduce8 turns 8 tokens' partial sums into 8
 *      scores;
 *   2. softmax per query head: the chunk's max, at most one rescale of the accumulators,
 *      p = exp(s - m) for 8 tokens per vector;
 *   3. V, query head outer: its accumulators (<= 8 vectors) stay in registers over the chunk's
 *      tokens, loaded and stored once per chunk.
 * head_dim > 64 is done in column blocks of 8 vectors so that nothing spills. bf16 rows are
 * widened in registers, in pair order (see a2widen_row). Every KV head of the item walks the
 * same chunk before the next one (a block's rows, all heads adjacent, are read together), and
 * steps 1 and 3 prefetch the next chunk's rows (see a2next). */
#define A2_CAT_(a, b) a##_##b
#define A2_CAT(a, b) A2_CAT_(a, b)
#define A2_FN(name) A2_CAT(name, A2_NAME)
#define A2_D (8 * A2_V)
/* State of one query head: q (scaled) [D], acc [D], m, l; padded so each q starts 32-byte
 * aligned. A KV head's state is A2_G of these. */
#define A2_GSTRIDE (2 * A2_D + 8)
#define A2_BUF (MAX_GROUP * (2 * MAX_DIM + 8)) /* fits one KV head of the largest shape */
#define A2_LINES(bf) ((A2_D * ((bf) ? 2 : 4) + 63) / 64) /* 64-byte lines in one head's row */

/* Start of token j's row for one KV head: base is the cache + kvh * head_dim elements. */
static inline __attribute__((always_inline)) const void *A2_FN(a2row)(const void *base, const int64_t *off, int j,
                                                                      int bf) {
    return bf ? (const void *)((const uint16_t *)base + off[j]) : (const void *)((const float *)base + off[j]);
}

/* Vector c0 + c of a row as fp32 (c0 a multiple of 8): bf16 in pair order, the even (c even)
 * or odd half of 16 values. */
static inline __attribute__((always_inline)) __m256 A2_FN(a2vec)(const pa_args *a, const void *row, int64_t c0,
                                                                 int64_t c, int bf) {
    (void)a;
    if (!bf) return _mm256_loadu_ps((const float *)row + 8 * (c0 + c));
    if (A2_V % 2 && c0 + c == A2_V - 1) return load8(row, 8 * (c0 + c), 1); /* a last 8: natural order */
    __m256i x = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + 8 * c0 + 16 * (c / 2)));
    return _mm256_castsi256_ps(c % 2 ? _mm256_and_si256(x, _mm256_set1_epi32((int)0xFFFF0000u))
                                     : _mm256_slli_epi32(x, 16));
}

/* Scores for column block [c0, c0 + w) of q (w <= 8 vectors, in registers): s = (c0 ? s : 0)
 * + q.k over the block, for the chunk's 8 * groups rows. The first block also prefetches
 * query head g's share of the next chunk's K rows for this KV head. */
static inline __attribute__((always_inline)) void A2_FN(a2scores_block)(const pa_args *a, const void *k,
                                                                        const int64_t *off, int groups, const float *q,
                                                                        float *s, const a2next *pf, int64_t g, int bf,
                                                                        int64_t c0, int64_t w) {
    __m256 qv[8];
    for (int64_t c = 0; c < w; c++) qv[c] = _mm256_load_ps(q + 8 * (c0 + c));
    for (int grp = 0; grp < groups; grp++) {
        __m256 part[8];
#pragma GCC unroll 8
        for (int jj = 0; jj < 8; jj++) {
            const int j = 8 * grp + jj;
            const void *kr = A2_FN(a2row)(k, off, j, bf);
            __m256 sum = _mm256_mul_ps(qv[0], A2_FN(a2vec)(a, kr, c0, 0, bf));
            for (int64_t c = 1; c < w; c++) sum = _mm256_fmadd_ps(qv[c], A2_FN(a2vec)(a, kr, c0, c, bf), sum);
            part[jj] = sum;
            if (c0 == 0) a2prefetch(pf->k[j], g, A2_G, A2_LINES(bf));
        }
        __m256 sc = reduce8(part);
        _mm256_store_ps(s + 8 * grp, c0 == 0 ? sc : _mm256_add_ps(_mm256_load_ps(s + 8 * grp), sc));
    }
}

/* s[j] = q.k[j] for the chunk's 8 * groups rows (q already scaled), in column blocks of 8
 * vectors so that nothing spills. A block's width is passed as a constant where it can be
 * (always in the specialisations; 8, 4 and 2 in the generic version, e.g. head_dim 80 = 8 + 2
 * vectors), so its loops unroll and q stays in registers. */
static inline __attribute__((always_inline)) void A2_FN(a2scores)(const pa_args *a, const void *k, const int64_t *off,
                                                                  int groups, const float *q, float *s,
                                                                  const a2next *pf, int64_t g, int bf) {
    for (int64_t c0 = 0; c0 < A2_V; c0 += 8) {
        const int64_t w = A2_V - c0 < 8 ? A2_V - c0 : 8;
        if (w == 8)
            A2_FN(a2scores_block)(a, k, off, groups, q, s, pf, g, bf, c0, 8);
        else if (w == 4)
            A2_FN(a2scores_block)(a, k, off, groups, q, s, pf, g, bf, c0, 4);
        else if (w == 2)
            A2_FN(a2scores_block)(a, k, off, groups, q, s, pf, g, bf, c0, 2);
        else
            A2_FN(a2scores_block)(a, k, off, groups, q, s, pf, g, bf, c0, w);
    }
}

/* Online softmax step of one query head over the chunk's n scores: on a new max, rescale acc
 * and l once; then s[j] = p[j] = exp(s[j] - m) (0 past n) and l += sum of p. */
static inline __attribute__((always_inline)) void A2_FN(a2softmax)(const pa_args *a, float *s, int n, float *acc,
                                                                   float *m, float *l) {
    (void)a;
    const int groups = (n + 7) / 8;
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), ninf = _mm256_set1_ps(-INFINITY);
    __m256 mx = ninf;
    for (int grp = 0; grp < groups; grp++) {
        __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps((float)(n - 8 * grp)), _CMP_LT_OQ);
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, _mm256_load_ps(s + 8 * grp), valid));
    }
    const float m_new = fmaxf(*m, hmax8(mx));
    if (m_new > *m) {
        const float alpha = expf(*m - m_new);
        for (int64_t c = 0; c < A2_V; c++)
            _mm256_store_ps(acc + 8 * c, _mm256_mul_ps(_mm256_load_ps(acc + 8 * c), _mm256_set1_ps(alpha)));
        *l *= alpha;
        *m = m_new;
    }
    __m256 sum = _mm256_setzero_ps();
    for (int grp = 0; grp < groups; grp++) {
        __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps((float)(n - 8 * grp)), _CMP_LT_OQ);
        __m256 p = _mm256_and_ps(valid, exp256(_mm256_sub_ps(_mm256_load_ps(s + 8 * grp), _mm256_set1_ps(m_new))));
        _mm256_store_ps(s + 8 * grp, p);
        sum = _mm256_add_ps(sum, p);
    }
    *l += hsum8(sum);
}

/* acc[c0 .. c0 + w) += p[j] * v[j] over the chunk's n tokens, the w (<= 8) accumulator
 * vectors held in registers across all of them. The first block also prefetches query head
 * g's share of the next chunk's V rows. */
static inline __attribute__((always_inline)) void A2_FN(a2values_block)(const pa_args *a, const void *v,
                                                                        const int64_t *off, int n, const float *p,
                                                                        float *acc, const a2next *pf, int64_t g,
                                                                        int bf, int64_t c0, int64_t w) {
    __m256 av[8];
    for (int64_t c = 0; c < w; c++) av[c] = _mm256_load_ps(acc + 8 * (c0 + c));
    for (int j = 0; j < n; j++) {
        const __m256 pj = _mm256_broadcast_ss(p + j);
        const void *vr = A2_FN(a2row)(v, off, j, bf);
        for (int64_t c = 0; c < w; c++) av[c] = _mm256_fmadd_ps(pj, A2_FN(a2vec)(a, vr, c0, c, bf), av[c]);
        if (c0 == 0) a2prefetch(pf->v[j], g, A2_G, A2_LINES(bf));
    }
    for (int64_t c = 0; c < w; c++) _mm256_store_ps(acc + 8 * (c0 + c), av[c]);
}

/* acc += p[j] * v[j] over the chunk's n tokens, in column blocks as a2scores. */
static inline __attribute__((always_inline)) void A2_FN(a2values)(const pa_args *a, const void *v, const int64_t *off,
                                                                  int n, const float *p, float *acc,
                                                                  const a2next *pf, int64_t g, int bf) {
    for (int64_t c0 = 0; c0 < A2_V; c0 += 8) {
        const int64_t w = A2_V - c0 < 8 ? A2_V - c0 : 8;
        if (w == 8)
            A2_FN(a2values_block)(a, v, off, n, p, acc, pf, g, bf, c0, 8);
        else if (w == 4)
            A2_FN(a2values_block)(a, v, off, n, p, acc, pf, g, bf, c0, 4);
        else if (w == 2)
            A2_FN(a2values_block)(a, v, off, n, p, acc, pf, g, bf, c0, 2);
        else
            A2_FN(a2values_block)(a, v, off, n, p, acc, pf, g, bf, c0, w);
    }
}

/* One chunk (n tokens at off, padded to a multiple of 8) for KV head kvh with state st; this
 * head's rows of the next chunk (nn tokens at next) are prefetched along the way. */
static inline __attribute__((always_inline)) void A2_FN(a2chunk)(const pa_args *a, float *st, int64_t kvh,
                                                                 const int64_t *off, int n, const int64_t *next,
                                                                 int nn, int bf) {
    float s[A2_GMAX][CHUNK_A2] __attribute__((aligned(32)));
    const int64_t size = bf ? 2 : 4;
    const void *k = (const char *)a->k_cache + kvh * A2_D * size, *v = (const char *)a->v_cache + kvh * A2_D * size;
    a2next pf;
    a2next_rows(a, &pf, next, nn, kvh * A2_D, st, bf);
#pragma GCC unroll 4
    for (int64_t g = 0; g < A2_G; g++) A2_FN(a2scores)(a, k, off, (n + 7) / 8, st + g * A2_GSTRIDE, s[g], &pf, g, bf);
    for (int64_t g = 0; g < A2_G; g++) {
        float *q = st + g * A2_GSTRIDE;
        A2_FN(a2softmax)(a, s[g], n, q + A2_D, q + 2 * A2_D, q + 2 * A2_D + 1);
    }
#pragma GCC unroll 4
    for (int64_t g = 0; g < A2_G; g++) A2_FN(a2values)(a, v, off, n, s[g], st + g * A2_GSTRIDE + A2_D, &pf, g, bf);
}

/* q (scaled; bf16: in pair order, as the K rows), zero accumulators, m = -inf, l = 0. */
static inline void A2_FN(a2init)(const pa_args *a, float *st, int64_t s, int64_t kvh) {
    const __m256 scale = _mm256_set1_ps(a->scale);
    for (int64_t g = 0; g < A2_G; g++, st += A2_GSTRIDE) {
        int64_t row = s * a->q_stride + (kvh * A2_G + g) * A2_D;
        if (a->is_bf16)
            a2widen_row((const uint16_t *)a->query + row, st, A2_V);
        else
            for (int64_t c = 0; c < A2_V; c++) _mm256_store_ps(st + 8 * c, _mm256_loadu_ps((const float *)a->query + row + 8 * c));
        for (int64_t c = 0; c < A2_V; c++) {
            _mm256_store_ps(st + 8 * c, _mm256_mul_ps(_mm256_load_ps(st + 8 * c), scale));
            _mm256_store_ps(st + A2_D + 8 * c, _mm256_setzero_ps());
        }
        st[2 * A2_D] = -INFINITY; /* m */
        st[2 * A2_D + 1] = 0.0f;  /* l */
    }
}

/* out = acc / l in the cache dtype (bf16: back from pair order). */
static inline void A2_FN(a2finish)(const pa_args *a, const float *st, int64_t s, int64_t kvh) {
    for (int64_t g = 0; g < A2_G; g++, st += A2_GSTRIDE) {
        int64_t row = (s * a->num_heads + kvh * A2_G + g) * A2_D;
        const float l = st[2 * A2_D + 1];
        const __m256 inv = _mm256_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
        if (a->is_bf16)
            a2narrow_row(st + A2_D, (uint16_t *)a->out + row, A2_V, inv);
        else
            for (int64_t c = 0; c < A2_V; c++)
                _mm256_storeu_ps((float *)a->out + row + 8 * c, _mm256_mul_ps(_mm256_load_ps(st + A2_D + 8 * c), inv));
    }
}

/* KV heads [kv_lo, kv_hi) of sequence s, chunk by chunk; bf (the cache dtype) is a constant
 * after inlining, so each dtype gets its own loops and chunk length. */
static inline __attribute__((always_inline)) void A2_FN(a2walk)(const pa_args *a, float *st, int64_t s, int64_t kv_lo,
                                                                int64_t kv_hi, int bf) {
    const int chunk = A2_CHUNK(bf);
    int64_t off[2][CHUNK_A2]; /* this chunk's token offsets, the next one's */
    const int64_t per_head = A2_G * A2_GSTRIDE, ctx = a->context_lens[s];
    token_cursor cur = cursor_start(a, a->block_tables + s * a->table_stride);
    int n = chunk_offsets(a, &cur, ctx, chunk, off[0]);
    a2first(a, off[0], n, kv_lo * A2_D, (kv_hi - kv_lo) * A2_D, bf);
    for (int64_t t0 = 0, i = 0; t0 < ctx; t0 += chunk, i ^= 1) {
        const int nn = chunk_offsets(a, &cur, ctx - t0 - chunk, chunk, off[i ^ 1]);
        for (int64_t h = kv_lo; h < kv_hi; h++)
            A2_FN(a2chunk)(a, st + (h - kv_lo) * per_head, h, off[i], n, off[i ^ 1], nn, bf);
        n = nn;
    }
}

/* KV heads [kv_lo, kv_hi) of sequence s together (at most A2_BUF floats of state). */
static void A2_FN(a2heads)(const pa_args *a, int64_t s, int64_t kv_lo, int64_t kv_hi) {
    float st[A2_BUF] __attribute__((aligned(32)));
    const int64_t per_head = A2_G * A2_GSTRIDE;
    for (int64_t h = kv_lo; h < kv_hi; h++) A2_FN(a2init)(a, st + (h - kv_lo) * per_head, s, h);
    if (a->is_bf16)
        A2_FN(a2walk)(a, st, s, kv_lo, kv_hi, 1);
    else
        A2_FN(a2walk)(a, st, s, kv_lo, kv_hi, 0);
    for (int64_t h = kv_lo; h < kv_hi; h++) A2_FN(a2finish)(a, st + (h - kv_lo) * per_head, s, h);
}

static void A2_FN(item_avx2)(const pa_args *a, int64_t s, int64_t kv_lo, int64_t kv_hi) {
    const int64_t batch = A2_BUF / (A2_G * A2_GSTRIDE); /* >= 1: A2_BUF fits the largest group */
    for (int64_t h = kv_lo; h < kv_hi; h += batch) A2_FN(a2heads)(a, s, h, h + batch < kv_hi ? h + batch : kv_hi);
}

#undef A2_FN
#undef A2_CAT
#undef A2_CAT_
#undef A2_NAME
#undef A2_G
#undef A2_V
#undef A2_GMAX
#undef A2_D
#undef A2_GSTRIDE
#undef A2_BUF
#undef A2_LINES
