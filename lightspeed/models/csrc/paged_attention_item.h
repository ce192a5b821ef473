/* One work item of the AVX-512 path (a sequence, some of its KV heads), specialised for PA_G query heads per KV
 * head and PA_V = head_dim / 16 vectors per row. Included once per pair by paged_attention.c,
 * which defines PA_G and PA_V; compile-time sizes keep q, the accumulators and the partial sums
 * in registers instead of stack arrays. */
#define PA_CAT_(a, b, c) a##_##b##_##c
#define PA_CAT(a, b, c) PA_CAT_(a, b, c)
#define PA_FN(name) PA_CAT(name, PA_G, PA_V)

typedef struct {
    __m512 q[PA_G][PA_V], acc[PA_G][PA_V], l[PA_G];
    float m[PA_G];
} PA_FN(state);

/* q.k for `n` (<= 16) tokens and every query head of the group; invalid lanes get -inf. */
static inline void PA_FN(scores)(const pa_args *a, const PA_FN(state) *st, const int64_t *off,
                                 int64_t head_off, int n, __m512 *scores) {
    __m512 part[PA_G][CHUNK], k[PA_V];
    for (int j = 0; j < CHUNK; j++) {
        if (j >= n) {
            for (int g = 0; g < PA_G; g++) part[g][j] = _mm512_setzero_ps();
            continue;
        }
        load_row(a->k_cache, off[j] + head_off, PA_V * 16, a->is_bf16, k);
        for (int g = 0; g < PA_G; g++) {
            __m512 sum = _mm512_mul_ps(st->q[g][0], k[0]);
            for (int c = 1; c < PA_V; c++) sum = _mm512_fmadd_ps(st->q[g][c], k[c], sum);
            part[g][j] = sum;
        }
    }
    __mmask16 valid = (__mmask16)((1u << n) - 1u);
    for (int g = 0; g < PA_G; g++)
        scores[g] = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), reduce16(part[g]));
}

/* Online softmax over one chunk: rescale on a new max, then accumulate p * v. */
static inline void PA_FN(update)(const pa_args *a, PA_FN(state) *st, const int64_t *off,
                                 int64_t head_off, int n) {
    __m512 scores[PA_G], v[PA_V];
    float p[PA_G][CHUNK];
    PA_FN(scores)(a, st, off, head_off, n, scores);
    __mmask16 valid = (__mmask16)((1u << n) - 1u);
    for (int g = 0; g < PA_G; g++) {
        float m_new = fmaxf(st->m[g], _mm512_mask_reduce_max_ps(valid, scores[g]));
        if (m_new > st->m[g]) {
            __m512 alpha = _mm512_set1_ps(expf(st->m[g] - m_new));
            for (int c = 0; c < PA_V; c++) st->acc[g][c] = _mm512_mul_ps(st->acc[g][c], alpha);
            st->l[g] = _mm512_mul_ps(st->l[g], alpha);
            st->m[g] = m_new;
        }
        __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(scores[g], _mm512_set1_ps(m_new))));
        st->l[g] = _mm512_add_ps(st->l[g], e);
        _mm512_storeu_ps(p[g], e);
    }
    for (int j = 0; j < n; j++) {
        load_row(a->v_cache, off[j] + head_off, PA_V * 16, a->is_bf16, v);
        for (int g = 0; g < PA_G; g++) {
            __m512 pj = _mm512_set1_ps(p[g][j]);
            for (int c = 0; c < PA_V; c++) st->acc[g][c] = _mm512_fmadd_ps(pj, v[c], st->acc[g][c]);
        }
    }
}

static void PA_FN(init)(const pa_args *a, PA_FN(state) *st, int64_t s, int64_t kvh) {
    const int64_t D = PA_V * 16;
    for (int g = 0; g < PA_G; g++) {
        load_row(a->query, s * a->q_stride + (kvh * PA_G + g) * D, D, a->is_bf16, st->q[g]);
        for (int c = 0; c < PA_V; c++) {
            st->q[g][c] = _mm512_mul_ps(st->q[g][c], _mm512_set1_ps(a->scale));
            st->acc[g][c] = _mm512_setzero_ps();
        }
        st->l[g] = _mm512_setzero_ps();
        st->m[g] = -INFINITY;
    }
}

/* KV heads [kv_lo, kv_hi) of sequence s, chunk by chunk: all heads of a token row are adjacent
 * in the cache, so walking them together reads each block as one dense stream. */
static void PA_FN(item)(const pa_args *a, int64_t s, int64_t kv_lo, int64_t kv_hi) {
    const int64_t D = PA_V * 16, ctx = a->context_lens[s], heads = kv_hi - kv_lo;
    PA_FN(state) st[heads];
    for (int64_t h = 0; h < heads; h++) PA_FN(init)(a, &st[h], s, kv_lo + h);
    int64_t off[CHUNK];
    token_cursor cur = cursor_start(a, a->block_tables + s * a->table_stride);
    for (int64_t t0 = 0; t0 < ctx; t0 += CHUNK) {
        int n = next_chunk(a, &cur, ctx - t0, off);
        for (int64_t h = 0; h < heads; h++) PA_FN(update)(a, &st[h], off, (kv_lo + h) * D, n);
    }
    for (int64_t h = 0; h < heads; h++)
        for (int g = 0; g < PA_G; g++) {
            float l = _mm512_reduce_add_ps(st[h].l[g]);
            store_row(a, (s * a->num_heads + (kv_lo + h) * PA_G + g) * D, st[h].acc[g], PA_V,
                      l > 0.0f ? 1.0f / l : 0.0f);
        }
}

#undef PA_FN
#undef PA_CAT
#undef PA_CAT_
#undef PA_V
