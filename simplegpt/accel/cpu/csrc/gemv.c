/* Matrix-vector products for decoding: y = x W^T + b for up to MAX_ROWS rows of x, fp32 or int8 W.
 *
 * W is row-major (N, K): nn.Linear's own layout, so the weights are used as they are. The rows of
 * W are split between the pool's threads (pool.c). At batch 1 this is memory-bound: the point is
 * to stream W from every core at once, which PyTorch's BLAS matrix-vector path does not do at
 * these sizes (docs/benchmarks.md). The AVX-512 build has its own loops (SG_AVX512, simd.h): 16
 * floats a step, and VNNI for int8; the others share the AVX2 code (the portable build through
 * simd_portable.h, with a plain C int8 dot product).
 */
#include "kernels.h"
#include <math.h>

#ifdef SG_AVX512
/* The AVX-512 build's fp32 products: the AVX2 loops below at 16 floats a step, a masked load for the
 * last K % 16 (no scalar tail). */

/* the lanes of a 16-float step at k that lie below K */
static inline __mmask16 lanes16(int k, int K) {
    return K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
}

/* Rows n0..n1 of y, four at a time sharing each load of x, the four a quarter of the range apart
 * (see the AVX2 gemv_rows below) */
static void gemv_rows(const float *W, const float *x, const float *b, float *y, int K, int n0, int n1) {
    int q = (n1 - n0) / 4;
    size_t step = (size_t)q * K;
    for (int n = n0; n < n0 + q; n++) {
        const float *w0 = W + (size_t)n * K, *w1 = w0 + step, *w2 = w1 + step, *w3 = w2 + step;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int k = 0;
        for (; k + 16 <= K; k += 16) {  /* unmasked: masked loads in the main loop cost ~2x at 4-16 rows */
            __m512 xv = _mm512_loadu_ps(x + k);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), xv, a3);
        }
        if (k < K) {
            __mmask16 m = lanes16(k, K);
            __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w0 + k), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w1 + k), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w2 + k), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w3 + k), xv, a3);
        }
        y[n] = _mm512_reduce_add_ps(a0) + (b ? b[n] : 0.0f);
        y[n + q] = _mm512_reduce_add_ps(a1) + (b ? b[n + q] : 0.0f);
        y[n + 2 * q] = _mm512_reduce_add_ps(a2) + (b ? b[n + 2 * q] : 0.0f);
        y[n + 3 * q] = _mm512_reduce_add_ps(a3) + (b ? b[n + 3 * q] : 0.0f);
    }
    for (int n = n0 + 4 * q; n < n1; n++) {
        const float *w = W + (size_t)n * K;
        __m512 a = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            __mmask16 m = lanes16(k, K);
            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), a);
        }
        y[n] = _mm512_reduce_add_ps(a) + (b ? b[n] : 0.0f);
    }
}

/* Four dot products of each of four weight rows (w[0..3]) with each of four rows of X (x[0..3]),
 * the register tile of gemm_rows: 16 accumulators, and per 16 floats of K 8 loads for 16 FMAs (the
 * AVX2 build's 4 x 2 tile needs 5 for 8). Each accumulator sums its lanes in the order gemv_rows does
 * and is reduced the same way, so a row's outputs do not depend on how many rows share the step. */
static inline void tile4x4(const float *const w[4], const float *const x[4], int K, __m512 a[16]) {
    for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 v0 = _mm512_loadu_ps(w[0] + k), v1 = _mm512_loadu_ps(w[1] + k), v2 = _mm512_loadu_ps(w[2] + k),
               v3 = _mm512_loadu_ps(w[3] + k);
        for (int r = 0; r < 4; r++) {
            __m512 u = _mm512_loadu_ps(x[r] + k);
            a[4 * r + 0] = _mm512_fmadd_ps(v0, u, a[4 * r + 0]);
            a[4 * r + 1] = _mm512_fmadd_ps(v1, u, a[4 * r + 1]);
            a[4 * r + 2] = _mm512_fmadd_ps(v2, u, a[4 * r + 2]);
            a[4 * r + 3] = _mm512_fmadd_ps(v3, u, a[4 * r + 3]);
        }
    }
    if (k < K) {  /* the last K % 16: masked, as gemv_rows's last step */
        __mmask16 mk = lanes16(k, K);
        __m512 v0 = _mm512_maskz_loadu_ps(mk, w[0] + k), v1 = _mm512_maskz_loadu_ps(mk, w[1] + k),
               v2 = _mm512_maskz_loadu_ps(mk, w[2] + k), v3 = _mm512_maskz_loadu_ps(mk, w[3] + k);
        for (int r = 0; r < 4; r++) {
            __m512 u = _mm512_maskz_loadu_ps(mk, x[r] + k);
            a[4 * r + 0] = _mm512_fmadd_ps(v0, u, a[4 * r + 0]);
            a[4 * r + 1] = _mm512_fmadd_ps(v1, u, a[4 * r + 1]);
            a[4 * r + 2] = _mm512_fmadd_ps(v2, u, a[4 * r + 2]);
            a[4 * r + 3] = _mm512_fmadd_ps(v3, u, a[4 * r + 3]);
        }
    }
}

