/* AdamW with the gradients' norm for clipping, over all of a model's tensors in two passes
 * (simplegpt/accel/cpu/training.py's adamw_step). */
#include "kernels.h"
#include <math.h>
#include <stdlib.h>

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
        vf a0 = vf_zero(), a1 = vf_zero();
        double tail = 0.0;
        for (; i + 2 * VF <= len; i += 2 * VF) {
            vf x0 = vf_load(x + i), x1 = vf_load(x + i + VF);
            a0 = vf_fmadd(x0, x0, a0);
            a1 = vf_fmadd(x1, x1, a1);
        }
        for (; i < len; i++) tail += (double)x[i] * x[i];
        part[k] = (double)vf_sum(vf_add(a0, a1)) + tail;
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
        vf vdecay = vf_set1(decay), v1b1 = vf_set1(1.0f - b1), vb2 = vf_set1(b2);
        vf v1b2 = vf_set1(1.0f - b2), vss = vf_set1(step_size), vr = vf_set1(rbc2);
        vf veps = vf_set1(eps), vgs = vf_set1(gscale);
        for (; i + VF <= len; i += VF) {
            vf gv = vf_mul(vf_load(gg + i), vgs);
            vf mv = vf_load(mm + i), vv2 = vf_load(vv + i);
            mv = vf_fmadd(v1b1, vf_sub(gv, mv), mv);
            vv2 = vf_fmadd(vb2, vv2, vf_mul(v1b2, vf_mul(gv, gv)));
            vf denom = vf_fmadd(vf_sqrt(vv2), vr, veps);
            vf pv = vf_mul(vf_load(pp + i), vdecay);
            pv = vf_sub(pv, vf_div(vf_mul(vss, mv), denom));
            vf_store(mm + i, mv);
            vf_store(vv + i, vv2);
            vf_store(pp + i, pv);
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
