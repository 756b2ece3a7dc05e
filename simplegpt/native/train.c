/* simplegpt's CPU kernels for training (see simplegpt/native/__init__.py): GPT-2's tanh-GELU and
 * causal self-attention, forward and backward, in fewer passes over memory than PyTorch's CPU
 * kernels take at small-model sizes.
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

/* dx = dy * gelu'(x). With s the gate above, gelu(h) = h s and
 * gelu'(h) = s + h s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 h^2). */
void sg_gelu_bwd(const float *x, const float *dy, float *dx, long n) {
    long chunks = (n + CHUNK - 1) / CHUNK;
    const float c2 = -GELU_K, c3 = -GELU_K * 3.0f * GELU_A;
#pragma omp parallel for schedule(static)
    for (long c = 0; c < chunks; c++) {
        long i = c * CHUNK, end = i + CHUNK < n ? i + CHUNK : n;
        for (; i + 8 <= end; i += 8) {
            __m256 h = _mm256_loadu_ps(x + i), s = gelu_gate8(h);
            __m256 h2 = _mm256_mul_ps(h, h);
            __m256 dz = _mm256_fmadd_ps(_mm256_set1_ps(c3), h2, _mm256_set1_ps(c2)); /* 2 dz/dh */
            __m256 hs1s = _mm256_mul_ps(_mm256_mul_ps(h, s), _mm256_sub_ps(_mm256_set1_ps(1.0f), s));
            __m256 g = _mm256_fmadd_ps(hs1s, dz, s);
            _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), g));
        }
        for (; i < end; i++) {
            float h = x[i], s = gelu_gate1(h);
            dx[i] = dy[i] * (s + h * s * (1.0f - s) * (c2 + c3 * h * h));
        }
    }
}

/* ---- causal self-attention over a fused (B, T, 3C) q|k|v buffer -------------------------------
 * Head h of row b reads q, k, v at columns h D, C + h D, 2C + h D of each token (the layout of
 * c_attn's output), so no transposes or copies are needed, and writes its output at columns h D
 * of a (B, T, C) buffer (the layout c_proj reads). Every (b, h) pair is independent: one OpenMP
 * work item each, so results do not depend on the thread count. D must be a multiple of 8. */

typedef struct {
    float *kt, *vt; /* (D, Tp): the head's keys and values transposed, zero-padded to Tp columns */
    float *p;       /* Tp: one row of scores / probabilities */
    float *dk, *dv; /* (T, D): gradient accumulators (backward) */
} scratch;

static int scratch_alloc(scratch *s, int T, int D, int backward) {
    int Tp = (T + 7) & ~7;
    size_t n = (size_t)2 * D * Tp + Tp + (backward ? (size_t)2 * T * D : 0);
    float *m = aligned_alloc(32, ((n * sizeof(float)) + 31) & ~(size_t)31);
    if (!m) return 0;
    memset(m, 0, n * sizeof(float));
    s->kt = m;
    s->vt = m + (size_t)D * Tp;
    s->p = m + (size_t)2 * D * Tp;
    s->dk = backward ? s->p + Tp : NULL;
    s->dv = backward ? s->dk + (size_t)T * D : NULL;
    return 1;
}

/* transpose T rows of D floats (stride ld) into (D, Tp) */
static void transpose_in(const float *src, long ld, float *dst, int T, int D, int Tp) {
    for (int t = 0; t < T; t++)
        for (int d = 0; d < D; d++) dst[(size_t)d * Tp + t] = src[(size_t)t * ld + d];
}

/* out[j] = scale * dot(q, column j of mt) for j in 0..n (rounded up to 8): mt is (D, Tp) */
static inline void dots(const float *q, const float *mt, int D, int Tp, int n, float scale, float *out) {
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
        int d = 0;
        for (; d + 2 <= D; d += 2) {
            const float *r0 = mt + (size_t)d * Tp + j, *r1 = r0 + Tp;
            __m256 q0 = _mm256_set1_ps(q[d]), q1 = _mm256_set1_ps(q[d + 1]);
            a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(r0), a0);
            a1 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(r0 + 8), a1);
            b0 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(r1), b0);
            b1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(r1 + 8), b1);
        }
        __m256 sc = _mm256_set1_ps(scale);
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_add_ps(a0, b0), sc));
        _mm256_storeu_ps(out + j + 8, _mm256_mul_ps(_mm256_add_ps(a1, b1), sc));
    }
    for (; j < n; j += 8) {
        __m256 a0 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps();
        for (int d = 0; d + 2 <= D; d += 2) {
            const float *r0 = mt + (size_t)d * Tp + j;
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(q[d]), _mm256_loadu_ps(r0), a0);
            b0 = _mm256_fmadd_ps(_mm256_set1_ps(q[d + 1]), _mm256_loadu_ps(r0 + Tp), b0);
        }
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_add_ps(a0, b0), _mm256_set1_ps(scale)));
    }
}

