/* simplegpt's CPU kernels for training (see simplegpt/native/training.py): GPT-2's tanh-GELU,
 * causal self-attention and LayerNorm, forward and backward, in fewer passes over memory than
 * PyTorch's CPU kernels take at small-model sizes; a whole block and a whole model with its loss
 * built from them (matrix products in torch's own sgemm); AdamW with the gradients' norm.
 *
 * Work is split with OpenMP. The library is linked against libgomp, and in a process where torch
 * (built with OpenMP, as its Linux wheels are) is loaded, the loader binds it to torch's own copy:
 * these loops run on the same threads as torch's, with torch.set_num_threads' count, instead of a
 * second pool fighting the first for the cores.
 */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "simd.h"

int sg_omp_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

#define CHUNK 4096 /* elements per OpenMP work item in the elementwise loops */

/* y = gelu(x), n floats */
void sg_gelu_fwd(const float *x, float *y, long n) {
    long chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
    for (long c = 0; c < chunks; c++) {
        long i = c * CHUNK, end = i + CHUNK < n ? i + CHUNK : n;
        for (; i + 8 <= end; i += 8) {
            __m256 h = _mm256_loadu_ps(x + i);
            _mm256_storeu_ps(y + i, _mm256_mul_ps(h, gelu_gate8(h)));
        }
        for (; i < end; i++) y[i] = x[i] * gelu_gate1(x[i]);
    }
}

/* gelu'(h). With s the gate above, gelu(h) = h s and
 * gelu'(h) = s + h s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 h^2). */
static inline __m256 gelu_grad8(__m256 h) {
    const __m256 c2 = _mm256_set1_ps(-GELU_K), c3 = _mm256_set1_ps(-GELU_K * 3.0f * GELU_A);
    __m256 s = gelu_gate8(h);
    __m256 dz = _mm256_fmadd_ps(c3, _mm256_mul_ps(h, h), c2); /* 2 dz/dh */
    __m256 hs1s = _mm256_mul_ps(_mm256_mul_ps(h, s), _mm256_sub_ps(_mm256_set1_ps(1.0f), s));
    return _mm256_fmadd_ps(hs1s, dz, s);
}

static inline float gelu_grad1(float h) {
    float s = gelu_gate1(h);
    return s + h * s * (1.0f - s) * (-GELU_K + -GELU_K * 3.0f * GELU_A * h * h);
}

/* dx = dy * gelu'(x) */
void sg_gelu_bwd(const float *x, const float *dy, float *dx, long n) {
    long chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
    for (long c = 0; c < chunks; c++) {
        long i = c * CHUNK, end = i + CHUNK < n ? i + CHUNK : n;
        for (; i + 8 <= end; i += 8)
            _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), gelu_grad8(_mm256_loadu_ps(x + i))));
        for (; i < end; i++) dx[i] = dy[i] * gelu_grad1(x[i]);
    }
}

/* The MLP's bias and GELU after its first matmul, for the fused block (training.py):
 * u += b per column (u is the (M, N) product, b may be NULL), then y = gelu(u). */
static void bias_gelu_fwd(float *u, const float *b, float *y, long M, int N) {
    int N8 = N & ~7;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) {
        float *ur = u + r * N, *yr = y + r * N;
        int i = 0;
        for (; i < N8; i += 8) {
            __m256 h = _mm256_loadu_ps(ur + i);
            if (b) {
                h = _mm256_add_ps(h, _mm256_loadu_ps(b + i));
                _mm256_storeu_ps(ur + i, h);
            }
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(h, gelu_gate8(h)));
        }
        for (; i < N; i++) {
            float h = ur[i] + (b ? b[i] : 0.0f);
            ur[i] = h;
            yr[i] = h * gelu_gate1(h);
        }
    }
}

#define COLSUM_ROWS 32 /* rows per work item of the column sums; items are then summed in order */

/* out[i] = sum over items of partial[item][i] (items rows of N), in item order */
static void sum_partials(const float *partial, long items, int N, float *out) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        float acc = 0.0f;
        for (long it = 0; it < items; it++) acc += partial[it * N + i];
        out[i] = acc;
    }
}

/* du = dy * gelu'(u) (du may be dy) and, when db is not NULL, db = the column sums of du (the
 * bias gradient), the same bits on any thread count. Returns 0 if there was no memory. */
static int gelu_bwd_db(const float *u, const float *dy, float *du, float *db, long M, int N) {
    long items = (M + COLSUM_ROWS - 1) / COLSUM_ROWS;
    int N8 = N & ~7;
    float *partial = db ? calloc((size_t)items * N, sizeof(float)) : NULL;
    if (db && !partial) return 0;
#pragma omp parallel for schedule(static)
    for (long it = 0; it < items; it++) {
        long r1 = (it + 1) * COLSUM_ROWS < M ? (it + 1) * COLSUM_ROWS : M;
        float *pd = partial ? partial + it * N : NULL;
        for (long r = it * COLSUM_ROWS; r < r1; r++) {
            const float *ur = u + r * N, *gr = dy + r * N;
            float *dr = du + r * N;
            int i = 0;
            for (; i < N8; i += 8) {
                __m256 d = _mm256_mul_ps(_mm256_loadu_ps(gr + i), gelu_grad8(_mm256_loadu_ps(ur + i)));
                _mm256_storeu_ps(dr + i, d);
                if (pd) _mm256_storeu_ps(pd + i, _mm256_add_ps(_mm256_loadu_ps(pd + i), d));
            }
            for (; i < N; i++) {
                float d = gr[i] * gelu_grad1(ur[i]);
                dr[i] = d;
                if (pd) pd[i] += d;
            }
        }
    }
    if (db) {
        sum_partials(partial, items, N, db);
        free(partial);
    }
    return 1;
}

