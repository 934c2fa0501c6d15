/* Decoding kernels, fp32, threaded with the OpenMP runtime torch already uses.
 *
 * 1. lmlab_linear_f32: y = x @ w.T + bias for any number of rows of x (the products below,
 *    exposed on their own so that tests can check them against torch).
 * 2. lmlab_gpt_decode_f32: one decode step of a whole GPT-2-style model (every block, the
 *    final LayerNorm and the LM head) for a batch of rows, each at its own position in its own
 *    row of the KV cache, in one call and one parallel region.
 *
 * Products. Decoding multiplies a few rows (1 token; 5 beams) to a few dozen (a server's
 * batch) by every weight matrix. With one row the speed is how fast the weights stream from
 * memory; with 64 rows it is arithmetic. One blocked kernel serves both: the threads split the
 * outputs n into blocks of NR weight rows, and each block — read from memory once, then held
 * in L1 — is multiplied with the input rows MR at a time in registers (MR x NR accumulators).
 * Every output y[m, n] is one dot product summed in the build's one order (vec.h) whatever the
 * tile, the number of rows or of threads: a row's numbers are bit-identical alone or in a
 * batch of 64 (batch invariance, which a server's "same answer under load" rests on).
 *
 * The arithmetic is models/gpt.py's (pre-LayerNorm blocks, GPT-2's attention and MLP), checked
 * against it in tests/kernels/test_gpt_decode_kernel.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "gpt_layout.h"
#include "vec.h"


/* Register tiles: MR input rows x NR weight rows. AVX-512 has 32 vector registers (16
 * accumulators + 4 weight vectors + 1 input vector fit), AVX2 16. */
#if VW == 16
#define MR 4
#else
#define MR 2
#endif
#define NR 4
#define PREFETCH_AHEAD 256 /* floats (1 KiB) ahead of a streamed weight row's loads */

/* out[i][j] = dot(w + j*ldw, x + i*ldx, K) for i < ROWS, j < NR, each summed as vf_dot sums.
 * A macro so that the tile's size is a constant and the accumulators stay in registers;
 * DEFINE_TILE(MR) defines tile_MR (## pastes the name unexpanded), DEFINE_TILE(1) tile_1. */
#define DEFINE_TILE(ROWS)                                                                        \
    static inline void tile_##ROWS(const float *x, int64_t ldx, const float *w, int64_t ldw,     \
                                   int64_t K, const float *prefetch, float out[ROWS][NR]) {      \
        vf acc[ROWS][NR];                                                                       \
        for (int i = 0; i < ROWS; i++)                                                          \
            for (int j = 0; j < NR; j++) acc[i][j] = vf_zero();                                 \
        int64_t k = 0;                                                                          \
        for (; k + VW <= K; k += VW) {                                                          \
            vf wv[NR];                                                                          \
            for (int j = 0; j < NR; j++) {                                                      \
                if (prefetch)                                                                   \
                    _mm_prefetch((const char *)(prefetch + j * ldw + k), _MM_HINT_T0);          \
                wv[j] = vf_load(w + j * ldw + k);                                               \
            }                                                                                   \
            for (int i = 0; i < ROWS; i++) {                                                    \
                const vf xv = vf_load(x + i * ldx + k);                                         \
                for (int j = 0; j < NR; j++) acc[i][j] = vf_fma(wv[j], xv, acc[i][j]);          \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < ROWS; i++)                                                          \
            for (int j = 0; j < NR; j++) {                                                      \
                float s = vf_sum(acc[i][j]);                                                    \
                for (int64_t kk = k; kk < K; kk++) s = fmaf(w[j * ldw + kk], x[i * ldx + kk], s); \
                out[i][j] = s;                                                                  \
            }                                                                                   \
    }
DEFINE_TILE(MR)
#if MR != 1
DEFINE_TILE(1)
#endif

/* dots[m] = dot(w, x[m]) for rows m < rows <= STREAM_ROWS: one weight row streamed from
 * memory once, in order, for all the rows — what a few rows (a token, a few beams) want, where
 * the tiles' interleaved weight rows stream slower. Summed exactly as vf_dot sums (the tiles'
 * order): with AVX-512, each 16-lane accumulator as two 8-lane halves, which add lane by lane
 * as the wide one does and end in the same reduction (vec.h's vf_sum); with AVX2, as is. */
#define STREAM_ROWS 8
static inline void dot_rows(const float *w, const float *x, int64_t ldx, int64_t rows,
                            int64_t K, float *dots) {
    __m256 lo[STREAM_ROWS], hi[STREAM_ROWS];
    #pragma GCC unroll 8
    for (int m = 0; m < STREAM_ROWS; m++) lo[m] = hi[m] = _mm256_setzero_ps();
    int64_t k = 0;
#if VW == 16
    for (; k + 16 <= K; k += 16) {
        _mm_prefetch((const char *)(w + k + PREFETCH_AHEAD), _MM_HINT_T0);
        const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
        #pragma GCC unroll 8
        for (int m = 0; m < STREAM_ROWS; m++)
            if (m < rows) {
                lo[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + k), lo[m]);
                hi[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * ldx + k + 8), hi[m]);
            }
    }
