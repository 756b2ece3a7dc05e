/* RMSNorm over rows of C floats (Llama's, and QK-norm's over each head's D floats), forward and
 * backward, with or without a gain: y = x / sqrt(mean(x^2) + eps) * w, on OpenMP's threads. */
#include "kernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* one row: y = x * rstd * w (w NULL: no gain); rstd is kept for the backward (also the decode
 * step's, llama_decode.c) */
void rmsnorm_row(const float *xr, const float *w, float *yr, float *rstd, int C, float eps) {
    int CV = C - C % VF, i;
    vf s = vf_zero();
    for (i = 0; i < CV; i += VF) {
        vf x = vf_load(xr + i);
        s = vf_fmadd(x, x, s);
    }
    float ss = vf_sum(s);
    for (; i < C; i++) ss += xr[i] * xr[i];
    float rs = 1.0f / sqrtf(ss / C + eps);
    *rstd = rs;
    vf rv = vf_set1(rs);
    for (i = 0; i < CV; i += VF) {
        vf h = vf_mul(vf_load(xr + i), rv);
        vf_store(yr + i, w ? vf_mul(h, vf_load(w + i)) : h);
    }
    for (; i < C; i++) yr[i] = xr[i] * rs * (w ? w[i] : 1.0f);
}

/* The rows of the strided kernels: R = N M rows of C floats, row r at (r / M) ld + (r % M) C of its
 * tensor (ld its row-group stride): a contiguous (R, C) tensor is M = 1, ld = C; the M heads of each
 * token's queries in a fused q|k|v product (QK-norm) are M = H, ld = the product's width. */
#define ROW(p, ld, r, M, C) ((p) + ((r) / (M)) * (ld) + ((r) % (M)) * (long)(C))

/* y = RMSNorm of each row of x with gain w (C) or none (NULL), x and y through their row-group
 * strides ldx and ldy (see ROW; y may be x); rstd (N M) is kept for the backward */
void sg_rmsnorm_fwd_ld(const float *x, long ldx, const float *w, float *y, long ldy, float *rstd, long N, int M, int C,
                       float eps) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < N * M; r++) rmsnorm_row(ROW(x, ldx, r, M, C), w, ROW(y, ldy, r, M, C), rstd + r, C, eps);
}

/* y (R, C) = RMSNorm of each row of x (R, C) contiguous */
void sg_rmsnorm_fwd(const float *x, const float *w, float *y, float *rstd, long R, int C, float eps) {
    sg_rmsnorm_fwd_ld(x, C, w, y, C, rstd, R, 1, C, eps);
}

#define RMS_ROWS 32 /* rows per work item of the backward; dw is summed per item, then in item order */

/* dx from dy, and, when dw is not NULL, dw (C) summed over rows (w must then be given); x, dy and dx
 * through their row-group strides (see ROW; dx may be dy: each row is read before it is written).
 * With xh = x rstd and gw = dy w: dx = rstd (gw - xh mean(gw xh)), dw = sum over rows of dy xh.
 * Returns 0 if there was no memory for the per-item partial sums (C floats per RMS_ROWS rows). */
int sg_rmsnorm_bwd_ld(const float *x, long ldx, const float *w, const float *rstd, const float *dy, long ldy, float *dx,
                      long ldd, float *dw, long N, int M, int C) {
    long R = N * M, items = (R + RMS_ROWS - 1) / RMS_ROWS;
    int CV = C - C % VF;
    float *partial = dw ? malloc((size_t)items * C * sizeof(float)) : NULL;
    if (dw && !partial) return 0;
#pragma omp parallel for schedule(static)
    for (long it = 0; it < items; it++) {
        float *pw = partial ? partial + it * C : NULL;
        if (pw) memset(pw, 0, C * sizeof(float));
        long r1 = (it + 1) * RMS_ROWS < R ? (it + 1) * RMS_ROWS : R;
        for (long r = it * RMS_ROWS; r < r1; r++) {
            const float *xr = ROW(x, ldx, r, M, C), *gr = ROW(dy, ldy, r, M, C);
            float *dxr = ROW(dx, ldd, r, M, C), rs = rstd[r];
            vf rv = vf_set1(rs), sb = vf_zero();
            int i;
            for (i = 0; i < CV; i += VF) {
                vf xh = vf_mul(vf_load(xr + i), rv), g = vf_load(gr + i);
                sb = vf_fmadd(w ? vf_mul(g, vf_load(w + i)) : g, xh, sb);
                if (pw) vf_store(pw + i, vf_fmadd(g, xh, vf_load(pw + i)));
            }
            float bb = vf_sum(sb);
            for (; i < C; i++) {
                float xh = xr[i] * rs;
                bb += gr[i] * (w ? w[i] : 1.0f) * xh;
                if (pw) pw[i] += gr[i] * xh;
            }
            bb /= C;
            vf bv = vf_set1(bb);
            for (i = 0; i < CV; i += VF) {
                vf xh = vf_mul(vf_load(xr + i), rv), g = vf_load(gr + i);
                vf gw = w ? vf_mul(g, vf_load(w + i)) : g;
                vf_store(dxr + i, vf_mul(vf_sub(gw, vf_mul(xh, bv)), rv));
            }
            for (; i < C; i++) dxr[i] = (gr[i] * (w ? w[i] : 1.0f) - xr[i] * rs * bb) * rs;
        }
    }
    if (dw) {
        sum_partials(partial, items, C, dw);
        free(partial);
    }
    return 1;
}

/* dx (R, C) from dy (R, C), all contiguous; see sg_rmsnorm_bwd_ld */
int sg_rmsnorm_bwd(const float *x, const float *w, const float *rstd, const float *dy, float *dx, float *dw, long R,
                   int C) {
    return sg_rmsnorm_bwd_ld(x, C, w, rstd, dy, C, dx, C, dw, R, 1, C);
}
