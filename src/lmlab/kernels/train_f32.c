/* A GPT training step, fp32 on CPU: forward with the summed causal-LM loss, then backward to
 * every parameter's gradient, in two calls.
 *
 * Why: a small model's eager-PyTorch step is ~1,000 tensor operations (the nanoGPT
 * Shakespeare recipe: 4 layers, width 128, batch 12 x 64), and with two threads each matrix
 * product reaches only ~75% of what one thread does twice over — the products are too small to
 * split well, and every operation pays dispatch, autograd and a thread wake-up. Here the batch
 * is cut into `shards` groups of whole sequences, one per OpenMP thread; each thread runs its
 * shard through the whole model with single-threaded BLAS products (MKL runs sequentially
 * inside a parallel region) and hand-written LayerNorm, attention, activation and loss, with
 * no synchronisation until the gradients of the shards are added up, in shard order — so a
 * step's numbers depend on the number of shards, never on thread timing.
 *
 * The arithmetic is models/gpt.py's (pre-LayerNorm blocks, causal multi-head attention, GELU /
 * tanh-GELU / ReLU MLP, final LayerNorm, LM head tied to the token embedding or not), checked
 * against autograd on the module path in tests/kernels/test_gpt_train_kernel.py.
 *
 * Matrix products are BLAS sgemm (column-major, Fortran convention), reached through a
 * pointer that lmlab/kernels/__init__.py takes from the BLAS torch is linked with.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gpt_layout.h"
#include "simd.h"

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);
static sgemm_fn sgemm;
/* MKL's per-thread thread count (NULL for another BLAS). Inside our parallel region MKL would
 * otherwise still split some products over its own threads — two teams on two cores, and its
 * packing kernels instead of the small-matrix ones: ~40% of the step. */
typedef int (*set_threads_fn)(int);
static set_threads_fn blas_threads_local;

void lmlab_set_blas(void *gemm_fn, void *threads_fn) {
    sgemm = (sgemm_fn)gemm_fn;
    blas_threads_local = (set_threads_fn)threads_fn;
}

static int blas_single_threaded(void) { return blas_threads_local ? blas_threads_local(1) : 0; }
static void blas_restore(int previous) { if (blas_threads_local) blas_threads_local(previous); }

/* Row-major products through column-major sgemm: row-major C (M x N) is column-major C^T, so
 * C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T. */
