/* The vector width of a build: 16 fp32 lanes where the compiler targets AVX-512, 8 with AVX2.
 *
 * The same source is compiled once per instruction set (lmlab/kernels/build.py picks the
 * library the CPU runs at load time); code written with `vf` gets the widest registers the CPU
 * has. Every dot product of a build sums in one fixed order (one accumulator over k in steps of
 * VW lanes, then `vf_sum`, then the scalar tail), so its numbers depend on the build, never on
 * how many rows share a call or which tile computes them. */
#ifndef LMLAB_VEC_H
#define LMLAB_VEC_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd.h"

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_set1(float x) { return _mm512_set1_ps(x); }
static inline void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline float vf_sum(vf v) {
    return horizontal_sum(_mm256_add_ps(_mm512_castps512_ps256(v),
                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
#else
#define VW 8
typedef __m256 vf;
static inline vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_set1(float x) { return _mm256_set1_ps(x); }
static inline void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline float vf_sum(vf v) { return horizontal_sum(v); }
#endif

/* sum_k a[k] b[k] in the build's one order. */
static inline float vf_dot(const float *a, const float *b, int64_t n) {
    vf acc = vf_zero();
    int64_t k = 0;
    for (; k + VW <= n; k += VW) acc = vf_fma(vf_load(a + k), vf_load(b + k), acc);
    float s = vf_sum(acc);
    for (; k < n; k++) s = fmaf(a[k], b[k], s);
    return s;
}

#endif
