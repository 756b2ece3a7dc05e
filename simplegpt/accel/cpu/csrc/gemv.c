/* simplegpt's CPU matrix-vector kernel for batch-1 decoding (see simplegpt/native/__init__.py).
 *
 * y[n] = dot(W[n, :], x) + b[n] for a row-major (N, K) fp32 W: nn.Linear's own layout, so the
 * weights are used as they are. Rows are split between the calling thread and a small pool of
 * workers that spin briefly for the next call (decode steps issue ~50 calls back to back) and
 * then sleep. At batch 1 this is memory-bound: the point is to stream W from both cores at once,
 * which PyTorch's BLAS matrix-vector path does not do at these sizes.
 */
#include "simd.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>

#define MAX_THREADS 64 /* part numbers fit in 8 bits */
#define SPIN_ROUNDS 20000

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

/* Rows n0..n1 of y (M, N) = (W q8(x)) scaled, + b, for M rows of x, each quantized with its own
 * scale (xq: M x K int8, xs: M scales): as gemv_rows, four weight rows a quarter of the range
 * apart, then the rest one by one; each group of weight rows serves every row of x from the cache. */
static void gemv_rows_q8(const int8_t *W, const float *scale, const int8_t *xq, const float *xs, const float *b,
                         float *y, int M, int N, int K, int n0, int n1) {
    int q = (n1 - n0) / 4, sum[4];
    for (int n = n0; n < n1; n++) {
        if (n == n0 + q) n = n0 + 4 * q;  /* the quarters are done: the rest one by one */
        if (n >= n1) break;
        int rows = n < n0 + q ? 4 : 1;
        for (int m = 0; m < M; m++) {
            dot_q8(W + (size_t)n * K, (size_t)q * K, rows, xq + (size_t)m * K, K, sum);
            for (int j = 0; j < rows; j++) {
                int col = n + j * q;
                y[(size_t)m * N + col] = (float)sum[j] * scale[col] * xs[m] + (b ? b[col] : 0.0f);
            }
        }
    }
}

static float quantize_row(const float *x, int K, int8_t *xq) {
    float mx = 0.0f;
    for (int k = 0; k < K; k++) mx = fabsf(x[k]) > mx ? fabsf(x[k]) : mx;
    float xs = mx > 0.0f ? mx / 127.0f : 1.0f, inv = 1.0f / xs;
    for (int k = 0; k < K; k++) xq[k] = (int8_t)lrintf(x[k] * inv);
    return xs;
}

static struct {
    pthread_mutex_t call;  /* one call at a time (Python threads may call concurrently) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint gen;       /* bumped for every call */
    atomic_int done;       /* workers finished with the current call */
    int sleepers, workers, started;
    const void *W;
    const float *scale, *x, *b;  /* scale: NULL for fp32 W, else int8 W's row scales and x as xq * xs */
    const int8_t *xq;
    const float *xs;
    float *y;
    int M, N, K, parts;  /* M: rows of x (and y) */
    struct attend_args *attend;  /* not NULL: the call is attend1's heads, split between the parts */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void attend_part(int part);

static void run_part(int part) {
    if (pool.attend) {
        attend_part(part);
        return;
    }
    /* split at multiples of 4 rows so every part but the last runs the 4-row loop only */
    int per = ((pool.N + pool.parts - 1) / pool.parts + 3) & ~3;
    int n0 = part * per, n1 = n0 + per < pool.N ? n0 + per : pool.N;
    if (n0 >= n1) return;
    if (pool.scale) gemv_rows_q8(pool.W, pool.scale, pool.xq, pool.xs, pool.b, pool.y, pool.M, pool.N, pool.K, n0, n1);
    else if (pool.M > 1) gemm_rows(pool.W, pool.x, pool.b, pool.y, pool.M, pool.N, pool.K, n0, n1);
    else gemv_rows(pool.W, pool.x, pool.b, pool.y, pool.K, n0, n1);
}

static void *worker(void *arg) {
    /* arg: the part number in the low 8 bits, above them the call count when the worker was made */
    int part = (int)((uintptr_t)arg & 0xff);
    unsigned seen = (unsigned)((uintptr_t)arg >> 8);
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            pool.sleepers++;
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            pool.sleepers--;
            pthread_mutex_unlock(&pool.mu);
            spins = 0;
        }
        seen = gen;
        if (part < pool.parts) run_part(part);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_acq_rel);
    }
    return NULL;
}