/* ---- causal self-attention over a fused (B, T, 3C) q|k|v buffer -------------------------------
 * Head h of row b reads q, k, v at columns h D, C + h D, 2C + h D of each token (the layout of
 * c_attn's output), so no transposes or copies of the inputs are needed, and writes its output at
 * columns h D of a (B, T, C) buffer (the layout c_proj reads). Every (b, h) pair is one OpenMP work
 * item, so results do not depend on the thread count. Sequences are short (the model sends up
 * to 256 positions here): each item keeps its (T, T) probabilities in scratch memory and runs
 * small register-tiled products, two query rows at a time. D = 8 DV with DV in 1, 2, 4, 8. */

typedef struct {
    float *kt, *vt; /* (D, Tp): the head's keys and values transposed, zero-padded to Tp columns */
    float *p, *ds;  /* (T + 1, Tp): probabilities and score gradients; zero right of the diagonal */
} scratch;

static float *scratch_alloc(scratch *s, int T, int D) {
    int Tp = (T + 15) & ~15;
    size_t n = (size_t)2 * D * Tp + (size_t)2 * (T + 1) * Tp;
    float *m = aligned_alloc(32, ((n * sizeof(float)) + 31) & ~(size_t)31);
    if (!m) return NULL;
    memset(m, 0, n * sizeof(float));
    s->kt = m;
    s->vt = m + (size_t)D * Tp;
    s->p = m + (size_t)2 * D * Tp;
    s->ds = s->p + (size_t)(T + 1) * Tp; /* p and ds have a spare row T for an odd last row's pair */
    return m;
}

/* the 8 x 8 block at src (rows ld apart) transposed into dst (rows ldd apart) */
static inline void transpose8x8(const float *src, long ld, float *dst, long ldd) {
    __m256 r[8], t[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(src + k * ld);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(dst + k * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(dst + (k + 4) * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
}

/* transpose T rows of D floats (stride ld; D a multiple of 8) into (D, Tp) */
static void transpose_in(const float *src, long ld, float *dst, int T, int D, int Tp) {
    int t = 0;
    for (; t + 8 <= T; t += 8)
        for (int d = 0; d < D; d += 8) transpose8x8(src + (size_t)t * ld + d, ld, dst + (size_t)d * Tp + t, Tp);
    for (; t < T; t++)
        for (int d = 0; d < D; d++) dst[(size_t)d * Tp + t] = src[(size_t)t * ld + d];
}

/* s0[j] = scale a0 . bt[:, j] and s1[j] = scale a1 . bt[:, j] for j < n rounded up to 16:
 * two rows share every load of bt (D, Tp); eight accumulators hide the FMA latency */
static inline void dots2(const float *a0, const float *a1, const float *bt, int D, int Tp, int n, float scale,
                         float *s0, float *s1) {
    __m256 sc = _mm256_set1_ps(scale);
    for (int j = 0; j < n; j += 16) {
        __m256 x00 = _mm256_setzero_ps(), x01 = x00, x10 = x00, x11 = x00;
        __m256 y00 = x00, y01 = x00, y10 = x00, y11 = x00;
        for (int d = 0; d < D; d += 2) {
            const float *r = bt + (size_t)d * Tp + j;
            __m256 b0 = _mm256_load_ps(r), b1 = _mm256_load_ps(r + 8);
            __m256 c0 = _mm256_load_ps(r + Tp), c1 = _mm256_load_ps(r + Tp + 8);
            __m256 p = _mm256_set1_ps(a0[d]), q = _mm256_set1_ps(a0[d + 1]);
            __m256 u = _mm256_set1_ps(a1[d]), v = _mm256_set1_ps(a1[d + 1]);
            x00 = _mm256_fmadd_ps(p, b0, x00);
            x01 = _mm256_fmadd_ps(p, b1, x01);
            y00 = _mm256_fmadd_ps(q, c0, y00);
            y01 = _mm256_fmadd_ps(q, c1, y01);
            x10 = _mm256_fmadd_ps(u, b0, x10);
            x11 = _mm256_fmadd_ps(u, b1, x11);
            y10 = _mm256_fmadd_ps(v, c0, y10);
            y11 = _mm256_fmadd_ps(v, c1, y11);
        }
        _mm256_storeu_ps(s0 + j, _mm256_mul_ps(_mm256_add_ps(x00, y00), sc));
        _mm256_storeu_ps(s0 + j + 8, _mm256_mul_ps(_mm256_add_ps(x01, y01), sc));
        _mm256_storeu_ps(s1 + j, _mm256_mul_ps(_mm256_add_ps(x10, y10), sc));
        _mm256_storeu_ps(s1 + j + 8, _mm256_mul_ps(_mm256_add_ps(x11, y11), sc));
    }
}

/* o0 = sum over j in [lo, hi) of w0[j ws] b[j] and o1 likewise with w1 (b: rows of D = 8 DV floats,
 * ldb apart): two output rows share every load of b. DV is a constant where this is inlined. */
static inline __attribute__((always_inline)) void wsum2(const float *w0, const float *w1, long ws, const float *b,
                                                        long ldb, int lo, int hi, float *o0, float *o1,
                                                        const int DV) {
    __m256 a0[8], a1[8];
#pragma GCC unroll 8
    for (int v = 0; v < DV; v++) a0[v] = a1[v] = _mm256_setzero_ps();
    for (int j = lo; j < hi; j++) {
        const float *r = b + (size_t)j * ldb;
        __m256 p = _mm256_set1_ps(w0[(size_t)j * ws]), q = _mm256_set1_ps(w1[(size_t)j * ws]);
#pragma GCC unroll 8
        for (int v = 0; v < DV; v++) {
            __m256 x = _mm256_loadu_ps(r + 8 * v);
            a0[v] = _mm256_fmadd_ps(p, x, a0[v]);
            a1[v] = _mm256_fmadd_ps(q, x, a1[v]);
        }
    }
#pragma GCC unroll 8
    for (int v = 0; v < DV; v++) {
        _mm256_storeu_ps(o0 + 8 * v, a0[v]);
        _mm256_storeu_ps(o1 + 8 * v, a1[v]);
    }
}

/* With w a causal (T, Tp) matrix (rows Tp apart, zero right of the diagonal up to the next
 * multiple of 16 past it), rows i of out (ldo apart) = sum over j of W[i, j] b[j], where lower = 1
 * takes W = w (j in [0, i + 1)) and lower = 0 its transpose (j in [i, T), w read down column i) */
static void wsum_rows(const float *w, int T, int Tp, const float *b, long ldb, float *out, long ldo, int D, int lower) {
    float spare[64];
    long ws = lower ? 1 : Tp;
    for (int i = 0; i < T; i += 2) {
        int two = i + 1 < T;
        const float *w0 = lower ? w + (size_t)i * Tp : w + i, *w1 = two ? w0 + (lower ? Tp : 1) : w0;
        float *o0 = out + (size_t)i * ldo, *o1 = two ? o0 + ldo : spare;
        /* the union of both rows' ranges: entries outside a row's own range are zeros */
        int lo = lower ? 0 : i, hi = lower ? (two ? i + 2 : i + 1) : T;
        switch (D) {
        case 8: wsum2(w0, w1, ws, b, ldb, lo, hi, o0, o1, 1); break;
        case 16: wsum2(w0, w1, ws, b, ldb, lo, hi, o0, o1, 2); break;
        case 32: wsum2(w0, w1, ws, b, ldb, lo, hi, o0, o1, 4); break;
        default: wsum2(w0, w1, ws, b, ldb, lo, hi, o0, o1, 8); break;
        }
    }
}

/* softmax of p[0..n) in place (n >= 1), returning its log-sum-exp */
static float softmax_row(float *p, int n) {
    int n8 = n & ~7, j;
    __m256 mv = _mm256_set1_ps(-3.4e38f);
    for (j = 0; j < n8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(p + j));
    float mx = hmax(mv);
    for (; j < n; j++) mx = p[j] > mx ? p[j] : mx;
    __m256 sv = _mm256_setzero_ps(), m8 = _mm256_set1_ps(mx);
    for (j = 0; j < n8; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), m8));
        _mm256_storeu_ps(p + j, e);
        sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum(sv);
    for (; j < n; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    float inv = 1.0f / sum;
    __m256 iv = _mm256_set1_ps(inv);
    for (j = 0; j < n8; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), iv));
    for (; j < n; j++) p[j] *= inv;
    return mx + logf(sum);
}