static void gemm(char ta, char tb, int M, int N, int K, const float *A, int lda, const float *B,
                 int ldb, float beta, float *C, int ldc) {
    const float one = 1.0f;
    sgemm(&tb, &ta, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}
/* C = A (M x K) . B^T, B (N x K): a Linear layer's forward. */
#define MM_NT(M, N, K, A, B, beta, C) gemm('N', 'T', M, N, K, A, K, B, K, beta, C, N)
/* C = A (M x K) . B (K x N): the input gradient of a Linear layer. */
#define MM_NN(M, N, K, A, B, beta, C) gemm('N', 'N', M, N, K, A, K, B, N, beta, C, N)
/* C = A^T . B, A (K x M), B (K x N): the weight gradient of a Linear layer. */
#define MM_TN(M, N, K, A, B, beta, C) gemm('T', 'N', M, N, K, A, M, B, N, beta, C, N)

/* The model tensors after the per-layer tables, in the parameter table and gradient offsets. */
enum { WTE, WPE, LNF_W, LNF_B, HEAD, GLOBALS };

typedef struct {
    int64_t n_layer, batch, T, C, n_head, H, V, positions;
    float eps;
    int act;
} Dims;

/* ---- workspace: what the forward pass keeps for the backward pass -------------------------
 * Per layer, for all N = batch x T rows: the residual stream entering the layer, LayerNorm
 * outputs and their (mean, 1/std) per row, q|k|v, attention probabilities (per sequence and
 * head, T x T), the attention output, the residual after attention, the MLP's pre- and
 * post-activation. Then the final residual, LayerNorm, its statistics, the logits (turned into
 * their gradient in place by the backward pass) and each row's log-sum-exp. */
typedef struct {
    float *res, *ln1, *st1, *qkv, *P, *att, *mid, *ln2, *st2, *pre, *post;
} LayerSaved;

static int64_t layer_floats(const Dims *d) {
    const int64_t N = d->batch * d->T;
    return N * d->C * 8 + N * 4 + 2 * N * d->H + d->batch * d->n_head * d->T * d->T;
}

int64_t lmlab_gpt_train_workspace(int64_t n_layer, int64_t batch, int64_t T, int64_t C,
                                  int64_t n_head, int64_t H, int64_t V) {
    Dims d = {n_layer, batch, T, C, n_head, H, V, 0, 0.0f, 0};
    const int64_t N = batch * T;
    return n_layer * layer_floats(&d) + N * C * 2 + N * 2 + N * V + N;
}

static LayerSaved layer_saved(float *ws, const Dims *d, int64_t l) {
    const int64_t N = d->batch * d->T, C = d->C;
    float *p = ws + l * layer_floats(d);
    LayerSaved s;
    s.res = p; p += N * C;
    s.ln1 = p; p += N * C;
    s.st1 = p; p += 2 * N;
    s.qkv = p; p += 3 * N * C;
    s.P = p; p += d->batch * d->n_head * d->T * d->T;
    s.att = p; p += N * C;
    s.mid = p; p += N * C;
    s.ln2 = p; p += N * C;
    s.st2 = p; p += 2 * N;
    s.pre = p; p += N * d->H;
    s.post = p;
    return s;
}

typedef struct {
    float *res, *lnf, *stf, *logits, *lse;
} FinalSaved;

static FinalSaved final_saved(float *ws, const Dims *d) {
    const int64_t N = d->batch * d->T;
    float *p = ws + d->n_layer * layer_floats(d);
    FinalSaved s;
    s.res = p; p += N * d->C;
    s.lnf = p; p += N * d->C;
    s.stf = p; p += 2 * N;
    s.logits = p; p += N * d->V;
    s.lse = p;
    return s;
}

/* ---- small vector pieces ------------------------------------------------------------------ */
static inline float sum_of(const float *x, int64_t n) {
    __m256 a = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(x + i));
    float s = horizontal_sum(a);
    for (; i < n; i++) s += x[i];
    return s;
}

static inline float dot_of(const float *x, const float *y, int64_t n) {
    __m256 a = _mm256_setzero_ps(), b = a;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), b);
    }
    for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a);
    float s = horizontal_sum(_mm256_add_ps(a, b));
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

/* y += a * x */
static inline void axpy(float a, const float *x, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

static inline void add_rows_bias(float *y, const float *b, int64_t rows, int64_t n) {
    if (!b) return;
    for (int64_t r = 0; r < rows; r++) axpy(1.0f, b, y + r * n, n);
}

/* out[j] = sum over rows of x[r, j] (a bias gradient) */
static void column_sums(const float *x, int64_t rows, int64_t n, float *out) {
    memset(out, 0, sizeof(float) * n);
    for (int64_t r = 0; r < rows; r++) axpy(1.0f, x + r * n, out, n);
}

/* erf for 8 lanes: a rational approximation on [-4, 4] (beyond, erf is ±1 in fp32), error
 * ~1e-7 — the approximation XLA and Eigen use for fp32 erf. */
static inline __m256 erf8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
    const __m256 x2 = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-2.72614225801306e-10f);
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.77068142495902e-08f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.10102402082508e-06f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-5.69250639462346e-05f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-7.34990630326855e-04f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.95459980854025e-03f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.60960333262415e-02f));
    __m256 q = _mm256_set1_ps(-1.45660718464996e-05f);
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-2.13374055278905e-04f));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.68282697438203e-03f));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-7.37332916720468e-03f));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.42647390514189e-02f));
    return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}

