/* Decoding kernels, fp32, AVX2 + FMA, threaded with the OpenMP runtime torch already uses.
 *
 * 1. lmlab_linear_f32: y = x @ w.T + bias for a few rows of x (1 token, a few beams).
 * 2. lmlab_gpt_decode_f32: one decode step of a whole GPT-2-style model (every block, the
 *    final LayerNorm and the LM head) for a few rows, in one call and one parallel region.
 *
 * Decoding multiplies one vector per row by every weight matrix, so its speed is how fast the
 * weights stream from memory. torch's BLAS and oneDNN paths reach 11-19 GB/s on this kind of
 * 2-core machine for such products, against ~26 GB/s that a plain read of the same bytes
 * reaches; this loop streams each weight row once, in order, on every OpenMP thread, and gets
 * within ~10% of the plain read (benchmarks/generate_speed.py, BENCHMARKS.md).
 *
 * Every output y[m, n] is summed in the same order whatever the number of rows: four 8-lane
 * accumulators over k (k mod 32), added pairwise, then the lanes, then the scalar tail. So a
 * row's numbers do not depend on which other rows share its batch (batch invariance, bit for
 * bit), and a row's weight row, read once from memory, is reused from L1 for the other rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "gpt_layout.h"
#include "simd.h"

#define PREFETCH_AHEAD 256 /* floats (1 KiB) ahead of the loads; measured 256/512/1024 */

static inline float dot(const float *w, const float *x, int64_t in) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= in; k += 32) {
        _mm_prefetch((const char *)(w + k + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k + PREFETCH_AHEAD + 16), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= in; k += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    float s = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < in; k++)
        s += w[k] * x[k];
    return s;
}

/* dot(w, x0) and dot(w, x1) at once, each summed exactly as dot() sums it: the weight row is
 * loaded once for both, which is what makes 16-row products (batch 16) compute- rather than
 * load-bound. */
static inline void dot2(const float *w, const float *x0, const float *x1, int64_t in,
                        float *s0, float *s1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k + 32 <= in; k += 32) {
        _mm_prefetch((const char *)(w + k + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k + PREFETCH_AHEAD + 16), _MM_HINT_T0);
        const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
        const __m256 w2 = _mm256_loadu_ps(w + k + 16), w3 = _mm256_loadu_ps(w + k + 24);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + k), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x0 + k + 8), a1);
        a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x0 + k + 16), a2);
        a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x0 + k + 24), a3);
        b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + k), b0);
        b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + k + 8), b1);
        b2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x1 + k + 16), b2);
        b3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x1 + k + 24), b3);
    }
    for (; k + 8 <= in; k += 8) {
        const __m256 w0 = _mm256_loadu_ps(w + k);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + k), a0);
        b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + k), b0);
    }
    float t0 = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float t1 = horizontal_sum(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
    for (; k < in; k++) {
        t0 += w[k] * x0[k];
        t1 += w[k] * x1[k];
    }
    *s0 = t0;
    *s1 = t1;
}

/* y[m, n] = dot(w[n], x[m]) for every row m of x, two rows at a time. */
static inline void row_products(const float *w_row, const float *x, int64_t rows, int64_t in,
                                float *dots) {
    int64_t m = 0;
    for (; m + 2 <= rows; m += 2)
        dot2(w_row, x + m * in, x + (m + 1) * in, in, dots + m, dots + m + 1);
    if (m < rows)
        dots[m] = dot(w_row, x + m * in, in);
}

/* The most rows one call takes (the fused step's batch 16 included). */
#define MAX_ROWS 16

/* ---- one decode step of a GPT-2-style model ------------------------------------------------
 * A decode step of a small model is ~100 tensor operations of a few microseconds each; in
 * eager PyTorch their dispatch, Python and thread wake-ups cost as much as the arithmetic
 * (6-layer, width-384 model: ~2 of ~4.4 ms per token). Here the step is one call: one
 * parallel region in which the threads split every product by output row and every attention
 * by (row, head), with barriers between the stages. The arithmetic is models/gpt.py's
 * (pre-LayerNorm blocks, GPT-2's attention and MLP), checked against it in
 * tests/kernels/test_gpt_decode_kernel.py. */

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

/* Inside a parallel region: y[m, n] (+)= dot(w[n], x[m]) + b[n] for every row m; threads split
 * the output rows n, so each weight row is streamed from memory once. */
