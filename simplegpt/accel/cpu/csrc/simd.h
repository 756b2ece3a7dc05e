/* Which code paths this build of the library has, chosen by the compiler flags that lib.py's
 * VARIANTS give each build (never by the CPU it is compiled on), and the vector helpers they share.
 *   SG_AVX512: AVX-512 F/BW/VL with VNNI (-mavx512f -mavx512bw -mavx512vl -mavx512vnni): the
 *              decoding products (gemv.c: vpdpbusd for int8), training attention's products
 *              (attention.c, head sizes 16-64) and the elementwise and row kernels (vf below:
 *              GELU, LayerNorm, AdamW, softmax) take 512-bit paths; the rest runs the AVX2 code.
 *   AVX2 and FMA (-mavx2 -mfma): the AVX2 code everywhere.
 *   SG_PORTABLE: neither (another CPU, e.g. aarch64): the same code over simd_portable.h, plain C
 *              that the compiler vectorises for the target (NEON on aarch64). */
#ifndef SIMPLEGPT_SIMD_H
#define SIMPLEGPT_SIMD_H

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX2__) && defined(__FMA__)
#define SG_AVX512 1
#define SG_VARIANT "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define SG_VARIANT "avx2"
#else
#define SG_PORTABLE 1
#define SG_VARIANT "portable"
#endif

/* e^x for a vector type V, written once for every width: x = n ln2 + r, |r| <= ln2 / 2, e^r by a
 * degree-6 polynomial (relative error ~2e-7), x clamped to [-87, 88]. round(v): v rounded to the
 * nearest integers (as floats); pow2(n): 2^n for those integers. */
#define SG_DEFINE_EXP(name, V, set1, min, max, fmadd, fnmadd, mul, add, round, pow2)                           \
    static inline V name(V x) {                                                                                 \
        x = min(max(x, set1(-87.0f)), set1(88.0f));                                                             \
        V n = round(mul(x, set1(1.44269504089f)));                                                              \
        V r = fnmadd(n, set1(0.693359375f), x);                                                                 \
        r = fnmadd(n, set1(-2.12194440e-4f), r);                                                                \
        V p = set1(1.9875691500e-4f);                                                                           \
        p = fmadd(p, r, set1(1.3981999507e-3f));                                                                \
        p = fmadd(p, r, set1(8.3334519073e-3f));                                                                \
        p = fmadd(p, r, set1(4.1665795894e-2f));                                                                \
        p = fmadd(p, r, set1(1.6666665459e-1f));                                                                \
        p = fmadd(p, r, set1(5.0000001201e-1f));                                                                \
        p = fmadd(p, mul(r, r), add(r, set1(1.0f)));                                                            \
        return mul(p, pow2(n));                                                                                 \
    }

#ifdef SG_PORTABLE
#include "simd_portable.h"
#else
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __m256 round8(__m256 x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline __m256 pow2_8(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
SG_DEFINE_EXP(exp8, __m256, _mm256_set1_ps, _mm256_min_ps, _mm256_max_ps, _mm256_fmadd_ps, _mm256_fnmadd_ps,
              _mm256_mul_ps, _mm256_add_ps, round8, pow2_8)
#endif

/* The vf operations of the build's vector width W (256 or 512): the same intrinsics, named _mmW_*. */
#define SG_DEFINE_VF_OPS(W)                                                                          \
    static inline vf vf_load(const float *p) { return _mm##W##_loadu_ps(p); }                        \
    static inline void vf_store(float *p, vf v) { _mm##W##_storeu_ps(p, v); }                        \
    static inline vf vf_set1(float a) { return _mm##W##_set1_ps(a); }                                \
    static inline vf vf_add(vf a, vf b) { return _mm##W##_add_ps(a, b); }                            \
    static inline vf vf_sub(vf a, vf b) { return _mm##W##_sub_ps(a, b); }                            \
    static inline vf vf_mul(vf a, vf b) { return _mm##W##_mul_ps(a, b); }                            \
    static inline vf vf_div(vf a, vf b) { return _mm##W##_div_ps(a, b); }                            \
    static inline vf vf_max(vf a, vf b) { return _mm##W##_max_ps(a, b); }                            \
    static inline vf vf_sqrt(vf a) { return _mm##W##_sqrt_ps(a); }                                   \
    static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm##W##_fmadd_ps(a, b, c); }

/* vf: the widest float vector of the build, VF floats, for the elementwise and row kernels (gelu.c,
 * layernorm.c, adamw.c, softmax_row): 16 in the avx512 build, 8 otherwise. The products with their
 * own tiling (gemv.c, attention.c) use their vectors directly. */
#ifdef SG_AVX512
typedef __m512 vf;
#define VF 16
SG_DEFINE_VF_OPS(512)
static inline float vf_sum(vf v) { return _mm512_reduce_add_ps(v); }
static inline float vf_hmax(vf v) { return _mm512_reduce_max_ps(v); }

static inline __m512 round16(__m512 x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline __m512 pow2_16(__m512 n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
SG_DEFINE_EXP(vf_exp, __m512, _mm512_set1_ps, _mm512_min_ps, _mm512_max_ps, _mm512_fmadd_ps, _mm512_fnmadd_ps,
              _mm512_mul_ps, _mm512_add_ps, round16, pow2_16)
#else
typedef __m256 vf;
#define VF 8
SG_DEFINE_VF_OPS(256)
static inline float vf_sum(vf v) { return hsum(v); }
static inline float vf_hmax(vf v) { return hmax(v); }
static inline vf vf_exp(vf x) { return exp8(x); }
#endif
static inline vf vf_zero(void) { return vf_set1(0.0f); }

/* the body of a spin-wait loop: tells the core (and a hyperthread sibling) that this thread waits */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