/* The activation and its derivative, 8 lanes: f(v), and f'(v) when `grad` is set. */
static inline __m256 act8(__m256 v, int act, int grad) {
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
    if (act == ACT_RELU) {
        const __m256 pos = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ);
        return _mm256_and_ps(pos, grad ? one : v);
    }
    if (act == ACT_GELU) {  /* v·Φ(v);  Φ(v) + v·φ(v) */
        const __m256 cdf = _mm256_mul_ps(half, _mm256_add_ps(one,
            erf8(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)))));
        if (!grad) return _mm256_mul_ps(v, cdf);
        const __m256 pdf = _mm256_mul_ps(_mm256_set1_ps(0.39894228040143268f),
            exp8(_mm256_mul_ps(_mm256_set1_ps(-0.5f), _mm256_mul_ps(v, v))));
        return _mm256_fmadd_ps(v, pdf, cdf);
    }
    /* tanh-GELU = v·σ(2u), u = √(2/π)(v + 0.044715 v³);  σ + v·σ(1-σ)·2u' */
    if (!grad) return gelu_tanh8(v);
    const __m256 v2 = _mm256_mul_ps(v, v);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f),
        _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), v2, v));
    const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one,
        exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u))));
    const __m256 du = _mm256_mul_ps(_mm256_set1_ps(2.0f * 0.79788456080286536f),
        _mm256_fmadd_ps(_mm256_set1_ps(3.0f * 0.044715f), v2, one));
    return _mm256_fmadd_ps(_mm256_mul_ps(v, _mm256_mul_ps(s, _mm256_sub_ps(one, s))), du, s);
}

/* out = f(x), or out = dy * f'(x) when dy is given; n values. The tail goes through a padded
 * 8-lane block, so every element is computed by the same formula. */
static void activation(const float *x, const float *dy, float *out, int64_t n, int act) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = act8(_mm256_loadu_ps(x + i), act, dy != NULL);
        _mm256_storeu_ps(out + i, dy ? _mm256_mul_ps(v, _mm256_loadu_ps(dy + i)) : v);
    }
    if (i < n) {
        float lanes[8] = {0}, grads[8] = {0};
        memcpy(lanes, x + i, sizeof(float) * (n - i));
        if (dy) memcpy(grads, dy + i, sizeof(float) * (n - i));
        const __m256 v = act8(_mm256_loadu_ps(lanes), act, dy != NULL);
        _mm256_storeu_ps(lanes, dy ? _mm256_mul_ps(v, _mm256_loadu_ps(grads)) : v);
        memcpy(out + i, lanes, sizeof(float) * (n - i));
    }
}

/* e^(x[i] - shift) for n values, in place; returns their sum. */
static float exp_shifted(float *x, int64_t n, float shift) {
    const __m256 vs = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float s = horizontal_sum(acc);
    if (i < n) {
        float lanes[8];
        for (int k = 0; k < 8; k++) lanes[k] = i + k < n ? x[i + k] - shift : -100.0f;
        _mm256_storeu_ps(lanes, exp8(_mm256_loadu_ps(lanes)));
        for (int64_t k = 0; i + k < n; k++) { x[i + k] = lanes[k]; s += lanes[k]; }
    }
    return s;
}

/* Vectorised by hand: the compiler keeps a float max reduction scalar (one element per
 * loop-carried step; it was a sixth of the forward pass's own time). Max is exact in any order. */
static float max_of(const float *x, int64_t n) {
    float m = x[0];
    int64_t i = 1;
    if (n >= 16) {
        __m256 acc = _mm256_max_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8));
        for (i = 16; i + 8 <= n; i += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + i));
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* ---- LayerNorm ------------------------------------------------------------------------------ */
static void layer_norm_forward(const float *restrict x, int64_t rows, int64_t n,
                               const float *restrict w, const float *restrict b, float eps,
                               float *restrict out, float *restrict stats) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        const float mean = sum_of(xr, n) / n;
        for (int64_t i = 0; i < n; i++) o[i] = xr[i] - mean;
        const float rstd = 1.0f / sqrtf(dot_of(o, o, n) / n + eps);
        /* separate loops, so that each one vectorises (a LayerNorm always has its weight) */
        if (b) for (int64_t i = 0; i < n; i++) o[i] = o[i] * rstd * w[i] + b[i];
        else for (int64_t i = 0; i < n; i++) o[i] = o[i] * rstd * w[i];
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
}

/* dx += LayerNorm'(dy); dw, db = this shard's parameter gradients (db NULL without a bias).
 * xhat = (x - mean)·rstd;  dx = rstd·(g - mean(g) - xhat·mean(g·xhat)),  g = dy·w. */
