/* One work item of the AVX2 path (a sequence, some of its KV heads), 8-lane vectors. Included by
 * paged_attention.c once per specialisation: it defines A2_NAME (suffix), A2_G / A2_V (query
 * heads per KV head, head_dim / 8: constants, or expressions of `a` for the generic version)
 * and A2_GMAX / A2_VMAX (array bounds). Constant sizes let gcc unroll every loop and keep q and
 * the accumulators in registers as far as AVX2's 16 allow. */
#define A2_CAT_(a, b) a##_##b
#define A2_CAT(a, b) A2_CAT_(a, b)
#define A2_FN(name) A2_CAT(name, A2_NAME)

typedef struct {
    __m256 q[A2_GMAX][A2_VMAX], acc[A2_GMAX][A2_VMAX], l[A2_GMAX];
    float m[A2_GMAX];
} A2_FN(a2state);

static inline void A2_FN(a2init)(const pa_args *a, A2_FN(a2state) *st, int64_t s, int64_t kvh) {
    const __m256 scale = _mm256_set1_ps(a->scale);
    for (int64_t g = 0; g < A2_G; g++) {
        int64_t row = s * a->q_stride + (kvh * A2_G + g) * a->head_dim;
        for (int64_t c = 0; c < A2_V; c++) {
            st->q[g][c] = _mm256_mul_ps(load8(a->query, row + 8 * c, a->is_bf16), scale);
            st->acc[g][c] = _mm256_setzero_ps();
        }
        st->l[g] = _mm256_setzero_ps();
        st->m[g] = -INFINITY;
    }
}

/* q.k of `n` (<= 8) tokens for every query head of the group (one K row load per token), as
 * one vector of 8 scores per head; lanes past n hold -inf. */
static inline void A2_FN(a2scores)(const pa_args *a, const A2_FN(a2state) *st, const int64_t *off, int n,
                                   __m256 *scores) {
    __m256 part[A2_GMAX][CHUNK8];
    for (int j = 0; j < CHUNK8; j++) {
        if (j >= n) {
            for (int64_t g = 0; g < A2_G; g++) part[g][j] = _mm256_setzero_ps();
            continue;
        }
        __m256 k[A2_VMAX];
        for (int64_t c = 0; c < A2_V; c++) k[c] = load8(a->k_cache, off[j] + 8 * c, a->is_bf16);
        for (int64_t g = 0; g < A2_G; g++) {
            __m256 sum = _mm256_mul_ps(st->q[g][0], k[0]);
            for (int64_t c = 1; c < A2_V; c++) sum = _mm256_fmadd_ps(st->q[g][c], k[c], sum);
            part[g][j] = sum;
        }
    }
    const __m256 valid = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)n), _CMP_LT_OQ);
    for (int64_t g = 0; g < A2_G; g++)
        scores[g] = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), reduce8(part[g]), valid);
}

/* Online softmax over one chunk of 8 tokens (rescale on a new max), then acc += p * v. */
static inline void A2_FN(a2update)(const pa_args *a, A2_FN(a2state) *st, const int64_t *off, int n) {
    __m256 scores[A2_GMAX];
    float p[A2_GMAX][CHUNK8];
    A2_FN(a2scores)(a, st, off, n, scores);
    for (int64_t g = 0; g < A2_G; g++) {
        float m_new = fmaxf(st->m[g], hmax8(scores[g]));
        if (m_new > st->m[g]) {
            __m256 alpha = _mm256_set1_ps(expf(st->m[g] - m_new));
            for (int64_t c = 0; c < A2_V; c++) st->acc[g][c] = _mm256_mul_ps(st->acc[g][c], alpha);
            st->l[g] = _mm256_mul_ps(st->l[g], alpha);
            st->m[g] = m_new;
        }
        /* -inf lanes would come out of exp256 as exp(-87): zero them explicitly */
        __m256 valid = _mm256_cmp_ps(scores[g], _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        __m256 e = _mm256_and_ps(valid, exp256(_mm256_sub_ps(scores[g], _mm256_set1_ps(m_new))));
        st->l[g] = _mm256_add_ps(st->l[g], e);
        _mm256_storeu_ps(p[g], e);
    }
    for (int j = 0; j < n; j++) {
        __m256 v[A2_VMAX];
        for (int64_t c = 0; c < A2_V; c++) v[c] = load8(a->v_cache, off[j] + 8 * c, a->is_bf16);
        for (int64_t g = 0; g < A2_G; g++) {
            __m256 pj = _mm256_set1_ps(p[g][j]);
            for (int64_t c = 0; c < A2_V; c++) st->acc[g][c] = _mm256_fmadd_ps(pj, v[c], st->acc[g][c]);
        }
    }
}

/* KV heads [kv_lo, kv_hi) of sequence s, one head at a time, 8 tokens per chunk. */
static void A2_FN(item_avx2)(const pa_args *a, int64_t s, int64_t kv_lo, int64_t kv_hi) {
    const int64_t D = a->head_dim, ctx = a->context_lens[s];
    A2_FN(a2state) st;
    for (int64_t kvh = kv_lo; kvh < kv_hi; kvh++) {
        A2_FN(a2init)(a, &st, s, kvh);
        token_cursor cur = cursor_start(a, a->block_tables + s * a->table_stride);
        int64_t off[CHUNK8];
        for (int64_t t0 = 0; t0 < ctx; t0 += CHUNK8) {
            int n = ctx - t0 < CHUNK8 ? (int)(ctx - t0) : CHUNK8;
            for (int j = 0; j < n; j++) off[j] = cursor_next(a, &cur) + kvh * D;
            A2_FN(a2update)(a, &st, off, n);
        }
        for (int64_t g = 0; g < A2_G; g++) {
            int64_t row = (s * a->num_heads + kvh * A2_G + g) * D;
            float l = hsum8(st.l[g]);
            __m256 inv = _mm256_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
            for (int64_t c = 0; c < A2_V; c++)
                store8(a->out, row + 8 * c, _mm256_mul_ps(st.acc[g][c], inv), a->is_bf16);
        }
    }
}

#undef A2_FN
#undef A2_CAT
#undef A2_CAT_
#undef A2_NAME
#undef A2_G
#undef A2_V
#undef A2_GMAX
#undef A2_VMAX