typedef struct {
    const float *qkv, *out, *dout, *lse; /* inputs; out and lse are written by the forward */
    float *y, *l, *dqkv;                 /* the forward's out and lse; the backward's dqkv */
    int T, C, H, D, Tp;
    float scale;
} attn_args;

/* item(a, scratch, b, h) for every (b, h) pair, one OpenMP work item each, with per-thread scratch;
 * returns 0 if a thread had no memory for its scratch (its items are then skipped) */
static int for_each_head(int B, const attn_args *a, void (*item)(const attn_args *, scratch *, int, int)) {
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        scratch s = {0};
        float *mem = scratch_alloc(&s, a->T, a->D);
        /* every thread must reach the work-sharing loop, so one that has no memory skips its items */
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * a->H; bh++) {
            if (!mem) {
                failed = 1;
                continue;
            }
            item(a, &s, bh / a->H, bh % a->H);
        }
        free(mem);
    }
    return !failed;
}

static void attn_fwd_item(const attn_args *a, scratch *s, int b, int h) {
    int T = a->T, C = a->C, D = a->D, Tp = a->Tp;
    long ld = 3L * C;
    const float *base = a->qkv + (size_t)b * T * ld + (size_t)h * D;
    float *l = a->l + ((size_t)b * a->H + h) * T;
    transpose_in(base + C, ld, s->kt, T, D, Tp);
    for (int i = 0; i < T; i += 2) {
        int two = i + 1 < T;
        const float *q0 = base + (size_t)i * ld;
        float *p0 = s->p + (size_t)i * Tp, *p1 = p0 + Tp;
        dots2(q0, two ? q0 + ld : q0, s->kt, D, Tp, i + 1 + two, a->scale, p0, p1);
        l[i] = softmax_row(p0, i + 1);
        p0[i + 1] = 0.0f; /* row i's range ends where row i + 1's does not */
        if (two) l[i + 1] = softmax_row(p1, i + 2);
    }
    wsum_rows(s->p, T, Tp, base + 2 * C, ld, a->y + (size_t)b * T * C + (size_t)h * D, C, D, 1);
}

/* out (B, T, C) = softmax(q k^T * scale, causal) v per head; lse (B, H, T) keeps each row's
 * log-sum-exp for the backward pass. Returns 0 if scratch memory could not be allocated. */
int sg_attn_fwd(const float *qkv, float *out, float *lse, int B, int T, int C, int H, float scale) {
    attn_args a = {.qkv = qkv, .y = out, .l = lse, .T = T, .C = C, .H = H, .D = C / H, .Tp = (T + 15) & ~15,
                   .scale = scale};
    return for_each_head(B, &a, attn_fwd_item);
}