#else
    for (; k + 8 <= K; k += 8) {
        if (k % 16 == 0) _mm_prefetch((const char *)(w + k + PREFETCH_AHEAD), _MM_HINT_T0);
        const __m256 w0 = _mm256_loadu_ps(w + k);
        #pragma GCC unroll 8
        for (int m = 0; m < STREAM_ROWS; m++)
            if (m < rows) lo[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + k), lo[m]);
    }
#endif
    for (int m = 0; m < rows; m++) {
        float s = horizontal_sum(_mm256_add_ps(lo[m], hi[m]));
        for (int64_t kk = k; kk < K; kk++) s = fmaf(w[kk], x[m * ldx + kk], s);
        dots[m] = s;
    }
}

/* *y (+)= dot + bias[n]: one output of a product (added to y for a residual connection). */
static inline void put(float *y, float dot, const float *bias, int64_t n, int accumulate) {
    const float v = dot + (bias ? bias[n] : 0.0f);
    if (accumulate) *y += v;
    else *y = v;
}

/* The NR outputs of one block of one row: y[n + j] (+)= dots[j] + bias[n + j]. */
static inline void store(float *y, int64_t n, const float *dots, const float *bias,
                         int accumulate) {
    for (int64_t j = 0; j < NR; j++) put(y + n + j, dots[j], bias, n + j, accumulate);
}

/* Inside a parallel region: y[m, n] (+)= dot(w[n], x[m]) + b[n] for every row m; threads split
 * the output blocks, so each weight row is read from memory once per call. */
static void products(const float *x, int64_t rows, int64_t in, const float *w, int64_t out,
                     const float *bias, float *y, int accumulate) {
    if (rows <= STREAM_ROWS) {
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < out; n++) {
            float dots[STREAM_ROWS];
            dot_rows(w + n * in, x, in, rows, in, dots);
            for (int64_t m = 0; m < rows; m++) put(y + m * out + n, dots[m], bias, n, accumulate);
        }
        return;
    }
    const int64_t blocks = (out + NR - 1) / NR;
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * NR;
        if (n + NR > out) {  /* the last, partial block: one output at a time */
            for (int64_t m = 0; m < rows; m++)
                for (int64_t j = n; j < out; j++)
                    put(y + m * out + j, vf_dot(w + j * in, x + m * in, in), bias, j, accumulate);
            continue;
        }
        /* While this block is multiplied, the next one is fetched from memory: the tiles
         * prefetch its rows (a block of K floats per row) as they walk over k. */
        const float *next = n + 2 * NR <= out ? w + (n + NR) * in : NULL;
        int64_t m = 0;
        for (; m + MR <= rows; m += MR) {
            float dots[MR][NR];
            tile_MR(x + m * in, in, w + n * in, in, in, next, dots);
            for (int i = 0; i < MR; i++) store(y + (m + i) * out, n, dots[i], bias, accumulate);
        }
        for (; m < rows; m++) {
            float dots[1][NR];
            tile_1(x + m * in, in, w + n * in, in, in, next, dots);
            store(y + m * out, n, dots[0], bias, accumulate);
        }
    }
}

/* x: (rows, in), w: (out, in), bias: (out) or NULL, y: (rows, out); all contiguous. */
void lmlab_linear_f32(const float *x, int64_t rows, int64_t in, const float *w, int64_t out,
                      const float *bias, float *y, int threads) {
    #pragma omp parallel num_threads(threads)
    products(x, rows, in, w, out, bias, y, 0);
}

/* ---- one decode step of a GPT-2-style model ------------------------------------------------
 * A decode step of a small model is ~100 tensor operations of a few microseconds each; in
 * eager PyTorch their dispatch, Python and thread wake-ups cost as much as the arithmetic
 * (6-layer, width-384 model: ~2 of ~4.4 ms per token). Here the step is one call: one
 * parallel region in which the threads split every product by output block and every
 * attention by (token, head), with barriers between the stages. */

