/* LayerNorm over rows of C floats, forward and backward: the op's one implementation, for training
 * (on OpenMP's threads) and for decoding (block.c's decode step calls layernorm_row per row). */
#include "kernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* one row: y = (x - mean) * rstd * w + b; mean and rstd are kept for the backward */
void layernorm_row(const float *xr, const float *w, const float *b, float *yr, float *mean, float *rstd, int C,
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
    for (long r = 0; r < R; r++) layernorm_row(x + r * C, w, b, y + r * C, mean + r, rstd + r, C, eps);
}

/* A block's residual add and the LayerNorm after it, for the training block (block.c):
 * x2 = x + h + hb (hb: the bias of the matmul h came from, may be NULL), y = LayerNorm(x2), and,
 * when xb is not NULL, xb = x2 + eb (the next residual's input with the next bias already in). */
void residual_layernorm_fwd(const float *x, const float *h, const float *hb, float *x2, const float *eb, float *xb,
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
        layernorm_row(x2r, w, b, y + r * C, mean + r, rstd + r, C, eps);
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