static void attn_bwd_item(const attn_args *a, scratch *s, int b, int h) {
    int T = a->T, C = a->C, D = a->D, Tp = a->Tp;
    long ld = 3L * C;
    float scale = a->scale;
    const float *base = a->qkv + (size_t)b * T * ld + (size_t)h * D;
    const float *o = a->out + (size_t)b * T * C + (size_t)h * D, *g = a->dout + (size_t)b * T * C + (size_t)h * D;
    const float *l = a->lse + ((size_t)b * a->H + h) * T;
    float *dbase = a->dqkv + (size_t)b * T * ld + (size_t)h * D;
    transpose_in(base + C, ld, s->kt, T, D, Tp);
    transpose_in(base + 2 * C, ld, s->vt, T, D, Tp);
    for (int i = 0; i < T; i += 2) {
        int two = i + 1 < T, n = i + 1 + two, n16 = (n + 15) & ~15;
        const float *q0 = base + (size_t)i * ld, *g0 = g + (size_t)i * C;
        float *p0 = s->p + (size_t)i * Tp, *d0 = s->ds + (size_t)i * Tp;
        dots2(q0, two ? q0 + ld : q0, s->kt, D, Tp, n, scale, p0, p0 + Tp); /* scores */
        dots2(g0, two ? g0 + C : g0, s->vt, D, Tp, n, 1.0f, d0, d0 + Tp);    /* dP = dO_i . V_j */
        for (int r = 0; r <= two; r++) {
            const float *gi = g0 + (size_t)r * C, *oi = o + (size_t)(i + r) * C;
            float *pr = p0 + (size_t)r * Tp, *dr = d0 + (size_t)r * Tp, delta = 0.0f;
            for (int d = 0; d < D; d++) delta += gi[d] * oi[d]; /* dO_i . O_i = sum_j P_ij dP_ij */
            __m256 lv = _mm256_set1_ps(l[i + r]), dv8 = _mm256_set1_ps(delta), sc = _mm256_set1_ps(scale);
            int m = i + r + 1, j = 0;
            for (; j + 8 <= m; j += 8) {
                __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(pr + j), lv));
                _mm256_storeu_ps(pr + j, p);
                /* dS = P (dP - delta), times scale for the q.k products */
                _mm256_storeu_ps(dr + j, _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dr + j), dv8)), sc));
            }
            for (; j < m; j++) {
                pr[j] = expf(pr[j] - l[i + r]);
                dr[j] = pr[j] * (dr[j] - delta) * scale;
            }
            for (; j < n16 && j < Tp; j++) pr[j] = dr[j] = 0.0f; /* right of the diagonal */
        }
    }
    wsum_rows(s->ds, T, Tp, base + C, ld, dbase, ld, D, 1); /* dQ_i = sum_j dS_ij K_j */
    wsum_rows(s->ds, T, Tp, base, ld, dbase + C, ld, D, 0); /* dK_j = sum_i dS_ij Q_i */
    wsum_rows(s->p, T, Tp, g, C, dbase + 2 * C, ld, D, 0);  /* dV_j = sum_i P_ij dO_i */
}

/* The gradients of sg_attn_fwd: dqkv (B, T, 3C) from dout (B, T, C), recomputing the
 * probabilities from q, k and lse. */
int sg_attn_bwd(const float *qkv, const float *out, const float *dout, const float *lse, float *dqkv, int B, int T,
                int C, int H, float scale) {
    attn_args a = {.qkv = qkv, .out = out, .dout = dout, .lse = lse, .dqkv = dqkv, .T = T, .C = C, .H = H,
                   .D = C / H, .Tp = (T + 15) & ~15, .scale = scale};
    return for_each_head(B, &a, attn_bwd_item);
}

/* ---- LayerNorm over rows of C floats ------------------------------------------------------- */

/* one row: y = (x - mean) * rstd * w + b; mean and rstd are kept for the backward */
static inline void ln_row(const float *xr, const float *w, const float *b, float *yr, float *mean, float *rstd, int C,
                          float eps) {
    int C8 = C & ~7, i;
    __m256 s = _mm256_setzero_ps();
    for (i = 0; i < C8; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xr + i));
    float m = hsum(s);
    for (; i < C; i++) m += xr[i];
    m /= C;
    __m256 mv = _mm256_set1_ps(m), v = _mm256_setzero_ps();
    for (i = 0; i < C8; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + i), mv);
        v = _mm256_fmadd_ps(d, d, v);
    }
    float var = hsum(v);
    for (; i < C; i++) var += (xr[i] - m) * (xr[i] - m);
    float rs = 1.0f / sqrtf(var / C + eps);
    *mean = m;
    *rstd = rs;
    __m256 rv = _mm256_set1_ps(rs);
    for (i = 0; i < C8; i += 8) {
        __m256 h = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), mv), rv);
        h = _mm256_mul_ps(h, _mm256_loadu_ps(w + i));
        if (b) h = _mm256_add_ps(h, _mm256_loadu_ps(b + i));
        _mm256_storeu_ps(yr + i, h);
    }
    for (; i < C; i++) yr[i] = (xr[i] - m) * rs * w[i] + (b ? b[i] : 0.0f);
}

/* y = (x - mean) * rstd * w + b per row; mean and rstd (R floats each) are kept for the backward */
void sg_layernorm_fwd(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd, long R,
                      int C, float eps) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) ln_row(x + r * C, w, b, y + r * C, mean + r, rstd + r, C, eps);
}

/* A block's residual add and the LayerNorm after it, for the fused block (training.py):
 * x2 = x + h + hb (hb: the bias of the matmul h came from, may be NULL), y = LayerNorm(x2), and,
 * when xb is not NULL, xb = x2 + eb (the next residual's input with the next bias already in). */
static void residual_layernorm_fwd(const float *x, const float *h, const float *hb, float *x2, const float *eb, float *xb,
                               const float *w, const float *b, float *y, float *mean, float *rstd, long R, int C,
                               float eps) {
    int C8 = C & ~7;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) {
        const float *xr = x + r * C, *hr = h + r * C;
        float *x2r = x2 + r * C;
        int i = 0;
        for (; i < C8; i += 8) {
            __m256 v = _mm256_add_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(hr + i));
            if (hb) v = _mm256_add_ps(v, _mm256_loadu_ps(hb + i));
            _mm256_storeu_ps(x2r + i, v);
            if (xb) _mm256_storeu_ps(xb + r * C + i, eb ? _mm256_add_ps(v, _mm256_loadu_ps(eb + i)) : v);
        }
        for (; i < C; i++) {
            float v = xr[i] + hr[i] + (hb ? hb[i] : 0.0f);
            x2r[i] = v;
            if (xb) xb[r * C + i] = v + (eb ? eb[i] : 0.0f);
        }
        ln_row(x2r, w, b, y + r * C, mean + r, rstd + r, C, eps);
    }
}

#define LN_ROWS 32 /* rows per work item of the backward; dw and db are summed per item, then in item order */

