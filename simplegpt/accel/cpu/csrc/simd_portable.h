/* The AVX2 intrinsics that the kernels' float code uses, written in GNU C vector extensions for
 * builds without AVX2 (simd.h's SG_PORTABLE): each is plain C over 8 lanes, which the compiler
 * turns into the target's own vector instructions (two NEON registers on aarch64). Only the float
 * operations are here; the few integer and shuffle paths (gemv.c's int8 dot, attention.c's 8x8
 * transpose) have their own plain C under SG_PORTABLE. Results match the AVX2 build's up to
 * rounding: the sums may be taken in another order. simd.h includes it after defining SG_DEFINE_EXP. */
#ifndef SIMPLEGPT_SIMD_PORTABLE_H
#define SIMPLEGPT_SIMD_PORTABLE_H
#include <math.h>
#include <string.h>

typedef float __m256 __attribute__((vector_size(32)));
typedef int sg_v8i __attribute__((vector_size(32)));

static inline __m256 _mm256_loadu_ps(const float *p) {
    __m256 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline __m256 _mm256_load_ps(const float *p) { return _mm256_loadu_ps(p); }
static inline void _mm256_storeu_ps(float *p, __m256 v) { memcpy(p, &v, sizeof v); }
static inline __m256 _mm256_set1_ps(float a) { return (__m256){a, a, a, a, a, a, a, a}; }
static inline __m256 _mm256_setzero_ps(void) { return _mm256_set1_ps(0.0f); }
static inline __m256 _mm256_add_ps(__m256 a, __m256 b) { return a + b; }
static inline __m256 _mm256_sub_ps(__m256 a, __m256 b) { return a - b; }
static inline __m256 _mm256_mul_ps(__m256 a, __m256 b) { return a * b; }
static inline __m256 _mm256_div_ps(__m256 a, __m256 b) { return a / b; }
static inline __m256 _mm256_fmadd_ps(__m256 a, __m256 b, __m256 c) { return a * b + c; }
static inline __m256 _mm256_fnmadd_ps(__m256 a, __m256 b, __m256 c) { return c - a * b; }

static inline __m256 _mm256_max_ps(__m256 a, __m256 b) {
    for (int i = 0; i < 8; i++) a[i] = a[i] > b[i] ? a[i] : b[i];
    return a;
}
static inline __m256 _mm256_min_ps(__m256 a, __m256 b) {
    for (int i = 0; i < 8; i++) a[i] = a[i] < b[i] ? a[i] : b[i];
    return a;
}
static inline __m256 _mm256_sqrt_ps(__m256 a) {
    for (int i = 0; i < 8; i++) a[i] = sqrtf(a[i]);
    return a;
}

static inline float hsum(__m256 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static inline float hmax(__m256 v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}

static inline __m256 round8(__m256 x) {
    for (int i = 0; i < 8; i++) x[i] = rintf(x[i]);
    return x;
}
static inline __m256 pow2_8(__m256 n) {
    sg_v8i e;
    for (int i = 0; i < 8; i++) e[i] = ((int)n[i] + 127) << 23;
    __m256 scale;
    memcpy(&scale, &e, sizeof scale);
    return scale;
}
/* e^x for 8 floats: simd.h's one definition */
SG_DEFINE_EXP(exp8, __m256, _mm256_set1_ps, _mm256_min_ps, _mm256_max_ps, _mm256_fmadd_ps, _mm256_fnmadd_ps,
              _mm256_mul_ps, _mm256_add_ps, round8, pow2_8)

#endif