static void layer_norm_backward(const float *restrict x, const float *restrict stats,
                                const float *restrict w, const float *restrict dy, int64_t rows,
                                int64_t n, float *restrict dx, float *restrict dw,
                                float *restrict db, float *restrict scratch /* 2n */) {
    float *restrict xhat = scratch, *restrict g = scratch + n;
    memset(dw, 0, sizeof(float) * n);
    if (db) memset(db, 0, sizeof(float) * n);
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n, *dyr = dy + r * n;
        const float mean = stats[2 * r], rstd = stats[2 * r + 1];
        for (int64_t i = 0; i < n; i++) {
            xhat[i] = (xr[i] - mean) * rstd;
            g[i] = dyr[i] * w[i];
        }
        for (int64_t i = 0; i < n; i++) dw[i] += dyr[i] * xhat[i];
        if (db) axpy(1.0f, dyr, db, n);
        const float mean_g = sum_of(g, n) / n, mean_gx = dot_of(g, xhat, n) / n;
        float *dxr = dx + r * n;
        for (int64_t i = 0; i < n; i++)
            dxr[i] += rstd * (g[i] - mean_g - xhat[i] * mean_gx);
    }
}

/* ---- causal attention over one sequence, every head ---------------------------------------
 * qkv: T rows of [q | k | v] (3C wide), att: T rows (C wide), P: n_head x T x T probabilities
 * (zero above the diagonal). The four products per head are small BLAS calls over the whole
 * T x T square — the zero half costs less than hand-written loops over the triangle did. */
static void attention_forward(const float *qkv, float *att, float *P, int64_t T, int64_t C,
                              int64_t n_head) {
    const int64_t hs = C / n_head;
    const float scale = 1.0f / sqrtf((float)hs);
    for (int64_t h = 0; h < n_head; h++) {
        float *p = P + h * T * T;
        gemm('N', 'T', T, T, hs, qkv + h * hs, 3 * C, qkv + C + h * hs, 3 * C, 0.0f, p, T);
        for (int64_t i = 0; i < T; i++) {
            float *row = p + i * T;
            for (int64_t j = 0; j <= i; j++) row[j] *= scale;
            const float total = exp_shifted(row, i + 1, max_of(row, i + 1));
            const float inv = 1.0f / total;
            for (int64_t j = 0; j <= i; j++) row[j] *= inv;
            memset(row + i + 1, 0, sizeof(float) * (T - i - 1));
        }
        gemm('N', 'N', T, hs, T, p, T, qkv + 2 * C + h * hs, 3 * C, 0.0f, att + h * hs, C);
    }
}

/* dqkv (T rows, 3C wide; overwritten) from datt, given the forward's qkv and P.
 * dP = dY V^T;  dS_ij = s P_ij (dP_ij − Σ_k P_ik dP_ik);  dQ = dS K;  dK = dS^T Q;  dV = P^T dY. */
static void attention_backward(const float *qkv, const float *P, const float *datt,
                               float *dqkv, int64_t T, int64_t C, int64_t n_head,
                               float *ds /* T x T */) {
    const int64_t hs = C / n_head;
    const float scale = 1.0f / sqrtf((float)hs);
    for (int64_t h = 0; h < n_head; h++) {
        const float *p = P + h * T * T, *dy = datt + h * hs;
        gemm('N', 'T', T, T, hs, dy, C, qkv + 2 * C + h * hs, 3 * C, 0.0f, ds, T);
        for (int64_t i = 0; i < T; i++) {
            float *row = ds + i * T;
            const float *prow = p + i * T;
            const float weighted = dot_of(prow, row, i + 1);
            for (int64_t j = 0; j <= i; j++) row[j] = scale * prow[j] * (row[j] - weighted);
            memset(row + i + 1, 0, sizeof(float) * (T - i - 1));
        }
        gemm('N', 'N', T, hs, T, ds, T, qkv + C + h * hs, 3 * C, 0.0f, dqkv + h * hs, 3 * C);
        gemm('T', 'N', T, hs, T, ds, T, qkv + h * hs, 3 * C, 0.0f, dqkv + C + h * hs, 3 * C);
        gemm('T', 'N', T, hs, T, p, T, dy, C, 0.0f, dqkv + 2 * C + h * hs, 3 * C);
    }
}