/* dx from dy, plus add (a residual branch's gradient, NULL for none); dw (and db, when b had one)
 * summed over rows. Returns 0 if there was no memory for the per-item partial sums (2 C floats per
 * item of LN_ROWS rows). */
int sg_layernorm_bwd(const float *x, const float *w, const float *mean, const float *rstd, const float *dy,
                     const float *add, float *dx, float *dw, float *db, long R, int C) {
    long items = (R + LN_ROWS - 1) / LN_ROWS;
    int C8 = C & ~7;
    float *partial = malloc((size_t)items * 2 * C * sizeof(float));
    if (!partial) return 0;
#pragma omp parallel for schedule(static)
    for (long it = 0; it < items; it++) {
        float *pw = partial + it * 2 * C, *pb = pw + C;
        memset(pw, 0, 2 * C * sizeof(float));
        long r1 = (it + 1) * LN_ROWS < R ? (it + 1) * LN_ROWS : R;
        for (long r = it * LN_ROWS; r < r1; r++) {
            const float *xr = x + r * C, *gr = dy + r * C;
            float *dxr = dx + r * C;
            __m256 mv = _mm256_set1_ps(mean[r]), rv = _mm256_set1_ps(rstd[r]);
            __m256 sa = _mm256_setzero_ps(), sb = _mm256_setzero_ps();
            int i;
            for (i = 0; i < C8; i += 8) {
                __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), mv), rv);
                __m256 g = _mm256_loadu_ps(gr + i);
                __m256 gw = _mm256_mul_ps(g, _mm256_loadu_ps(w + i));
                sa = _mm256_add_ps(sa, gw);
                sb = _mm256_fmadd_ps(gw, xh, sb);
                _mm256_storeu_ps(pw + i, _mm256_fmadd_ps(g, xh, _mm256_loadu_ps(pw + i)));
                _mm256_storeu_ps(pb + i, _mm256_add_ps(g, _mm256_loadu_ps(pb + i)));
            }
            float a = hsum(sa), bb = hsum(sb);
            for (; i < C; i++) {
                float xh = (xr[i] - mean[r]) * rstd[r], gw = gr[i] * w[i];
                a += gw;
                bb += gw * xh;
                pw[i] += gr[i] * xh;
                pb[i] += gr[i];
            }
            a /= C;
            bb /= C;
            __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(bb);
            for (i = 0; i < C8; i += 8) {
                __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), mv), rv);
                __m256 gw = _mm256_mul_ps(_mm256_loadu_ps(gr + i), _mm256_loadu_ps(w + i));
                __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(gw, av), _mm256_mul_ps(xh, bv)), rv);
                if (add) d = _mm256_add_ps(d, _mm256_loadu_ps(add + r * C + i));
                _mm256_storeu_ps(dxr + i, d);
            }
            for (; i < C; i++) {
                float xh = (xr[i] - mean[r]) * rstd[r];
                dxr[i] = (gr[i] * w[i] - a - xh * bb) * rstd[r] + (add ? add[r * C + i] : 0.0f);
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < C; i++) {
        float sw = 0.0f, sb = 0.0f;
        for (long it = 0; it < items; it++) {
            sw += partial[it * 2 * C + i];
            sb += partial[it * 2 * C + C + i];
        }
        dw[i] = sw;
        if (db) db[i] = sb;
    }
    free(partial);
    return 1;
}

/* ---- AdamW, with the gradients' norm for clipping, over a model's tensors --------------------- */

#define OPT_CHUNK 8192 /* floats per work item; norms are summed per item, then in item order */

typedef struct {
    int t;
    long off, len;
} span;

/* the tensors cut into work items of at most OPT_CHUNK floats; NULL if there is no memory */
static span *spans_of(const long *n, int count, long *nspans) {
    long total = 0;
    for (int t = 0; t < count; t++) total += (n[t] + OPT_CHUNK - 1) / OPT_CHUNK;
    span *s = malloc((total ? total : 1) * sizeof(span));
    if (!s) return NULL;
    long k = 0;
    for (int t = 0; t < count; t++)
        for (long off = 0; off < n[t]; off += OPT_CHUNK)
            s[k++] = (span){t, off, n[t] - off < OPT_CHUNK ? n[t] - off : OPT_CHUNK};
    *nspans = total;
    return s;
}

/* *out = sum of g[t][i]^2 over all tensors, in double, the same bits on any thread count.
 * Returns 0 if there was no memory. */
int sg_sqnorm(float *const *g, const long *n, int count, int threads, double *out) {
    long ns;
    span *s = spans_of(n, count, &ns);
    double *part = malloc((ns ? ns : 1) * sizeof(double));
    if (!s || !part) {
        free(s);
        free(part);
        return 0;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long k = 0; k < ns; k++) {
        const float *x = g[s[k].t] + s[k].off;
        long len = s[k].len, i = 0;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        double tail = 0.0;
        for (; i + 16 <= len; i += 16) {
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            a0 = _mm256_fmadd_ps(x0, x0, a0);
            a1 = _mm256_fmadd_ps(x1, x1, a1);
        }
        for (; i < len; i++) tail += (double)x[i] * x[i];
        part[k] = (double)hsum(_mm256_add_ps(a0, a1)) + tail;
    }
    double total = 0.0;
    for (long k = 0; k < ns; k++) total += part[k];
    *out = total;
    free(s);
    free(part);
    return 1;
}

/* One AdamW step (PyTorch's torch.optim.AdamW, decoupled weight decay, no amsgrad) on every
 * tensor t, with its gradient scaled by gscale (the clipping factor):
 *   p *= 1 - lr wd;  m += (1 - b1)(g - m);  v = b2 v + (1 - b2) g^2;
 *   p -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps).
 * hp holds 6 doubles per tensor: lr, wd, b1, b2, eps, step (already counting this one).
 * Returns 0 if there was no memory. */