/* Rows n0..n1 of Y (M, N) = X (M, K) W^T + b for a few rows of X (a batch of decode steps, a short
 * prefill): four weight rows a quarter of the range apart (as gemv_rows) times the rows of X four
 * at a time (tile4x4; a last group of fewer repeats its last row and stores only its own). A group
 * of weight rows is read from memory once and from the cache for every other group of X rows. */
static void gemm_rows(const float *W, const float *X, const float *b, float *Y, int M, int N, int K, int n0,
                      int n1) {
    int q = (n1 - n0) / 4;
    size_t step = (size_t)q * K;
    __m512 a[16];
    for (int n = n0; n < n0 + q; n++) {
        const float *w[4] = {W + (size_t)n * K, W + (size_t)n * K + step, W + (size_t)n * K + 2 * step,
                             W + (size_t)n * K + 3 * step};
        for (int m = 0; m < M; m += 4) {
            int rows = M - m < 4 ? M - m : 4;
            const float *x[4];
            for (int r = 0; r < 4; r++) x[r] = X + (size_t)(m + (r < rows ? r : rows - 1)) * K;
            tile4x4(w, x, K, a);
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < 4; j++) {
                    int col = n + j * q;
                    Y[(size_t)(m + r) * N + col] = _mm512_reduce_add_ps(a[4 * r + j]) + (b ? b[col] : 0.0f);
                }
        }
    }
    for (int n = n0 + 4 * q; n < n1; n++) {
        const float *w = W + (size_t)n * K;
        for (int m = 0; m < M; m++) {
            const float *x = X + (size_t)m * K;
            __m512 s = _mm512_setzero_ps();
            for (int k = 0; k < K; k += 16) {
                __mmask16 mk = lanes16(k, K);
                s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w + k), _mm512_maskz_loadu_ps(mk, x + k), s);
            }
            Y[(size_t)m * N + n] = _mm512_reduce_add_ps(s) + (b ? b[n] : 0.0f);
        }
    }
}

#else
/* Rows n0..n1 of y, four at a time sharing each load of x. The four rows are a quarter of the
 * range apart, not neighbours: four distant sequential streams keep more memory requests in
 * flight than one, and a core streams ~10-25% more bytes a second that way (docs/benchmarks.md). */
static void gemv_rows(const float *W, const float *x, const float *b, float *y, int K, int n0, int n1) {
    int K8 = K & ~7, q = (n1 - n0) / 4;
    size_t step = (size_t)q * K;
    for (int n = n0; n < n0 + q; n++) {
        const float *w0 = W + (size_t)n * K, *w1 = w0 + step, *w2 = w1 + step, *w3 = w2 + step;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int k = 0; k < K8; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
        }
        float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (int k = K8; k < K; k++) {
            s0 += w0[k] * x[k];
            s1 += w1[k] * x[k];
            s2 += w2[k] * x[k];
            s3 += w3[k] * x[k];
        }
        y[n] = s0 + (b ? b[n] : 0.0f);
        y[n + q] = s1 + (b ? b[n + q] : 0.0f);
        y[n + 2 * q] = s2 + (b ? b[n + 2 * q] : 0.0f);
        y[n + 3 * q] = s3 + (b ? b[n + 3 * q] : 0.0f);
    }
    for (int n = n0 + 4 * q; n < n1; n++) {
        const float *w = W + (size_t)n * K;
        __m256 a = _mm256_setzero_ps();
        for (int k = 0; k < K8; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a);
        float s = hsum(a);
        for (int k = K8; k < K; k++) s += w[k] * x[k];
        y[n] = s + (b ? b[n] : 0.0f);
    }
}

