/* y = x @ w.T + bias for a few rows of x (decoding: 1 token, a few beams), fp32, AVX2 + FMA.
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
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH_AHEAD 256 /* floats (1 KiB) ahead of the loads; measured 256/512/1024 */

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

/* x: (rows, in), w: (out, in), bias: (out) or NULL, y: (rows, out); all contiguous. */
void lmlab_linear_f32(const float *x, int64_t rows, int64_t in, const float *w, int64_t out,
                      const float *bias, float *y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < out; n++) {
        const float *w_row = w + n * in;
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < rows; m++)
            y[m * out + n] = dot(w_row, x + m * in, in) + b;
    }
}