int sg_adamw(float *const *p, float *const *g, float *const *m, float *const *v, const long *n, const double *hp,
             int count, float gscale, int threads) {
    long ns;
    span *s = spans_of(n, count, &ns);
    if (!s) return 0;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long k = 0; k < ns; k++) {
        int t = s[k].t;
        const double *h = hp + 6 * t;
        float decay = (float)(1.0 - h[0] * h[1]), b1 = (float)h[2], b2 = (float)h[3];
        float step_size = (float)(h[0] / (1.0 - pow(h[2], h[5])));
        float rbc2 = (float)(1.0 / sqrt(1.0 - pow(h[3], h[5]))), eps = (float)h[4];
        float *pp = p[t] + s[k].off, *mm = m[t] + s[k].off, *vv = v[t] + s[k].off;
        const float *gg = g[t] + s[k].off;
        long len = s[k].len, i = 0;
        __m256 vdecay = _mm256_set1_ps(decay), v1b1 = _mm256_set1_ps(1.0f - b1), vb2 = _mm256_set1_ps(b2);
        __m256 v1b2 = _mm256_set1_ps(1.0f - b2), vss = _mm256_set1_ps(step_size), vr = _mm256_set1_ps(rbc2);
        __m256 veps = _mm256_set1_ps(eps), vgs = _mm256_set1_ps(gscale);
        for (; i + 8 <= len; i += 8) {
            __m256 gv = _mm256_mul_ps(_mm256_loadu_ps(gg + i), vgs);
            __m256 mv = _mm256_loadu_ps(mm + i), vv2 = _mm256_loadu_ps(vv + i);
            mv = _mm256_fmadd_ps(v1b1, _mm256_sub_ps(gv, mv), mv);
            vv2 = _mm256_fmadd_ps(vb2, vv2, _mm256_mul_ps(v1b2, _mm256_mul_ps(gv, gv)));
            __m256 denom = _mm256_fmadd_ps(_mm256_sqrt_ps(vv2), vr, veps);
            __m256 pv = _mm256_mul_ps(_mm256_loadu_ps(pp + i), vdecay);
            pv = _mm256_sub_ps(pv, _mm256_div_ps(_mm256_mul_ps(vss, mv), denom));
            _mm256_storeu_ps(mm + i, mv);
            _mm256_storeu_ps(vv + i, vv2);
            _mm256_storeu_ps(pp + i, pv);
        }
        for (; i < len; i++) {
            float gv = gg[i] * gscale;
            mm[i] += (1.0f - b1) * (gv - mm[i]);
            vv[i] = b2 * vv[i] + (1.0f - b2) * gv * gv;
            pp[i] = pp[i] * decay - step_size * mm[i] / (sqrtf(vv[i]) * rbc2 + eps);
        }
    }
    free(s);
    return 1;
}

/* ---- a whole GPT-2 block, forward and backward, with MKL's sgemm ------------------------------
 * The matrix products go to the BLAS that torch itself uses (its Fortran sgemm_, whose address
 * training.py hands over): the same products torch.mm would run, called from here, so that a
 * block is one call from Python and a split training step's threads never wait for each other's
 * Python in between (the GIL). All matrices are row-major. */

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
static sgemm_fn sgemm_ptr;

void sg_set_sgemm(void *fn) { sgemm_ptr = (sgemm_fn)fn; }

/* Y (M, N) = X (M, K) W (N, K)^T + beta Y */
static void mm_xwt(const float *X, const float *W, float *Y, int M, int N, int K, float beta) {
    const float one = 1.0f;
    sgemm_ptr("T", "N", &N, &M, &K, &one, W, &K, X, &K, &beta, Y, &N);
}

/* Y (M, N) = A (M, K) B (K, N) */
static void mm_ab(const float *A, const float *B, float *Y, int M, int N, int K) {
    const float one = 1.0f, zero = 0.0f;
    sgemm_ptr("N", "N", &N, &M, &K, &one, B, &N, A, &K, &zero, Y, &N);
}

/* Y (N, K) = A (M, N)^T B (M, K): a weight's gradient */
static void mm_atb(const float *A, const float *B, float *Y, int M, int N, int K) {
    const float one = 1.0f, zero = 0.0f;
    sgemm_ptr("N", "T", &K, &N, &M, &one, B, &K, A, &N, &zero, Y, &K);
}

/* out[N] = column sums of a (M, N), per item of COLSUM_ROWS rows, then in item order */
static int colsum(const float *a, long M, int N, float *out) {
    long items = (M + COLSUM_ROWS - 1) / COLSUM_ROWS;
    float *partial = calloc((size_t)items * N, sizeof(float));
    if (!partial) return 0;
#pragma omp parallel for schedule(static)
    for (long it = 0; it < items; it++) {
        long r1 = (it + 1) * COLSUM_ROWS < M ? (it + 1) * COLSUM_ROWS : M;
        float *pd = partial + it * N;
        for (long r = it * COLSUM_ROWS; r < r1; r++)
            for (int i = 0; i < N; i++) pd[i] += a[r * N + i];
    }
    sum_partials(partial, items, N, out);
    free(partial);
    return 1;
}

/* The block's 12 parameters, in model.Block's order (ln_1 w, b; c_attn W, b; attn c_proj W, b;
 * ln_2 w, b; c_fc W, b; mlp c_proj W, b), biases NULL where the model has none. */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, PROJ_W, PROJ_B, LN2_W, LN2_B, FC_W, FC_B, MP_W, MP_B };

/* What the forward keeps for the backward, carved in this order out of one buffer of
 * sg_block_saved_floats() floats. */
typedef struct {
    float *ln1, *mean1, *rstd1, *qkv, *att, *lse, *x2, *ln2, *mean2, *rstd2, *u, *g;
} block_saved;

static block_saved carve_saved(float *m, long M, int C, int F, int B, int H, int T) {
    block_saved s;
    s.ln1 = m; m += M * C;
    s.mean1 = m; m += M;
    s.rstd1 = m; m += M;
    s.qkv = m; m += 3 * M * C;
    s.att = m; m += M * C;
    s.lse = m; m += (long)B * H * T;
    s.x2 = m; m += M * C;
    s.ln2 = m; m += M * C;
    s.mean2 = m; m += M;
    s.rstd2 = m; m += M;
    s.u = m; m += M * F;
    s.g = m;
    return s;
}