/* acc (D floats) += sum over j < n of w[j] * rows[j] (rows D floats apart by ld) */
static inline void weighted_rows(const float *w, const float *rows, long ld, int n, int D, float *acc) {
    for (int d = 0; d < D; d += 8) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int j = 0;
        for (; j + 2 <= n; j += 2) {
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(rows + (size_t)j * ld + d), a0);
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(w[j + 1]), _mm256_loadu_ps(rows + (size_t)(j + 1) * ld + d), a1);
        }
        if (j < n) a0 = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(rows + (size_t)j * ld + d), a0);
        _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), _mm256_add_ps(a0, a1)));
    }
}

/* rows[j] (D floats, ld apart) += w[j] * v for j < n */
static inline void scatter_rows(const float *w, const float *v, float *rows, int n, int D) {
    for (int j = 0; j < n; j++) {
        __m256 wj = _mm256_set1_ps(w[j]);
        float *r = rows + (size_t)j * D;
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(r + d, _mm256_fmadd_ps(wj, _mm256_loadu_ps(v + d), _mm256_loadu_ps(r + d)));
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
        p[j] = __builtin_expf(p[j] - mx);
        sum += p[j];
    }
    float inv = 1.0f / sum;
    __m256 iv = _mm256_set1_ps(inv);
    for (j = 0; j < n8; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), iv));
    for (; j < n; j++) p[j] *= inv;
    return mx + logf(sum);
}

/* out (B, T, C) = softmax(q k^T * scale, causal) v per head; lse (B, H, T) keeps each row's
 * log-sum-exp for the backward pass. Returns 0 if scratch memory could not be allocated. */
int sg_attn_fwd(const float *qkv, float *out, float *lse, int B, int T, int C, int H, float scale) {
    int D = C / H, Tp = (T + 7) & ~7, failed = 0;
    long ld = 3L * C;
#pragma omp parallel reduction(| : failed)
    {
        scratch s = {0};
        int ok = scratch_alloc(&s, T, D, 0);
        /* every thread must reach the work-sharing loop, so one that has no memory skips its items */
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            if (!ok) {
                failed = 1;
                continue;
            }
            {
                int b = bh / H, h = bh % H;
                const float *base = qkv + (size_t)b * T * ld + (size_t)h * D;
                transpose_in(base + C, ld, s.kt, T, D, Tp);
                float *o = out + (size_t)b * T * C + (size_t)h * D, *l = lse + (size_t)bh * T;
                for (int i = 0; i < T; i++) {
                    dots(base + (size_t)i * ld, s.kt, D, Tp, i + 1, scale, s.p);
                    l[i] = softmax_row(s.p, i + 1);
                    float *oi = o + (size_t)i * C;
                    memset(oi, 0, D * sizeof(float));
                    weighted_rows(s.p, base + 2 * C, ld, i + 1, D, oi);
                }
            }
        }
        if (ok) free(s.kt);
    }
    return !failed;
}

/* The gradients of sg_attn_fwd: dqkv (B, T, 3C) from dout (B, T, C), recomputing the
 * probabilities from q, k and lse row by row (no (T, T) matrix is kept). */