/* ---- forward ------------------------------------------------------------------------------- */
static const float *param(const int64_t *table, int64_t i) { return (const float *)table[i]; }
#define LP(l, k) param(params, (l) * PER_LAYER + (k))
#define GP(k) param(params, d->n_layer * PER_LAYER + (k))

/* One shard: sequences [b0, b1). Returns the summed loss of its rows. */
static double forward_shard(const int64_t *params, const Dims *d, const int64_t *ids,
                            const int64_t *labels, float *ws, int64_t b0, int64_t b1) {
    const int64_t T = d->T, C = d->C, H = d->H, V = d->V;
    const int64_t r0 = b0 * T, n = (b1 - b0) * T;
    LayerSaved first = layer_saved(ws, d, 0);
    const float *wte = GP(WTE), *wpe = GP(WPE);
    for (int64_t r = r0; r < r0 + n; r++) {
        float *x = first.res + r * C;
        const float *te = wte + ids[r] * C, *pe = wpe + (r % T) * C;
        for (int64_t i = 0; i < C; i++) x[i] = te[i] + pe[i];
    }
    for (int64_t l = 0; l < d->n_layer; l++) {
        LayerSaved s = layer_saved(ws, d, l);
        float *next = l + 1 < d->n_layer ? layer_saved(ws, d, l + 1).res : final_saved(ws, d).res;
        const int64_t o = r0 * C;
        layer_norm_forward(s.res + o, n, C, LP(l, LN1_W), LP(l, LN1_B), d->eps, s.ln1 + o, s.st1 + 2 * r0);
        MM_NT(n, 3 * C, C, s.ln1 + o, LP(l, ATTN_W), 0.0f, s.qkv + 3 * o);
        add_rows_bias(s.qkv + 3 * o, LP(l, ATTN_B), n, 3 * C);
        for (int64_t b = b0; b < b1; b++)
            attention_forward(s.qkv + b * T * 3 * C, s.att + b * T * C,
                              s.P + b * d->n_head * T * T, T, C, d->n_head);
        memcpy(s.mid + o, s.res + o, sizeof(float) * n * C);
        MM_NT(n, C, C, s.att + o, LP(l, PROJ_W), 1.0f, s.mid + o);
        add_rows_bias(s.mid + o, LP(l, PROJ_B), n, C);
        layer_norm_forward(s.mid + o, n, C, LP(l, LN2_W), LP(l, LN2_B), d->eps, s.ln2 + o, s.st2 + 2 * r0);
        MM_NT(n, H, C, s.ln2 + o, LP(l, FC_W), 0.0f, s.pre + r0 * H);
        add_rows_bias(s.pre + r0 * H, LP(l, FC_B), n, H);
        activation(s.pre + r0 * H, NULL, s.post + r0 * H, n * H, d->act);
        memcpy(next + o, s.mid + o, sizeof(float) * n * C);
        MM_NT(n, C, H, s.post + r0 * H, LP(l, FC2_W), 1.0f, next + o);
        add_rows_bias(next + o, LP(l, FC2_B), n, C);
    }
    FinalSaved f = final_saved(ws, d);
    layer_norm_forward(f.res + r0 * C, n, C, GP(LNF_W), GP(LNF_B), d->eps, f.lnf + r0 * C, f.stf + 2 * r0);
    MM_NT(n, V, C, f.lnf + r0 * C, GP(HEAD), 0.0f, f.logits + r0 * V);
    double loss = 0.0;
    for (int64_t r = r0; r < r0 + n; r++) {
        const float *z = f.logits + r * V;
        const float top = max_of(z, V);
        /* log-sum-exp without overwriting the logits: exponentiate a copy in chunks */
        float chunk[256], total = 0.0f;
        for (int64_t i = 0; i < V; i += 256) {
            const int64_t m = V - i < 256 ? V - i : 256;
            memcpy(chunk, z + i, sizeof(float) * m);
            total += exp_shifted(chunk, m, top);
        }
        const float lse = top + logf(total);
        f.lse[r] = lse;
        loss += (double)(lse - z[labels[r]]);
    }
    return loss;
}