static void forget_workers(void) { pool.workers = 0; pool.started = 0; } /* a forked child has none */

/* Start (threads - 1) workers; returns the number of threads calls will use. */
int sg_init(int threads) {
    pthread_mutex_lock(&pool.call);
    if (!pool.started) {
        pthread_atfork(NULL, NULL, forget_workers);
        pool.started = 1;
    }
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    while (pool.workers < threads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        uintptr_t arg = ((uintptr_t)atomic_load(&pool.gen) << 8) | (uintptr_t)(pool.workers + 1);
        int failed = pthread_create(&t, &attr, worker, (void *)arg);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers++;
    }
    int n = pool.workers + 1;
    pthread_mutex_unlock(&pool.call);
    return n;
}

#define MAX_ROWS 16 /* simplegpt.native.MAX_ROWS */
static int8_t xq_buf[MAX_ROWS << 16];
static float xs_buf[MAX_ROWS];

int sg_max_rows(void) { return MAX_ROWS; }

/* run_part(0..parts-1) for the call set up in pool: part 0 here, the others on the workers */
static void dispatch(int parts) {
    pool.parts = parts;
    if (parts == 1) {
        run_part(0);
        return;
    }
    atomic_store(&pool.done, 0);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    if (pool.sleepers) pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    run_part(0);
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < pool.workers) _mm_pause();
}

static int pool_parts(int threads) { return threads < pool.workers + 1 ? threads : pool.workers + 1; }

/* y = x W^T + b for M rows with the pool (int8 W where scale is not NULL); the caller holds pool.call */
static void gemv_pool(const void *W, const float *scale, const float *x, const float *b, float *y, int M, int N,
                      int K, int threads) {
    int parts = pool_parts(threads);
    if (parts < 1 || (size_t)M * N * K < 32768) parts = 1;
    pool.attend = NULL;
    pool.W = W; pool.scale = scale; pool.x = x; pool.b = b; pool.y = y; pool.M = M; pool.N = N; pool.K = K;
    if (scale) {
        pool.xq = xq_buf;
        pool.xs = xs_buf;
        for (int m = 0; m < M; m++) xs_buf[m] = quantize_row(x + (size_t)m * K, K, xq_buf + (size_t)m * K);
    }
    dispatch(parts);
}

/* y = x W^T + b (b may be NULL) for M rows of x (M, K) and y (M, N), with `threads` threads (at most the pool's) */
void sg_gemv(const float *W, const float *x, const float *b, float *y, int M, int N, int K, int threads) {
    pthread_mutex_lock(&pool.call);
    gemv_pool(W, NULL, x, b, y, M, N, K, threads);
    pthread_mutex_unlock(&pool.call);
}

/* y = scale * (q8(x) W^T) + b for M rows of x (M, K) and y (M, N), int8 W (N, K) row-major with row
 * scales; K at most 65536, M at most MAX_ROWS */
void sg_gemv_q8(const int8_t *W, const float *scale, const float *x, const float *b, float *y, int M, int N, int K,
                int threads) {
    if (M > MAX_ROWS || K > 1 << 16) return;
    pthread_mutex_lock(&pool.call);
    gemv_pool(W, scale, x, b, y, M, N, K, threads);
    pthread_mutex_unlock(&pool.call);
}