static void layer_norm(const float *x, const float *w, const float *b, float eps, int64_t n,
                       float *out) {
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float rstd = (float)(1.0 / sqrt(var / n + eps));
    for (int64_t i = 0; i < n; i++)
        out[i] = (float)(x[i] - mean) * rstd * (w ? w[i] : 1.0f) + (b ? b[i] : 0.0f);
}

static inline float activate(float v, int act) {
    if (act == ACT_RELU) return v > 0.0f ? v : 0.0f;
    if (act == ACT_GELU) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    float lanes[8] = {v};
    _mm256_storeu_ps(lanes, gelu_tanh8(_mm256_loadu_ps(lanes)));
    return lanes[0];
}

/* Inside a parallel region: the activation over n contiguous values, 8 lanes at a time. */
static void activate_all(float *h, int64_t n, int act) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i += 256) {
        const int64_t end = i + 256 < n ? i + 256 : n;
        int64_t j = i;
        if (act == ACT_GELU_TANH)
            for (; j + 8 <= end; j += 8)
                _mm256_storeu_ps(h + j, gelu_tanh8(_mm256_loadu_ps(h + j)));
        for (; j < end; j++) h[j] = activate(h[j], act);
    }
}

/* Inside a parallel region: out[m] = LayerNorm(x[m]) for every row m. */
static void layer_norm_rows(const float *x, int64_t rows, int64_t n, const float *w,
                            const float *b, float eps, float *out) {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < rows; m++)
        layer_norm(x + m * n, w, b, eps, n, out + m * n);
}

/* A short dot product (a head's width, for attention's scores): four chains of 8 lanes, which
 * suit a 64-wide head better than one 16-lane chain and its reduction. */
static inline float dot8(const float *a, const float *b, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), _mm256_loadu_ps(b + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), _mm256_loadu_ps(b + k + 24), a3);
    }
    for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
    float s = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < n; k++) s = fmaf(a[k], b[k], s);
    return s;
}

/* One query (token m, head h) over the slots 0..own of its cache row: softmax(q.k / sqrt(D)) v
 * into out. Slots whose valid byte is 0 (padding) are skipped, except the query's own slot
 * (as models/kv_cache.py's mask has it). The weighted sum of values keeps the head's output
 * in registers while it streams over the slots. A query's numbers depend on its own row of the
 * cache only. */
static void attend(const float *q, const float *k_cache, const float *v_cache, int64_t own,
                   const uint8_t *valid, int64_t D, float scale, float *score, float *out) {
    int64_t s = 0;
    for (; s <= own; s++) score[s] = dot8(k_cache + s * D, q, D) * scale;
    float top = -INFINITY;
    for (s = 0; s <= own; s++) {
        if (valid && !valid[s] && s != own) score[s] = -INFINITY;
        else if (score[s] > top) top = score[s];
    }
    for (s = 0; s + 8 <= own + 1; s += 8) {
        const __m256 v = _mm256_loadu_ps(score + s);
        const __m256 masked = _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
        const __m256 e = _mm256_blendv_ps(exp8(_mm256_sub_ps(v, _mm256_set1_ps(top))),
                                          _mm256_setzero_ps(), masked);
        _mm256_storeu_ps(score + s, e);
    }
    for (; s <= own; s++) score[s] = score[s] == -INFINITY ? 0.0f : expf(score[s] - top);
    float total = 0.0f;
    for (s = 0; s <= own; s++) total += score[s];
    const float inverse = 1.0f / total;
    const int64_t vectors = D / VW;
    if (D % VW == 0 && vectors <= 8) {
        /* Two sets of accumulators (even and odd slots) for ILP when a head is a few vectors */
        vf even[8], odd[8];
        #pragma GCC unroll 8
        for (int i = 0; i < 8; i++) even[i] = odd[i] = vf_zero();
        for (s = 0; s + 2 <= own + 1; s += 2) {
            const vf p0 = vf_set1(score[s] * inverse), p1 = vf_set1(score[s + 1] * inverse);
            const float *v0 = v_cache + s * D, *v1 = v0 + D;
            #pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                if (i < vectors) {
                    even[i] = vf_fma(p0, vf_load(v0 + i * VW), even[i]);
                    odd[i] = vf_fma(p1, vf_load(v1 + i * VW), odd[i]);
                }
        }
        if (s == own) {
            const vf p0 = vf_set1(score[s] * inverse);
            #pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                if (i < vectors) even[i] = vf_fma(p0, vf_load(v_cache + s * D + i * VW), even[i]);
        }
        #pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            if (i < vectors) vf_store(out + i * VW, vf_add(even[i], odd[i]));
        return;
    }
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (s = 0; s <= own; s++) {
        const float weight = score[s] * inverse, *v = v_cache + s * D;
        if (weight != 0.0f)
            for (int64_t d = 0; d < D; d++) out[d] += weight * v[d];
    }
}