static void products(const float *x, int64_t rows, int64_t in, const float *w, int64_t out,
                     const float *bias, float *y, int accumulate) {
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < out; n++) {
        const float b = bias ? bias[n] : 0.0f;
        float dots[MAX_ROWS];
        row_products(w + n * in, x, rows, in, dots);
        for (int64_t m = 0; m < rows; m++) {
            if (accumulate) y[m * out + n] += dots[m] + b;
            else y[m * out + n] = dots[m] + b;
        }
    }
}

/* x: (rows, in), w: (out, in), bias: (out) or NULL, y: (rows, out); all contiguous. */
void lmlab_linear_f32(const float *x, int64_t rows, int64_t in, const float *w, int64_t out,
                      const float *bias, float *y, int threads) {
    #pragma omp parallel num_threads(threads)
    products(x, rows, in, w, out, bias, y, 0);
}

/* Inside a parallel region: out[m] = LayerNorm(x[m]) for every row m. */
static void layer_norm_rows(const float *x, int64_t rows, int64_t n, const float *w,
                            const float *b, float eps, float *out) {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < rows; m++)
        layer_norm(x + m * n, w, b, eps, n, out + m * n);
}

/* Returns 0, or -1 when its scratch memory cannot be allocated (nothing is written then).
 * x: (rows, C) embeddings in, residual stream (overwritten); rows = batch × tokens_per_row,
 * row m being token m % tokens_per_row of batch row m / tokens_per_row. keys/values: per layer
 * one (batch, n_head, max_len, head_dim) contiguous cache; token t is written at position + t
 * and attends to the positions up to its own. mask: (batch, position + tokens_per_row) bytes,
 * 1 where a key may be attended (a token always attends to itself, as models/layers.py's
 * padded_causal_mask has it), or NULL for all. */
int lmlab_gpt_decode_f32(const int64_t *weights, const int64_t *caches, int64_t n_layer,
                         int64_t rows, int64_t tokens_per_row, int64_t n_embd, int64_t n_head,
                         int64_t n_inner, int64_t max_len, int64_t position, const uint8_t *mask,
                         float eps, int act, const float *ln_f_w, const float *ln_f_b,
                         const float *head_w, int64_t vocab, float *x, float *logits,
                         int threads) {
    const int64_t C = n_embd, D = n_embd / n_head, T = tokens_per_row, S = position + T;
    const float scale = 1.0f / sqrtf((float)D);
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
                const int64_t at = ((b * n_head + h) * max_len + position + t) * D;
                for (int64_t d = 0; d < D; d++) {
                    keys[at + d] = qkv[m * 3 * C + C + h * D + d];
                    values[at + d] = qkv[m * 3 * C + 2 * C + h * D + d];
                }
            }
            #pragma omp for schedule(static)
            for (int64_t mh = 0; mh < rows * n_head; mh++) {  /* attention, one (token, head) each */
                const int64_t m = mh / n_head, h = mh % n_head, b = m / T, own = position + m % T;
                const float *q = qkv + m * 3 * C + h * D;
                const float *k_cache = keys + (b * n_head + h) * max_len * D;
                const float *v_cache = values + (b * n_head + h) * max_len * D;
                float *score = scores + mh * S, top = -INFINITY;
                for (int64_t s = 0; s <= own; s++) {
                    if (mask && !mask[b * S + s] && s != own) { score[s] = -INFINITY; continue; }
                    score[s] = dot(k_cache + s * D, q, D) * scale;
                    if (score[s] > top) top = score[s];
                }
                float total = 0.0f;
                int64_t s = 0;
                for (; s + 8 <= own + 1; s += 8) {
                    const __m256 v = _mm256_loadu_ps(score + s);
                    const __m256 masked = _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
                    const __m256 e = _mm256_blendv_ps(exp8(_mm256_sub_ps(v, _mm256_set1_ps(top))),
                                                      _mm256_setzero_ps(), masked);
                    _mm256_storeu_ps(score + s, e);
                }
                for (; s <= own; s++)
                    score[s] = score[s] == -INFINITY ? 0.0f : expf(score[s] - top);
                for (s = 0; s <= own; s++) total += score[s];
                float *out = heads + m * C + h * D;
                for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
                for (s = 0; s <= own; s++) {
                    const float weight = score[s] / total, *v = v_cache + s * D;
                    if (weight != 0.0f)
                        for (int64_t d = 0; d < D; d++) out[d] += weight * v[d];
                }
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