/* Rows n0..n1 of Y (M, N) = X (M, K) W^T + b for a few rows of X (a batch of decode steps, a short
 * prefill): four weight rows a quarter of the range apart, as in gemv_rows, each group times the
 * rows of X two at a time (eight accumulators). A group is read from memory once and from the
 * cache for every other pair of X rows. */
static void gemm_rows(const float *W, const float *X, const float *b, float *Y, int M, int N, int K, int n0,
                      int n1) {
    int K8 = K & ~7, q = (n1 - n0) / 4;
    size_t step = (size_t)q * K;
    for (int n = n0; n < n0 + q; n++) {
        const float *w0 = W + (size_t)n * K, *w1 = w0 + step, *w2 = w1 + step, *w3 = w2 + step;
        for (int m = 0; m < M; m += 2) {
            int pair = m + 1 < M;
            const float *x0 = X + (size_t)m * K, *x1 = pair ? x0 + K : x0;
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int k = 0; k < K8; k += 8) {
                __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k), v2 = _mm256_loadu_ps(w2 + k),
                       v3 = _mm256_loadu_ps(w3 + k), u = _mm256_loadu_ps(x0 + k);
                a[0] = _mm256_fmadd_ps(v0, u, a[0]);
                a[1] = _mm256_fmadd_ps(v1, u, a[1]);
                a[2] = _mm256_fmadd_ps(v2, u, a[2]);
                a[3] = _mm256_fmadd_ps(v3, u, a[3]);
                u = _mm256_loadu_ps(x1 + k);
                a[4] = _mm256_fmadd_ps(v0, u, a[4]);
                a[5] = _mm256_fmadd_ps(v1, u, a[5]);
                a[6] = _mm256_fmadd_ps(v2, u, a[6]);
                a[7] = _mm256_fmadd_ps(v3, u, a[7]);
            }
            for (int r = 0; r <= pair; r++)
                for (int j = 0; j < 4; j++) {
                    const float *x = r ? x1 : x0, *w = w0 + (size_t)j * step;
                    float sum = hsum(a[4 * r + j]);
                    for (int k = K8; k < K; k++) sum += w[k] * x[k];
                    int col = n + j * q;
                    Y[(size_t)(m + r) * N + col] = sum + (b ? b[col] : 0.0f);
                }
        }
    }
    for (int n = n0 + 4 * q; n < n1; n++) {
        const float *w = W + (size_t)n * K;
        for (int m = 0; m < M; m++) {
            const float *x = X + (size_t)m * K;
            __m256 a = _mm256_setzero_ps();
            for (int k = 0; k < K8; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a);
            float sum = hsum(a);
            for (int k = K8; k < K; k++) sum += w[k] * x[k];
            Y[(size_t)m * N + n] = sum + (b ? b[n] : 0.0f);
        }
    }
}

#endif

/* How far ahead (bytes) the int8 products (tile_q8, dot_q8) ask for each weight row's stream (the
 * row's next bytes, then its quarter's next rows). Without it a SmolLM2-135M step's int8 products
 * streamed ~75-80% of what one pooled read of the same bytes does on the 2-core Xeon (AVX-512), with
 * it ~90-95%, 1.1-1.3x faster in A/B runs of both builds (the hardware prefetcher alone keeps too
 * few of the four streams' lines in flight); 2048 did at least as well as 512 to 8192. A request
 * past a part's last row is harmless: prefetches never fault. */
#define Q8_AHEAD 2048

#if defined(SG_AVX512)
/* The four sums of the 16 lanes of a0..a3, in one vector: pairs of lanes added across registers
 * (unpack), then the four 128-bit quarters (a quarter of the instructions of four reductions) */