/* Returns 0, or -1 when its scratch memory cannot be allocated (nothing is written then).
 * x: (rows, C) embeddings in, residual stream (overwritten); rows = batch x tokens_per_row,
 * row m being token m % tokens_per_row of batch row m / tokens_per_row. keys/values: per layer
 * one (batch, n_head, max_len, head_dim) contiguous cache. starts[b]: the slot of batch row b's
 * first new token; its token t is written at slot starts[b] + t and attends to the slots up to
 * its own. valid: (batch, max_len) bytes, 0 for a slot no query may attend (padding), or NULL
 * for none. */
int lmlab_gpt_decode_f32(const int64_t *weights, const int64_t *caches, int64_t n_layer,
                         int64_t rows, int64_t tokens_per_row, int64_t n_embd, int64_t n_head,
                         int64_t n_inner, int64_t max_len, const int64_t *starts,
                         const uint8_t *valid, float eps, int act, const float *ln_f_w,
                         const float *ln_f_b, const float *head_w, int64_t vocab, float *x,
                         float *logits, int threads) {
    const int64_t C = n_embd, D = n_embd / n_head, T = tokens_per_row, batch = rows / T;
    const float scale = 1.0f / sqrtf((float)D);
    int64_t S = 0;  /* the most slots any query reads */
    for (int64_t b = 0; b < batch; b++)
        if (starts[b] + T > S) S = starts[b] + T;
    float *normed = malloc(sizeof(float) * rows * C);
    float *qkv = malloc(sizeof(float) * rows * 3 * C);
    float *heads = malloc(sizeof(float) * rows * C);
    float *hidden = malloc(sizeof(float) * rows * n_inner);
    float *scores = malloc(sizeof(float) * rows * n_head * S);
    if (!normed || !qkv || !heads || !hidden || !scores) {
        free(normed); free(qkv); free(heads); free(hidden); free(scores);
        return -1;
    }
    #pragma omp parallel num_threads(threads)
    {  /* one region for the whole step: the stages are split by the barriers of `omp for` */
        for (int64_t l = 0; l < n_layer; l++) {
            const float *const *p = (const float *const *)(weights + l * PER_LAYER);
            float *keys = (float *)caches[2 * l], *values = (float *)caches[2 * l + 1];
            layer_norm_rows(x, rows, C, p[LN1_W], p[LN1_B], eps, normed);
            products(normed, rows, C, p[ATTN_W], 3 * C, p[ATTN_B], qkv, 0);
            #pragma omp for schedule(static)
            for (int64_t mh = 0; mh < rows * n_head; mh++) {  /* this step's keys and values */
                const int64_t m = mh / n_head, h = mh % n_head, b = m / T, t = m % T;
                const int64_t at = ((b * n_head + h) * max_len + starts[b] + t) * D;
                for (int64_t d = 0; d < D; d++) {
                    keys[at + d] = qkv[m * 3 * C + C + h * D + d];
                    values[at + d] = qkv[m * 3 * C + 2 * C + h * D + d];
                }
            }
            #pragma omp for schedule(static)
            for (int64_t mh = 0; mh < rows * n_head; mh++) {  /* attention, one (token, head) each */
                const int64_t m = mh / n_head, h = mh % n_head, b = m / T;
                attend(qkv + m * 3 * C + h * D, keys + (b * n_head + h) * max_len * D,
                       values + (b * n_head + h) * max_len * D, starts[b] + m % T,
                       valid ? valid + b * max_len : NULL, D, scale, scores + mh * S,
                       heads + m * C + h * D);
            }
            products(heads, rows, C, p[PROJ_W], C, p[PROJ_B], x, 1);
            layer_norm_rows(x, rows, C, p[LN2_W], p[LN2_B], eps, normed);
            products(normed, rows, C, p[FC_W], n_inner, p[FC_B], hidden, 0);
            activate_all(hidden, rows * n_inner, act);
            products(hidden, rows, n_inner, p[FC2_W], C, p[FC2_B], x, 1);
        }
        layer_norm_rows(x, rows, C, ln_f_w, ln_f_b, eps, normed);
        products(normed, rows, C, head_w, vocab, NULL, logits, 0);
    }
    free(normed); free(qkv); free(heads); free(hidden); free(scores);
    return 0;
}