static void shard_bounds(int64_t batch, int shards, int s, int64_t *b0, int64_t *b1) {
    *b0 = batch * s / shards;
    *b1 = batch * (s + 1) / shards;
}

/* losses: one sum per shard (the caller adds them in order). */
void lmlab_gpt_train_forward(const int64_t *params, int64_t n_layer, int64_t batch, int64_t T,
                             int64_t C, int64_t n_head, int64_t H, int64_t V, float eps, int act,
                             const int64_t *ids, const int64_t *labels, float *ws,
                             double *losses, int shards, int threads) {
    const Dims dims = {n_layer, batch, T, C, n_head, H, V, 0, eps, act};
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int s = 0; s < shards; s++) {
        int64_t b0, b1;
        shard_bounds(batch, shards, s, &b0, &b1);
        const int previous = blas_single_threaded();
        losses[s] = forward_shard(params, &dims, ids, labels, ws, b0, b1);
        blas_restore(previous);
    }
}

/* ---- backward ------------------------------------------------------------------------------ */
/* The gradient of parameter i of shard s: its own slice of `grads` (shard 0) or of `scratch`. */
#define GRAD(i) (offsets[i] < 0 ? NULL : base + offsets[i])
#define LG(l, k) GRAD((l) * PER_LAYER + (k))
#define GG(k) GRAD(d->n_layer * PER_LAYER + (k))

static int backward_shard(const int64_t *params, const Dims *d, const int64_t *ids,
                          const int64_t *labels, float *ws, float dloss,
                          const int64_t *offsets, float *base, int64_t b0, int64_t b1) {
    const int64_t T = d->T, C = d->C, H = d->H, V = d->V;
    const int64_t r0 = b0 * T, n = (b1 - b0) * T;
    /* dx: the gradient entering a LayerNorm or q|k|v (up to 3C wide); dh: the MLP's hidden
     * gradient, then the attention output's and ln_1's (up to max(H, C) wide). */
    const int64_t wide = H > C ? H : C;
    float *dres = malloc(sizeof(float) * n * C), *dx = malloc(sizeof(float) * n * 3 * C),
          *dh = malloc(sizeof(float) * n * wide), *small = malloc(sizeof(float) * (2 * C + T * T));
    if (!dres || !dx || !dh || !small) {
        free(dres); free(dx); free(dh); free(small);
        return -1;
    }
    FinalSaved f = final_saved(ws, d);
    /* dlogits = (softmax − one-hot)·dloss, in place of the logits */
    for (int64_t r = r0; r < r0 + n; r++) {
        float *z = f.logits + r * V;
        exp_shifted(z, V, f.lse[r]);
        z[labels[r]] -= 1.0f;
        for (int64_t i = 0; i < V; i++) z[i] *= dloss;
    }
    const int tied = GP(HEAD) == GP(WTE);
    float *dwte = GG(WTE);
    float *dhead = tied ? dwte : GG(HEAD);
    MM_TN(V, C, n, f.logits + r0 * V, f.lnf + r0 * C, 0.0f, dhead);
    MM_NN(n, C, V, f.logits + r0 * V, GP(HEAD), 0.0f, dx);
    memset(dres, 0, sizeof(float) * n * C);
    layer_norm_backward(f.res + r0 * C, f.stf + 2 * r0, GP(LNF_W), dx, n, C, dres, GG(LNF_W),
                        GG(LNF_B), small);
    for (int64_t l = d->n_layer - 1; l >= 0; l--) {
        LayerSaved s = layer_saved(ws, d, l);
        const int64_t o = r0 * C;
        /* next = mid + post·W2^T + b2 */
        MM_NN(n, H, C, dres, LP(l, FC2_W), 0.0f, dh);
        MM_TN(C, H, n, dres, s.post + r0 * H, 0.0f, LG(l, FC2_W));
        if (LG(l, FC2_B)) column_sums(dres, n, C, LG(l, FC2_B));
        activation(s.pre + r0 * H, dh, dh, n * H, d->act);
        /* pre = ln2·W1^T + b1 */
        MM_NN(n, C, H, dh, LP(l, FC_W), 0.0f, dx);
        MM_TN(H, C, n, dh, s.ln2 + o, 0.0f, LG(l, FC_W));
        if (LG(l, FC_B)) column_sums(dh, n, H, LG(l, FC_B));
        layer_norm_backward(s.mid + o, s.st2 + 2 * r0, LP(l, LN2_W), dx, n, C, dres, LG(l, LN2_W),
                            LG(l, LN2_B), small);
        /* mid = res + att·Wo^T + bo */
        MM_NN(n, C, C, dres, LP(l, PROJ_W), 0.0f, dh);  /* datt, n x C */
        MM_TN(C, C, n, dres, s.att + o, 0.0f, LG(l, PROJ_W));
        if (LG(l, PROJ_B)) column_sums(dres, n, C, LG(l, PROJ_B));
        for (int64_t b = b0; b < b1; b++)
            attention_backward(s.qkv + b * T * 3 * C, s.P + b * d->n_head * T * T,
                               dh + (b - b0) * T * C, dx + (b - b0) * T * 3 * C, T, C,
                               d->n_head, small + 2 * C);
        /* qkv = ln1·Wqkv^T + bqkv */
        MM_TN(3 * C, C, n, dx, s.ln1 + o, 0.0f, LG(l, ATTN_W));
        if (LG(l, ATTN_B)) column_sums(dx, n, 3 * C, LG(l, ATTN_B));
        MM_NN(n, C, 3 * C, dx, LP(l, ATTN_W), 0.0f, dh);  /* dln1, n x C */
        layer_norm_backward(s.res + o, s.st1 + 2 * r0, LP(l, LN1_W), dh, n, C, dres, LG(l, LN1_W),
                            LG(l, LN1_B), small);
    }
    /* embeddings: x = wte[id] + wpe[t] */
    if (!tied) memset(dwte, 0, sizeof(float) * V * C);
    float *dwpe = GG(WPE);
    memset(dwpe, 0, sizeof(float) * d->positions * C);
    for (int64_t r = 0; r < n; r++) {
        axpy(1.0f, dres + r * C, dwte + ids[r0 + r] * C, C);
        axpy(1.0f, dres + r * C, dwpe + ((r0 + r) % T) * C, C);
    }
    free(dres); free(dx); free(dh); free(small);
    return 0;
}

