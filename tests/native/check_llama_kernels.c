/* The Llama-style kernels (RMSNorm, RoPE, SwiGLU, ReLU^2, grouped-query attention for training and
 * for a decode step) against double-precision references, in C: for builds that PyTorch cannot
 * load (the portable variant cross-compiled for aarch64 and run under qemu-user, see
 * tests/test_native_llama_ops.py). Prints one line per failed check and exits 1 on any. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "../../simplegpt/accel/cpu/csrc/api.h"

static int failed;

static float rnd(void) { return (float)rand() / RAND_MAX * 2.0f - 1.0f; }

static float *floats(long n, float scale) {
    float *p = malloc(sizeof(float) * n);
    for (long i = 0; i < n; i++) p[i] = rnd() * scale;
    return p;
}

static void check(const char *what, const float *got, const double *want, long n, double atol, double rtol) {
    for (long i = 0; i < n; i++)
        if (!(fabs(got[i] - want[i]) <= atol + rtol * fabs(want[i]))) {
            printf("%s: element %ld is %.7g, want %.7g\n", what, i, got[i], want[i]);
            failed = 1;
            return;
        }
}

static void rmsnorm(long R, int C) {
    float *x = floats(R * C, 3.0f), *w = floats(C, 1.0f), *dy = floats(R * C, 1.0f);
    float *y = malloc(sizeof(float) * R * C), *dx = malloc(sizeof(float) * R * C), *dw = malloc(sizeof(float) * C);
    float *rstd = malloc(sizeof(float) * R);
    double *want = calloc(R * C, sizeof(double)), *wdx = malloc(sizeof(double) * R * C), *wdw = calloc(C, sizeof(double));
    sg_rmsnorm_fwd(x, w, y, rstd, R, C, 1e-6f);
    if (!sg_rmsnorm_bwd(x, w, rstd, dy, dx, dw, R, C)) failed = printf("sg_rmsnorm_bwd: no memory\n");
    for (long r = 0; r < R; r++) {
        const float *xr = x + r * C, *g = dy + r * C;
        double ss = 0.0, dot = 0.0;
        for (int i = 0; i < C; i++) ss += (double)xr[i] * xr[i];
        double rs = 1.0 / sqrt(ss / C + 1e-6);
        for (int i = 0; i < C; i++) {
            want[r * C + i] = xr[i] * rs * w[i];
            dot += (double)g[i] * w[i] * xr[i] * rs;
            wdw[i] += (double)g[i] * xr[i] * rs;
        }
        for (int i = 0; i < C; i++) wdx[r * C + i] = rs * (g[i] * w[i] - xr[i] * rs * dot / C);
    }
    check("sg_rmsnorm_fwd", y, want, R * C, 1e-5, 1e-5);
    check("sg_rmsnorm_bwd dx", dx, wdx, R * C, 1e-5, 1e-4);
    check("sg_rmsnorm_bwd dw", dw, wdw, C, 1e-4 * sqrt(R), 1e-4);
    free(x), free(w), free(dy), free(y), free(dx), free(dw), free(rstd), free(want), free(wdx), free(wdw);
}

static void rope(int B, int H, int T, int D) {
    long n = (long)B * H * T * D, xs[3] = {(long)H * T * D, (long)T * D, D};
    float *x = floats(n, 2.0f), *cs = malloc(sizeof(float) * T * D / 2), *sn = malloc(sizeof(float) * T * D / 2);
    float *y = malloc(sizeof(float) * n), *back = malloc(sizeof(float) * n);
    double *want = malloc(sizeof(double) * n), *orig = malloc(sizeof(double) * n);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < D / 2; i++) {
            double a = t * pow(10000.0, -2.0 * i / D);
            cs[t * D / 2 + i] = (float)cos(a), sn[t * D / 2 + i] = (float)sin(a);
        }
    sg_rope_fwd(x, xs, cs, sn, 0, y, B, H, T, D, 0);
    sg_rope_fwd(y, xs, cs, sn, 0, back, B, H, T, D, 1);
    for (long r = 0; r < n / D; r++) {
        const float *c = cs + (r % T) * D / 2, *s = sn + (r % T) * D / 2, *xr = x + r * D;
        for (int i = 0; i < D / 2; i++) {
            want[r * D + i] = (double)xr[i] * c[i] - (double)xr[D / 2 + i] * s[i];
            want[r * D + D / 2 + i] = (double)xr[D / 2 + i] * c[i] + (double)xr[i] * s[i];
        }
        for (int i = 0; i < D; i++) orig[r * D + i] = xr[i];
    }
    check("sg_rope_fwd", y, want, n, 1e-6, 1e-5);
    check("sg_rope_fwd inverse", back, orig, n, 1e-5, 1e-5);
    free(x), free(cs), free(sn), free(y), free(back), free(want), free(orig);
}

static void activations(long R, int F) {
    long n = R * F;
    float *g = floats(n, 6.0f), *u = floats(n, 1.0f), *dy = floats(n, 1.0f);
    float *y = malloc(sizeof(float) * n), *dg = malloc(sizeof(float) * n), *du = malloc(sizeof(float) * n);
    double *w = malloc(sizeof(double) * n), *wg = malloc(sizeof(double) * n), *wu = malloc(sizeof(double) * n);
    sg_swiglu_fwd(g, u, y, R, F, F, F);
    sg_swiglu_bwd(g, u, dy, dg, du, R, F, F, F);
    for (long i = 0; i < n; i++) {
        double s = 1.0 / (1.0 + exp(-(double)g[i]));
        w[i] = g[i] * s * u[i];
        wu[i] = dy[i] * g[i] * s;
        wg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
    check("sg_swiglu_fwd", y, w, n, 1e-6, 1e-5);
    check("sg_swiglu_bwd dgate", dg, wg, n, 1e-6, 1e-5);
    check("sg_swiglu_bwd dup", du, wu, n, 1e-6, 1e-5);
    sg_relu2_fwd(g, y, n);
    sg_relu2_bwd(g, dy, dg, n);
    for (long i = 0; i < n; i++) {
        double r = g[i] > 0 ? g[i] : 0.0;
        w[i] = r * r;
        wg[i] = 2.0 * r * dy[i];
    }
    check("sg_relu2_fwd", y, w, n, 1e-6, 1e-6);
    check("sg_relu2_bwd", dg, wg, n, 1e-6, 1e-6);
    free(g), free(u), free(dy), free(y), free(dg), free(du), free(w), free(wg), free(wu);
}

/* q (B, H, T, D), k, v (B, H / G, T, D) contiguous; out (B, H, T, D); the decode step for the last
 * position, over a cache of the same k and v, must give out's last row */