static inline __m128i hsum4_epi32(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* The integer dot products of ROWS (1 or 4) rows of W (`step` bytes apart) with MB (1 to 4) rows of
 * x (K apart) into sum[4 m + j], with VNNI. vpdpbusd multiplies unsigned bytes by signed ones, so
 * the weights go in as w + 128 (w ^ 0x80, in [1, 255]) and 128 times each x row's sum (xsum, found
 * once per row of x when it is rounded) comes off at the end: one vpdpbusd per 64 weights and row
 * of x, exact, the same integers as the AVX2 and portable paths (|sums| < 255 * 127 * 65536 < 2^31).
 * Each load of the weights serves the MB rows of x from registers (4 x 4 accumulators); a masked
 * load takes the last K % 64 (its weights' lanes become 128, times x's zeros). */
static inline __attribute__((always_inline)) void tile_q8(const int8_t *w, size_t step, const int8_t *xq,
                                                          const int *xsum, int K, int *sum, const int ROWS,
                                                          const int MB) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[4][4], wu[4];
#pragma GCC unroll 4
    for (int i = 0; i < MB; i++)
#pragma GCC unroll 4
        for (int j = 0; j < ROWS; j++) acc[i][j] = _mm512_setzero_si512();
    int k = 0;
    for (; k + 64 <= K; k += 64) { /* unmasked: masked loads in the main loop slow it down */
#pragma GCC unroll 4
        for (int j = 0; j < ROWS; j++) _mm_prefetch((const char *)(w + j * step + k + Q8_AHEAD), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int j = 0; j < ROWS; j++) wu[j] = _mm512_xor_si512(_mm512_loadu_si512(w + j * step + k), flip);
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) {
            __m512i xv = _mm512_loadu_si512(xq + (size_t)i * K + k);
#pragma GCC unroll 4
            for (int j = 0; j < ROWS; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wu[j], xv);
        }
    }
    if (k < K) {
        __mmask64 m = ((__mmask64)1 << (K - k)) - 1;
#pragma GCC unroll 4
        for (int j = 0; j < ROWS; j++) wu[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + j * step + k), flip);
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) {
            __m512i xv = _mm512_maskz_loadu_epi8(m, xq + (size_t)i * K + k);
#pragma GCC unroll 4
            for (int j = 0; j < ROWS; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wu[j], xv);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MB; i++) {
        if (ROWS == 4) {
            __m128i s = _mm_sub_epi32(hsum4_epi32(acc[i][0], acc[i][1], acc[i][2], acc[i][3]),
                                      _mm_set1_epi32(128 * xsum[i]));
            _mm_storeu_si128((__m128i *)(sum + 4 * i), s);
        } else {
            sum[4 * i] = _mm512_reduce_add_epi32(acc[i][0]) - 128 * xsum[i];
        }
    }
}

/* sum[4 m + j] = row j of `rows` (1 or 4) rows of W, `step` bytes apart, dot row m of the M rows of
 * xq (xsum: each row's sum) */
static void dots_q8(const int8_t *w, size_t step, int rows, const int8_t *xq, const int *xsum, int M, int K,
                    int *sum) {
    for (int m0 = 0; m0 < M; m0 += 4) {
        int mb = M - m0 < 4 ? M - m0 : 4;
        const int8_t *x = xq + (size_t)m0 * K;
        const int *xs = xsum + m0;
        int *s = sum + 4 * m0;
        switch (rows * 8 + mb) {
        case 33: tile_q8(w, step, x, xs, K, s, 4, 1); break;
        case 34: tile_q8(w, step, x, xs, K, s, 4, 2); break;
        case 35: tile_q8(w, step, x, xs, K, s, 4, 3); break;
        case 36: tile_q8(w, step, x, xs, K, s, 4, 4); break;
        case 9: tile_q8(w, step, x, xs, K, s, 1, 1); break;
        case 10: tile_q8(w, step, x, xs, K, s, 1, 2); break;
        case 11: tile_q8(w, step, x, xs, K, s, 1, 3); break;
        default: tile_q8(w, step, x, xs, K, s, 1, 4); break;
        }
    }
}

#elif defined(SG_PORTABLE)
/* the integer dot products of x with `rows` (1 or 4) rows of W, `step` bytes apart, in plain C
 * (the compiler vectorises the int8 products) */