long sg_block_saved_floats(int B, int T, int C, int F, int H) {
    long M = (long)B * T;
    return 7 * M * C + 4 * M + (long)B * H * T + 2 * M * F;
}

/* y (B, T, C) = the block on x; saved: sg_block_saved_floats() floats kept for the backward.
 * Returns 0 if there was no memory for attention's scratch. */
int sg_block_fwd(const float *x, float *const *prm, float *y, float *saved, int B, int T, int C, int F, int H,
                 float eps1, float eps2) {
    long M = (long)B * T;
    block_saved s = carve_saved(saved, M, C, F, B, H, T);
    sg_layernorm_fwd(x, prm[LN1_W], prm[LN1_B], s.ln1, s.mean1, s.rstd1, M, C, eps1);
    if (prm[ATTN_B]) {
#pragma omp parallel for schedule(static)
        for (long r = 0; r < M; r++) memcpy(s.qkv + r * 3 * C, prm[ATTN_B], 3 * C * sizeof(float));
    }
    mm_xwt(s.ln1, prm[ATTN_W], s.qkv, (int)M, 3 * C, C, prm[ATTN_B] ? 1.0f : 0.0f);
    if (!sg_attn_fwd(s.qkv, s.att, s.lse, B, T, C, H, 1.0f / sqrtf((float)(C / H)))) return 0;
    /* h = att proj_W^T goes into y for now; y then becomes x2 + mp_b, and the MLP adds onto it */
    mm_xwt(s.att, prm[PROJ_W], y, (int)M, C, C, 0.0f);
    residual_layernorm_fwd(x, y, prm[PROJ_B], s.x2, prm[MP_B], y, prm[LN2_W], prm[LN2_B], s.ln2, s.mean2, s.rstd2,
                              M, C, eps2);
    mm_xwt(s.ln2, prm[FC_W], s.u, (int)M, F, C, 0.0f);
    bias_gelu_fwd(s.u, prm[FC_B], s.g, M, F);
    mm_xwt(s.g, prm[MP_W], y, (int)M, C, F, 1.0f);
    return 1;
}

/* The gradients of sg_block_fwd: dx (B, T, C) and, for each parameter i with grad[i] not NULL,
 * its gradient into grad[i] (dy: the gradient of y). Returns 0 if there was no memory. */
int sg_block_bwd(const float *x, float *const *prm, const float *saved_, const float *dy, float *dx,
                 float *const *grad, int B, int T, int C, int F, int H) {
    long M = (long)B * T;
    block_saved s = carve_saved((float *)saved_, M, C, F, B, H, T);
    float *work = malloc(((size_t)M * F + 6 * (size_t)M * C + C) * sizeof(float));
    if (!work) return 0;
    float *du = work, *dln2 = du + M * F, *dx2 = dln2 + M * C, *datt = dx2 + M * C, *dqkv = datt + M * C;
    float *dln1 = dln2;            /* dln2 is done with by then */
    float *unused = dqkv + 3 * M * C; /* a frozen LayerNorm weight's gradient */
    int ok = 1;
    /* MLP: y = x2 + gelu(ln2 fc_W^T + fc_b) mp_W^T + mp_b */
    if (grad[MP_W]) mm_atb(dy, s.g, grad[MP_W], (int)M, C, F);
    if (grad[MP_B]) ok &= colsum(dy, M, C, grad[MP_B]);
    mm_ab(dy, prm[MP_W], du, (int)M, F, C);
    ok &= gelu_bwd_db(s.u, du, du, grad[FC_B], M, F);
    if (grad[FC_W]) mm_atb(du, s.ln2, grad[FC_W], (int)M, F, C);
    mm_ab(du, prm[FC_W], dln2, (int)M, C, F);
    /* ln_2 and its residual: dx2 = dy + ln_2's backward */
    ok &= sg_layernorm_bwd(s.x2, prm[LN2_W], s.mean2, s.rstd2, dln2, dy, dx2, grad[LN2_W] ? grad[LN2_W] : unused,
                          grad[LN2_B], M, C);
    /* attention: x2 = x + attention(ln1 attn_W^T + attn_b) proj_W^T + proj_b */
    if (grad[PROJ_W]) mm_atb(dx2, s.att, grad[PROJ_W], (int)M, C, C);
    if (grad[PROJ_B]) ok &= colsum(dx2, M, C, grad[PROJ_B]);
    mm_ab(dx2, prm[PROJ_W], datt, (int)M, C, C);
    ok &= sg_attn_bwd(s.qkv, s.att, datt, s.lse, dqkv, B, T, C, H, 1.0f / sqrtf((float)(C / H)));
    if (grad[ATTN_W]) mm_atb(dqkv, s.ln1, grad[ATTN_W], (int)M, 3 * C, C);
    if (grad[ATTN_B]) ok &= colsum(dqkv, M, 3 * C, grad[ATTN_B]);
    mm_ab(dqkv, prm[ATTN_W], dln1, (int)M, C, 3 * C);
    ok &= sg_layernorm_bwd(x, prm[LN1_W], s.mean1, s.rstd1, dln1, dx2, dx, grad[LN1_W] ? grad[LN1_W] : unused,
                          grad[LN1_B], M, C);
    free(work);
    return ok;
}

/* ---- the whole model with its loss, for a training step ---------------------------------------
 * Token and position embeddings, the L blocks above, the final LayerNorm, the output head tied to
 * the token embedding and the mean cross-entropy over the targets that are not IGNORE_INDEX: one
 * call each way, so that the step spends no time in Python or autograd between layers. */

#define IGNORE_INDEX (-100)

typedef struct {
    float *xs;            /* (L + 1, M, C): each block's input, then the last block's output */
    float *const *saved;  /* L blocks' sg_block_saved_floats() each */
    float *lnf, *lnf_mean, *lnf_rstd;
    float *probs;         /* (M, V) softmax of the logits */
} gpt_saved;