static void attention(int B, int H, int G, int T, int D) {
    int Hkv = H / G;
    long nq = (long)B * H * T * D, nk = (long)B * Hkv * T * D;
    long st[12] = {(long)H * T * D, (long)T * D, D, (long)Hkv * T * D, (long)T * D, D,
                   (long)Hkv * T * D, (long)T * D, D, (long)H * T * D, (long)T * D, D};
    float *q = floats(nq, 2.0f), *k = floats(nk, 2.0f), *v = floats(nk, 2.0f), *out = malloc(sizeof(float) * nq);
    float *lse = malloc(sizeof(float) * B * H * T), *step = malloc(sizeof(float) * B * H * D);
    float *qlast = malloc(sizeof(float) * B * H * D);
    double *want = malloc(sizeof(double) * nq), *p = malloc(sizeof(double) * T), *wlast = malloc(sizeof(double) * B * H * D);
    float scale = 1.0f / sqrtf((float)D);
    if (!sg_attn_gqa_fwd(q, k, v, out, lse, st, B, T, H, G, D, scale)) failed = printf("sg_attn_gqa_fwd: no memory\n");
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < T; i++) {
                const float *qi = q + (((long)b * H + h) * T + i) * D;
                const float *kh = k + ((long)b * Hkv + h / G) * T * D, *vh = v + ((long)b * Hkv + h / G) * T * D;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j <= i; j++) {
                    double s = 0.0;
                    for (int d = 0; d < D; d++) s += (double)qi[d] * kh[(long)j * D + d];
                    p[j] = s / sqrt(D);
                    mx = fmax(mx, p[j]);
                }
                for (int j = 0; j <= i; j++) sum += p[j] = exp(p[j] - mx);
                for (int d = 0; d < D; d++) {
                    double o = 0.0;
                    for (int j = 0; j <= i; j++) o += p[j] / sum * vh[(long)j * D + d];
                    want[(((long)b * H + h) * T + i) * D + d] = o;
                    if (i == T - 1) wlast[((long)b * H + h) * D + d] = o, qlast[((long)b * H + h) * D + d] = qi[d];
                }
            }
    check("sg_attn_gqa_fwd", out, want, nq, 1e-5, 1e-4);
    if (!sg_attn_decode(qlast, k, v, step, NULL, 0, B, H, G, T, D, (long)H * D, (long)T * D, (long)Hkv * T * D,
                        scale, 3))
        failed = printf("sg_attn_decode: no memory\n");
    check("sg_attn_decode", step, wlast, (long)B * H * D, 1e-5, 1e-4);
    free(q), free(k), free(v), free(out), free(lse), free(step), free(qlast), free(want), free(p), free(wlast);
}

int main(void) {
    srand(1);
    sg_init(3);
    rmsnorm(37, 13);
    rmsnorm(40, 96);
    rope(2, 3, 13, 32);
    rope(1, 2, 5, 6);
    activations(3, 37);
    activations(5, 1000);
    attention(2, 4, 2, 13, 32);
    attention(1, 4, 4, 37, 64);
    attention(18, 2, 2, 5, 16); /* past MAX_ROWS decode rows */
    printf(failed ? "FAILED (%s)\n" : "ok (%s)\n", sg_variant());
    return failed;
}