static inline void dot_q8(const int8_t *w, size_t step, int rows, const int8_t *xq, int K, int *sum) {
    for (int j = 0; j < rows; j++) {
        const int8_t *wj = w + j * step;
        int s = 0;
        for (int k = 0; k < K; k++) s += (int)wj[k] * (int)xq[k];
        sum[j] = s;
    }
}

#else
/* int8 weights with one scale per row, times x quantized to int8 with one scale (xs): the integer
 * dot products of llama.cpp's q8_0 on AVX2. maddubs multiplies |x| (unsigned) by w carrying x's sign,
 * and with both in [-127, 127] its 16-bit sums of two products cannot saturate. */
static inline __m256i dot32_q8(__m256i acc, const int8_t *w, __m256i xv, __m256i xabs) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p = _mm256_maddubs_epi16(xabs, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), xv));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
}

static inline int hsum_epi32(__m256i acc) {
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    return _mm_cvtsi128_si32(s4);
}

/* the integer dot products of x with `rows` (1 or 4) rows of W, `step` bytes apart */
static inline void dot_q8(const int8_t *w, size_t step, int rows, const int8_t *xq, int K, int *sum) {
    int K32 = K & ~31;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K32; k += 32) {
        for (int j = 0; j < rows; j++) _mm_prefetch((const char *)(w + j * step + k + Q8_AHEAD), _MM_HINT_T0);
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + k)), xabs = _mm256_sign_epi8(xv, xv);
        a0 = dot32_q8(a0, w + k, xv, xabs);
        if (rows == 4) {
            a1 = dot32_q8(a1, w + step + k, xv, xabs);
            a2 = dot32_q8(a2, w + 2 * step + k, xv, xabs);
            a3 = dot32_q8(a3, w + 3 * step + k, xv, xabs);
        }
    }
    sum[0] = hsum_epi32(a0), sum[1] = hsum_epi32(a1), sum[2] = hsum_epi32(a2), sum[3] = hsum_epi32(a3);
    for (int j = 0; j < rows; j++)
        for (int k = K32; k < K; k++) sum[j] += (int)w[j * step + k] * (int)xq[k];
}
#endif

#ifndef SG_AVX512
/* sum[4 m + j] = row j of `rows` (1 or 4) rows of W, `step` bytes apart, dot row m of the M rows of
 * xq: one row of x at a time, the weight rows read from the cache after the first */
static void dots_q8(const int8_t *w, size_t step, int rows, const int8_t *xq, const int *xsum, int M, int K,
                    int *sum) {
    (void)xsum; /* the AVX-512 path's: these sum x times w as they are */
    for (int m = 0; m < M; m++) dot_q8(w, step, rows, xq + (size_t)m * K, K, sum + 4 * m);
}
#endif

/* Rows n0..n1 of y (M, N) = (W q8(x)) scaled, + b, for M rows of x, each quantized with its own
 * scale (xq: M x K int8, xs: M scales, xsum: M sums of xq): as gemv_rows, four weight rows a
 * quarter of the range apart, then the rest one by one; each group of weight rows serves every row
 * of x from the cache. */
static void gemv_rows_q8(const int8_t *W, const float *scale, const int8_t *xq, const float *xs, const int *xsum,
                         const float *b, float *y, int M, int N, int K, int n0, int n1) {
    int q = (n1 - n0) / 4, sum[4 * MAX_ROWS];
    for (int n = n0; n < n1; n++) {
        if (n == n0 + q) n = n0 + 4 * q;  /* the quarters are done: the rest one by one */
        if (n >= n1) break;
        int rows = n < n0 + q ? 4 : 1;
        dots_q8(W + (size_t)n * K, (size_t)q * K, rows, xq, xsum, M, K, sum);
        for (int m = 0; m < M; m++)
            for (int j = 0; j < rows; j++) {
                int col = n + j * q;
                y[(size_t)m * N + col] = (float)sum[4 * m + j] * scale[col] * xs[m] + (b ? b[col] : 0.0f);
            }
    }
}

/* x (K) rounded to int8 xq with the scale it returns, max |x| / 127 (1 for a row of zeros), to the
 * nearest integer, ties to even (lrintf's, cvtps2dq's); *xsum: the sum of xq */