/* Attention of one query per head and row over S cached keys (one decode step of B rows):
 * out[b, h] = softmax(q[b, h] . k[b, h, s] * scale over the slots s < S that mask[b] marks real) @ v[b, h].
 * q rows are q_stride floats apart, out is (B, H, D) contiguous; k and v hold each row's (H, S, D)
 * with rows D floats apart, heads head_stride and batch rows row_stride floats apart (a KV cache
 * slice). mask: NULL (every slot real), else B rows of int64, mask_stride apart, 0 = padding.
 * The (row, head) pairs are split between the pool's threads; scores holds S floats per thread. */
struct attend_args {
    const float *q, *k, *v;
    float *out, *scores;
    const int64_t *mask;
    int B, H, S, D;
    long q_stride, head_stride, row_stride, mask_stride;
    float scale;
};

static void attend_head(const struct attend_args *a, int b, int h, float *scores) {
    int D = a->D, S = a->S;
    const float *qh = a->q + (size_t)b * a->q_stride + (size_t)h * D;
    const float *kh = a->k + (size_t)b * a->row_stride + (size_t)h * a->head_stride;
    const float *vh = a->v + (size_t)b * a->row_stride + (size_t)h * a->head_stride;
    const int64_t *real = a->mask ? a->mask + (size_t)b * a->mask_stride : NULL;
    float *oh = a->out + ((size_t)b * a->H + h) * D, mx = -3.4e38f, sum = 0.0f;
    for (int s = 0; s < S; s++) {
        if (real && !real[s]) {
            scores[s] = -3.4e38f;
            continue;
        }
        const float *ks = kh + (size_t)s * D;
        float d = 0.0f;
        int i = 0;
        if (D >= 8) {
            __m256 acc = _mm256_setzero_ps();
            for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(ks + i), acc);
            d = hsum(acc);
        }
        for (; i < D; i++) d += qh[i] * ks[i];
        scores[s] = d * a->scale;
        if (scores[s] > mx) mx = scores[s];
    }
    for (int s = 0; s < S; s++) {
        scores[s] = real && !real[s] ? 0.0f : __builtin_expf(scores[s] - mx);
        sum += scores[s];
    }
    for (int i = 0; i < D; i++) oh[i] = 0.0f;
    for (int s = 0; s < S; s++) {
        if (scores[s] == 0.0f) continue;
        const float *vs = vh + (size_t)s * D;
        float p = scores[s] / sum;
        for (int i = 0; i < D; i++) oh[i] += p * vs[i];
    }
}

static void attend_part(int part) {
    const struct attend_args *a = pool.attend;
    int pairs = a->B * a->H, per = (pairs + pool.parts - 1) / pool.parts;
    for (int i = part * per; i < pairs && i < (part + 1) * per; i++)
        attend_head(a, i / a->H, i % a->H, a->scores + (size_t)part * a->S);
}

/* attention over S keys with the pool (the caller holds pool.call); one thread below min_keys keys in all,
 * where waking the workers costs more than the work */
static void attend1(struct attend_args *a, int threads) {
    int parts = pool_parts(threads), min_keys = 64;
    if (parts > a->B * a->H) parts = a->B * a->H;
    if (parts < 1 || a->B * a->S < min_keys) parts = 1;
    pool.attend = a;
    dispatch(parts);
    pool.attend = NULL;
}

/* GPT-2's tanh-GELU in place (simd.h) */
static void gelu_tanh(float *h, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(h + i);
        _mm256_storeu_ps(h + i, _mm256_mul_ps(v, gelu_gate8(v)));
    }
    for (; i < n; i++) h[i] *= gelu_gate1(h[i]);
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, int C, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int i = 0; i < C; i++) mean += x[i];
    mean /= C;
    for (int i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / __builtin_sqrtf(var / C + eps);
    for (int i = 0; i < C; i++) y[i] = (x[i] - mean) * inv * (w ? w[i] : 1.0f) + (b ? b[i] : 0.0f);
}