int sg_attn_bwd(const float *qkv, const float *out, const float *dout, const float *lse, float *dqkv, int B, int T,
                int C, int H, float scale) {
    int D = C / H, Tp = (T + 7) & ~7, failed = 0;
    long ld = 3L * C;
#pragma omp parallel reduction(| : failed)
    {
        scratch s = {0};
        float *dp = aligned_alloc(32, ((size_t)Tp * sizeof(float) + 31) & ~(size_t)31);
        int have = scratch_alloc(&s, T, D, 1), ok = have && dp;
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            if (!ok) {
                failed = 1;
                continue;
            }
            {
                int b = bh / H, h = bh % H;
                const float *base = qkv + (size_t)b * T * ld + (size_t)h * D;
                const float *o = out + (size_t)b * T * C + (size_t)h * D, *g = dout + (size_t)b * T * C + (size_t)h * D;
                const float *l = lse + (size_t)bh * T;
                float *dbase = dqkv + (size_t)b * T * ld + (size_t)h * D;
                transpose_in(base + C, ld, s.kt, T, D, Tp);
                transpose_in(base + 2 * C, ld, s.vt, T, D, Tp);
                memset(s.dk, 0, (size_t)2 * T * D * sizeof(float));
                for (int i = 0; i < T; i++) {
                    const float *qi = base + (size_t)i * ld, *gi = g + (size_t)i * C, *oi = o + (size_t)i * C;
                    int n = i + 1, n8 = (n + 7) & ~7;
                    dots(qi, s.kt, D, Tp, n, scale, s.p);   /* scores */
                    dots(gi, s.vt, D, Tp, n, 1.0f, dp);      /* dP = dO_i . V_j */
                    float delta = 0.0f;                      /* dO_i . O_i = sum_j P_ij dP_ij */
                    for (int d = 0; d < D; d++) delta += gi[d] * oi[d];
                    __m256 lv = _mm256_set1_ps(l[i]), dv8 = _mm256_set1_ps(delta), sc = _mm256_set1_ps(scale);
                    for (int j = 0; j < n8; j += 8) {
                        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s.p + j), lv));
                        _mm256_storeu_ps(s.p + j, p);
                        /* dS = P (dP - delta), times scale for the q.k products */
                        _mm256_storeu_ps(dp + j, _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv8)), sc));
                    }
                    float *dqi = dbase + (size_t)i * ld;
                    memset(dqi, 0, D * sizeof(float));
                    weighted_rows(dp, base + C, ld, n, D, dqi);  /* dQ_i = sum_j dS_ij K_j */
                    scatter_rows(dp, qi, s.dk, n, D);            /* dK_j += dS_ij Q_i */
                    scatter_rows(s.p, gi, s.dv, n, D);           /* dV_j += P_ij dO_i */
                }
                for (int t = 0; t < T; t++) {
                    memcpy(dbase + (size_t)t * ld + C, s.dk + (size_t)t * D, D * sizeof(float));
                    memcpy(dbase + (size_t)t * ld + 2 * C, s.dv + (size_t)t * D, D * sizeof(float));
                }
            }
        }
        free(dp);
        if (have) free(s.kt);
    }
    return !failed;
}

/* ---- LayerNorm over rows of C floats ------------------------------------------------------- */

/* y = (x - mean) * rstd * w + b per row; mean and rstd (R floats each) are kept for the backward */
void sg_layernorm_fwd(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd, long R,
                      int C, float eps) {
    int C8 = C & ~7;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) {
        const float *xr = x + r * C;
        float *yr = y + r * C;
        __m256 s = _mm256_setzero_ps();
        int i;
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
        mean[r] = m;
        rstd[r] = rs;
        __m256 rv = _mm256_set1_ps(rs);
        for (i = 0; i < C8; i += 8) {
            __m256 h = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), mv), rv);
            h = _mm256_mul_ps(h, _mm256_loadu_ps(w + i));
            if (b) h = _mm256_add_ps(h, _mm256_loadu_ps(b + i));
            _mm256_storeu_ps(yr + i, h);
        }
        for (; i < C; i++) yr[i] = (xr[i] - m) * rs * w[i] + (b ? b[i] : 0.0f);
    }
}

#define LN_ROWS 32 /* rows per work item of the backward; dw and db are summed per item, then in item order */

/* dx from dy; dw (and db, when b had one) summed over rows. partial: 2 C floats per item of LN_ROWS rows */
void sg_layernorm_bwd(const float *x, const float *w, const float *mean, const float *rstd, const float *dy, float *dx,
                      float *dw, float *db, float *partial, long R, int C) {
    long items = (R + LN_ROWS - 1) / LN_ROWS;
    int C8 = C & ~7;
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
                __m256 d = _mm256_sub_ps(_mm256_sub_ps(gw, av), _mm256_mul_ps(xh, bv));
                _mm256_storeu_ps(dxr + i, _mm256_mul_ps(d, rv));
            }
            for (; i < C; i++) {
                float xh = (xr[i] - mean[r]) * rstd[r];
                dxr[i] = (gr[i] * w[i] - a - xh * bb) * rstd[r];
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
}