/* The floats of what the forward keeps, in L + 2 buffers: bufs[0] the blocks' inputs ((L + 1) M C),
 * bufs[1..L] one block's sg_block_saved_floats() each, bufs[L + 1] the head's (M C + 2 M + M V).
 * Separate buffers stay under glibc's largest heap block at the sizes of CPU training, where one
 * buffer of all of them would be mapped fresh (and faulted in page by page) every step. */
long sg_gpt_head_floats(int B, int T, int C, int V) {
    long M = (long)B * T;
    return M * C + 2 * M + M * V;
}

static gpt_saved carve_gpt(float *const *bufs, int B, int T, int C, int L) {
    long M = (long)B * T;
    gpt_saved s;
    s.xs = bufs[0];
    s.saved = bufs + 1;
    s.lnf = bufs[L + 1];
    s.lnf_mean = s.lnf + M * C;
    s.lnf_rstd = s.lnf_mean + M;
    s.probs = s.lnf_rstd + M;
    return s;
}

/* The mean loss into *loss and the number of counted targets into *count. params: wte (V, C),
 * wpe (>= T, C), then 12 per block (as for sg_block_fwd), then ln_f's weight and bias (bias may
 * be NULL). Returns 1, 0 without memory, -1 for a target outside [0, V) that is not IGNORE_INDEX. */
int sg_gpt_fwd(const long *idx, const long *tgt, int B, int T, int C, int V, int L, int F, int H, float eps,
               float *const *params, float *const *bufs, double *loss, long *count) {
    long M = (long)B * T;
    for (long r = 0; r < M; r++)
        if (tgt[r] != IGNORE_INDEX && (tgt[r] < 0 || tgt[r] >= V)) return -1;
    gpt_saved s = carve_gpt(bufs, B, T, C, L);
    const float *wte = params[0], *wpe = params[1];
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) {
        const float *e = wte + idx[r] * C, *p = wpe + (r % T) * C;
        for (int i = 0; i < C; i++) s.xs[r * C + i] = e[i] + p[i];
    }
    for (int l = 0; l < L; l++)
        if (!sg_block_fwd(s.xs + l * M * C, params + 2 + 12 * l, s.xs + (l + 1) * M * C, s.saved[l], B, T, C, F, H,
                          eps, eps))
            return 0;
    float *const *lnf = params + 2 + 12 * L;
    sg_layernorm_fwd(s.xs + L * M * C, lnf[0], lnf[1], s.lnf, s.lnf_mean, s.lnf_rstd, M, C, eps);
    mm_xwt(s.lnf, wte, s.probs, (int)M, V, C, 0.0f);
    double total = 0.0;
    long n = 0;
    for (long r = 0; r < M; r++) { /* softmax rows; -log p[target] = lse - logit[target], summed in row order */
        float z = tgt[r] != IGNORE_INDEX ? s.probs[r * V + tgt[r]] : 0.0f;
        float lse = softmax_row(s.probs + r * V, V);
        if (tgt[r] != IGNORE_INDEX) {
            total += (double)lse - z;
            n++;
        }
    }
    *loss = n ? total / n : NAN;
    *count = n;
    return 1;
}

/* Gradients of scale * (the forward's summed loss over counted targets) (scale = dloss / count)
 * into grads, laid out as params (NULL where none is wanted; wte's gathers the head's and the
 * embedding's). Returns 0 if there was no memory. */
int sg_gpt_bwd(const long *idx, const long *tgt, int B, int T, int C, int V, int L, int F, int H, float scale,
               float *const *params, float *const *bufs, float *const *grads, int n_positions) {
    long M = (long)B * T;
    gpt_saved s = carve_gpt(bufs, B, T, C, L);
    float *work = malloc(((size_t)M * V + 2 * (size_t)M * C + C) * sizeof(float));
    if (!work) return 0;
    float *dlogits = work, *dx = dlogits + M * V, *dprev = dx + M * C, *unused = dprev + M * C;
    const float *wte = params[0];
    int ok = 1;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) {
        float *d = dlogits + r * V;
        const float *p = s.probs + r * V;
        if (tgt[r] == IGNORE_INDEX) {
            memset(d, 0, V * sizeof(float));
            continue;
        }
        for (int i = 0; i < V; i++) d[i] = p[i] * scale;
        d[tgt[r]] -= scale;
    }
    if (grads[0]) mm_atb(dlogits, s.lnf, grads[0], (int)M, V, C); /* the head's share of wte's gradient */
    mm_ab(dlogits, wte, dprev, (int)M, C, V);
    float *const *lnf = params + 2 + 12 * L, *const *dlnf = grads + 2 + 12 * L;
    ok &= sg_layernorm_bwd(s.xs + L * M * C, lnf[0], s.lnf_mean, s.lnf_rstd, dprev, NULL, dx,
                           dlnf[0] ? dlnf[0] : unused, dlnf[1], M, C);
    for (int l = L - 1; l >= 0 && ok; l--) {
        ok &= sg_block_bwd(s.xs + l * M * C, params + 2 + 12 * l, s.saved[l], dx, dprev, grads + 2 + 12 * l, B, T,
                           C, F, H);
        float *t = dx;
        dx = dprev;
        dprev = t;
    }
    /* the embeddings: rows added in order, so the sums do not depend on the thread count */
    if (ok && grads[0]) {
        for (long r = 0; r < M; r++) {
            float *g = grads[0] + idx[r] * C;
            for (int i = 0; i < C; i++) g[i] += dx[r * C + i];
        }
    }
    if (ok && grads[1]) {
        memset(grads[1], 0, (size_t)n_positions * C * sizeof(float));
        for (long r = 0; r < M; r++) {
            float *g = grads[1] + (r % T) * C;
            for (int i = 0; i < C; i++) g[i] += dx[r * C + i];
        }
    }
    free(work);
    return ok;
}
