/* LayerNorm over rows of C floats, forward and backward: the op's one implementation, for training
 * (on OpenMP's threads) and for decoding (block.c's decode step calls layernorm_row per row). */
#include "kernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* one row: y = (x - mean) * rstd * w + b; mean and rstd are kept for the backward */
void layernorm_row(const float *xr, const float *w, const float *b, float *yr, float *mean, float *rstd, int C,
                   float eps) {
    int CV = C - C % VF, i;
    vf s = vf_zero();
    for (i = 0; i < CV; i += VF) s = vf_add(s, vf_load(xr + i));
    float m = vf_sum(s);
    for (; i < C; i++) m += xr[i];
    m /= C;
    vf mv = vf_set1(m), v = vf_zero();
    for (i = 0; i < CV; i += VF) {
        vf d = vf_sub(vf_load(xr + i), mv);
        v = vf_fmadd(d, d, v);
    }
    float var = vf_sum(v);
    for (; i < C; i++) var += (xr[i] - m) * (xr[i] - m);
    float rs = 1.0f / sqrtf(var / C + eps);
    *mean = m;
    *rstd = rs;
    vf rv = vf_set1(rs);
    for (i = 0; i < CV; i += VF) {
        vf h = vf_mul(vf_mul(vf_sub(vf_load(xr + i), mv), rv), vf_load(w + i));
        if (b) h = vf_add(h, vf_load(b + i));
        vf_store(yr + i, h);
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
    int CV = C - C % VF;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) {
        const float *xr = x + r * C, *hr = h + r * C;
        float *x2r = x2 + r * C;
        int i = 0;
        for (; i < CV; i += VF) {
            vf v = vf_add(vf_load(xr + i), vf_load(hr + i));
            if (hb) v = vf_add(v, vf_load(hb + i));
            vf_store(x2r + i, v);
            if (xb) vf_store(xb + r * C + i, eb ? vf_add(v, vf_load(eb + i)) : v);
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
    int CV = C - C % VF;
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
            vf mv = vf_set1(mean[r]), rv = vf_set1(rstd[r]);
            vf sa = vf_zero(), sb = vf_zero();
            int i;
            for (i = 0; i < CV; i += VF) {
                vf xh = vf_mul(vf_sub(vf_load(xr + i), mv), rv);
                vf g = vf_load(gr + i);
                vf gw = vf_mul(g, vf_load(w + i));
                sa = vf_add(sa, gw);
                sb = vf_fmadd(gw, xh, sb);
                vf_store(pw + i, vf_fmadd(g, xh, vf_load(pw + i)));
                vf_store(pb + i, vf_add(g, vf_load(pb + i)));
            }
            float a = vf_sum(sa), bb = vf_sum(sb);
            for (; i < C; i++) {
                float xh = (xr[i] - mean[r]) * rstd[r], gw = gr[i] * w[i];
                a += gw;
                bb += gw * xh;
                pw[i] += gr[i] * xh;
                pb[i] += gr[i];
            }
            a /= C;
            bb /= C;
            vf av = vf_set1(a), bv = vf_set1(bb);
            for (i = 0; i < CV; i += VF) {
                vf xh = vf_mul(vf_sub(vf_load(xr + i), mv), rv);
                vf gw = vf_mul(vf_load(gr + i), vf_load(w + i));
                vf d = vf_mul(vf_sub(vf_sub(gw, av), vf_mul(xh, bv)), rv);
                if (add) d = vf_add(d, vf_load(add + r * C + i));
                vf_store(dxr + i, d);
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