/* One GPT-2 block for one token of each of B rows (one decode step), as simplegpt.model.Block
 * computes it: x += proj(attn(ln_1(x))); x += fc2(gelu(fc(ln_2(x)))), x (B, C). Each row's new key
 * and value go to slot `pos` of its cache (row b at kc + b row_stride, heads head_stride floats
 * apart, slots C / H floats apart), and its query attends to the slots 0..pos that mask marks real
 * (see attend_args). p holds the 12 parameter pointers in Block's order (ln_1 w, b; c_attn w, b;
 * attn c_proj w, b; ln_2 w, b; c_fc w, b; mlp c_proj w, b); biases may be NULL. scales: NULL for fp32
 * linear weights, else the 4 linears' row scales (their weights are int8). scratch holds
 * sg_block1_scratch(B, C, pos + 1, threads) floats. The caller holds pool.call. */
static void block1(float *x, const float **p, const float **scales, float *kc, float *vc, long head_stride,
                   long row_stride, int B, int pos, const int64_t *mask, long mask_stride, int C, int H, float eps,
                   float *scratch, int threads) {
    const float *s[4] = {NULL, NULL, NULL, NULL};
    if (scales) for (int i = 0; i < 4; i++) s[i] = scales[i];
    int D = C / H;
    size_t BC = (size_t)B * C;
    float *xn = scratch, *qkv = xn + BC, *att = qkv + 3 * BC, *tmp = att + BC, *h = tmp + BC, *scores = h + 4 * BC;
    for (int b = 0; b < B; b++) layer_norm(x + b * C, p[0], p[1], xn + b * C, C, eps);
    gemv_pool(p[2], s[0], xn, p[3], qkv, B, 3 * C, C, threads);
    for (int b = 0; b < B; b++)
        for (int hd = 0; hd < H; hd++) {
            size_t at = (size_t)b * row_stride + (size_t)hd * head_stride + (size_t)pos * D;
            for (int i = 0; i < D; i++) {
                kc[at + i] = qkv[(size_t)b * 3 * C + C + hd * D + i];
                vc[at + i] = qkv[(size_t)b * 3 * C + 2 * C + hd * D + i];
            }
        }
    struct attend_args a = {qkv, kc, vc, att, scores, mask, B, H, pos + 1, D, 3L * C, head_stride, row_stride,
                            mask_stride, 1.0f / __builtin_sqrtf((float)D)};
    attend1(&a, threads);
    gemv_pool(p[4], s[1], att, p[5], tmp, B, C, C, threads);
    for (size_t i = 0; i < BC; i++) x[i] += tmp[i];
    for (int b = 0; b < B; b++) layer_norm(x + b * C, p[6], p[7], xn + b * C, C, eps);
    gemv_pool(p[8], s[2], xn, p[9], h, B, 4 * C, C, threads);
    gelu_tanh(h, 4 * (int)BC);
    gemv_pool(p[10], s[3], h, p[11], tmp, B, C, 4 * C, threads);
    for (size_t i = 0; i < BC; i++) x[i] += tmp[i];
}

/* scratch floats block1 needs for B rows and S keys */
long sg_block1_scratch(int B, int C, int S, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    return 10L * B * C + (long)S * (threads < 1 ? 1 : threads);
}

/* block1 for L blocks in a row, in one call: p holds 12 pointers per block, scales 4 per block (or
 * is NULL), kc and vc each block's cache (as for block1). B at most MAX_ROWS (the int8 kernel's
 * buffers); returns -1 (doing nothing) past it. */
int sg_blocks1(float *x, const float **p, const float **scales, float **kc, float **vc, long head_stride,
               long row_stride, int B, int pos, const int64_t *mask, long mask_stride, int C, int H, int L, float eps,
               float *scratch, int threads) {
    if (B < 1 || B > MAX_ROWS) return -1;
    pthread_mutex_lock(&pool.call);
    for (int l = 0; l < L; l++)
        block1(x, p + 12 * l, scales ? scales + 4 * l : NULL, kc[l], vc[l], head_stride, row_stride, B, pos, mask,
               mask_stride, C, H, eps, scratch, threads);
    pthread_mutex_unlock(&pool.call);
    return 0;
}