#ifdef SG_AVX512
static float quantize_row(const float *x, int K, int8_t *xq, int *xsum) {
    __m512 mx16 = _mm512_setzero_ps();
    /* max_ps gives its second operand where one is NaN: a NaN is passed over, as the scalar loop below does */
    for (int k = 0; k < K; k += 16)
        mx16 = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(lanes16(k, K), x + k)), mx16);
    float mx = _mm512_reduce_max_ps(mx16);
    float xs = mx > 0.0f ? mx / 127.0f : 1.0f, inv = 1.0f / xs;
    __m512 iv = _mm512_set1_ps(inv);
    __m512i total = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 16) {
        __mmask16 m = lanes16(k, K);
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), iv)); /* |v| <= 127 */
        total = _mm512_add_epi32(total, v);
        _mm_mask_storeu_epi8(xq + k, m, _mm512_cvtepi32_epi8(v));
    }
    *xsum = _mm512_reduce_add_epi32(total);
    return xs;
}
#else
static float quantize_row(const float *x, int K, int8_t *xq, int *xsum) {
    float mx = 0.0f;
    for (int k = 0; k < K; k++) mx = fabsf(x[k]) > mx ? fabsf(x[k]) : mx;
    float xs = mx > 0.0f ? mx / 127.0f : 1.0f, inv = 1.0f / xs;
    int total = 0;
    for (int k = 0; k < K; k++) total += xq[k] = (int8_t)lrintf(x[k] * inv);
    *xsum = total;
    return xs;
}
#endif

static int8_t xq_buf[MAX_ROWS << 16];
static float xs_buf[MAX_ROWS];
static int xsum_buf[MAX_ROWS];

int sg_max_rows(void) { return MAX_ROWS; }

struct gemv_job {
    const void *W;
    const float *scale, *x, *b;  /* scale: NULL for fp32 W, else int8 W's row scales and x as xq * xs */
    const int8_t *xq;
    const float *xs;
    const int *xsum;
    float *y;
    int M, N, K;  /* M: rows of x (and y) */
};

static void gemv_part(void *arg, int part, int parts) {
    const struct gemv_job *j = arg;
    /* split at multiples of 4 rows so every part but the last runs the 4-row loop only */
    int per = ((j->N + parts - 1) / parts + 3) & ~3;
    int n0 = part * per, n1 = n0 + per < j->N ? n0 + per : j->N;
    if (n0 >= n1) return;
    if (j->scale) gemv_rows_q8(j->W, j->scale, j->xq, j->xs, j->xsum, j->b, j->y, j->M, j->N, j->K, n0, n1);
    else if (j->M > 1) gemm_rows(j->W, j->x, j->b, j->y, j->M, j->N, j->K, n0, n1);
    else gemv_rows(j->W, j->x, j->b, j->y, j->K, n0, n1);
}

void gemv_pooled(const void *W, const float *scale, const float *x, const float *b, float *y, int M, int N, int K,
                 int threads) {
    int parts = pool_parts(threads);
    if (parts < 1 || (size_t)M * N * K < 32768) parts = 1;
    struct gemv_job job = {W, scale, x, b, NULL, NULL, NULL, y, M, N, K};
    if (scale) {
        job.xq = xq_buf;
        job.xs = xs_buf;
        job.xsum = xsum_buf;
        for (int m = 0; m < M; m++)
            xs_buf[m] = quantize_row(x + (size_t)m * K, K, xq_buf + (size_t)m * K, xsum_buf + m);
    }
    pool_run(gemv_part, &job, parts);
}

/* y = x W^T + b (b may be NULL) for M rows of x (M, K) and y (M, N), with `threads` threads (at most the pool's) */
void sg_gemv(const float *W, const float *x, const float *b, float *y, int M, int N, int K, int threads) {
    pool_lock();
    gemv_pooled(W, NULL, x, b, y, M, N, K, threads);
    pool_unlock();
}

/* y = scale * (q8(x) W^T) + b for M rows of x (M, K) and y (M, N), int8 W (N, K) row-major with row
 * scales; K at most 65536, M at most MAX_ROWS */
void sg_gemv_q8(const int8_t *W, const float *scale, const float *x, const float *b, float *y, int M, int N, int K,
                int threads) {
    if (M > MAX_ROWS || K > 1 << 16) return;
    pool_lock();
    gemv_pooled(W, scale, x, b, y, M, N, K, threads);
    pool_unlock();
}