/* Gradients of every parameter for the loss scaled by `dloss`: the forward's workspace in,
 * `grads` (n_grad floats; parameter i at offsets[i], -1 when absent) out. Shard s > 0 writes
 * its gradients to scratch + (s − 1)·n_grad; they are then added to shard 0's in shard order.
 * Returns 0, or -1 when scratch memory could not be allocated (nothing is then valid). */
int lmlab_gpt_train_backward(const int64_t *params, int64_t n_layer, int64_t batch, int64_t T,
                             int64_t C, int64_t n_head, int64_t H, int64_t V, int64_t positions,
                             float eps, int act, const int64_t *ids, const int64_t *labels,
                             float *ws, float dloss, const int64_t *offsets, float *grads,
                             float *scratch, int64_t n_grad, int shards, int threads) {
    const Dims dims = {n_layer, batch, T, C, n_head, H, V, positions, eps, act};
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static, 1) reduction(|:failed)
        for (int s = 0; s < shards; s++) {
            int64_t b0, b1;
            shard_bounds(batch, shards, s, &b0, &b1);
            float *base = s == 0 ? grads : scratch + (int64_t)(s - 1) * n_grad;
            const int previous = blas_single_threaded();
            failed |= backward_shard(params, &dims, ids, labels, ws, dloss, offsets, base, b0, b1) != 0;
            blas_restore(previous);
        }
        if (!failed && shards > 1) {
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < n_grad; i += 1024) {
                const int64_t m = n_grad - i < 1024 ? n_grad - i : 1024;
                for (int s = 1; s < shards; s++)
                    axpy(1.0f, scratch + (int64_t)(s - 1) * n_grad + i, grads + i, m);
            }
        }
    }
    return failed ? -1 : 0;
}
