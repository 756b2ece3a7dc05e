/* The CPU kernels against double-precision references, in C: for builds that PyTorch cannot load
 * (the portable variant cross-compiled for aarch64 and run under qemu-user, see
 * tests/test_native_variants.py). Prints one line per failed check and exits 1 on any. The
 * tolerances are those of the Python tests against PyTorch in float64. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "../../simplegpt/accel/cpu/csrc/api.h"

static int failed;

static float rnd(void) { return (float)rand() / RAND_MAX * 2.0f - 1.0f; }

static void check(const char *what, const float *got, const double *want, long n, double atol, double rtol) {
    for (long i = 0; i < n; i++)
        if (!(fabs(got[i] - want[i]) <= atol + rtol * fabs(want[i]))) {
            printf("%s: element %ld is %.7g, want %.7g\n", what, i, got[i], want[i]);
            failed = 1;
            return;
        }
}

static void gemv(int M, int N, int K, int threads) {
    float *W = malloc(sizeof(float) * N * K), *x = malloc(sizeof(float) * M * K), *b = malloc(sizeof(float) * N);
    float *y = malloc(sizeof(float) * M * N), *scale = malloc(sizeof(float) * N);
    int8_t *q = malloc((size_t)N * K);
    double *want = malloc(sizeof(double) * M * N);
    for (long i = 0; i < (long)N * K; i++) W[i] = rnd();
    for (long i = 0; i < (long)M * K; i++) x[i] = rnd() * 3.0f;
    for (int i = 0; i < N; i++) b[i] = rnd();
    sg_gemv(W, x, b, y, M, N, K, threads);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = b[n];
            for (int k = 0; k < K; k++) s += (double)W[(long)n * K + k] * x[(long)m * K + k];
            want[m * N + n] = s;
        }
    check("sg_gemv", y, want, (long)M * N, 1e-4 * sqrt(K), 1e-5);
    /* int8: rows of W with scale max / 127, rows of x rounded as the kernel rounds them */
    for (int n = 0; n < N; n++) {
        float mx = 0.0f;
        for (int k = 0; k < K; k++) mx = fmaxf(mx, fabsf(W[(long)n * K + k]));
        scale[n] = mx / 127.0f;
        for (int k = 0; k < K; k++) q[(long)n * K + k] = (int8_t)lrintf(W[(long)n * K + k] / scale[n]);
    }
    sg_gemv_q8(q, scale, x, b, y, M, N, K, threads);
    for (int m = 0; m < M; m++) {
        float mx = 0.0f;
        for (int k = 0; k < K; k++) mx = fmaxf(mx, fabsf(x[(long)m * K + k]));
        float xs = mx / 127.0f, inv = 1.0f / xs;
        for (int n = 0; n < N; n++) {
            double s = 0.0;
            for (int k = 0; k < K; k++) s += (double)q[(long)n * K + k] * lrintf(x[(long)m * K + k] * inv);
            want[m * N + n] = s * scale[n] * xs + b[n];
        }
    }
    check("sg_gemv_q8", y, want, (long)M * N, 1e-4, 1e-5);
    free(W), free(x), free(b), free(y), free(scale), free(q), free(want);
}

static void layernorm_gelu(long R, int C) {
    float *x = malloc(sizeof(float) * R * C), *w = malloc(sizeof(float) * C), *b = malloc(sizeof(float) * C);
    float *y = malloc(sizeof(float) * R * C), *mean = malloc(sizeof(float) * R), *rstd = malloc(sizeof(float) * R);
    double *want = malloc(sizeof(double) * R * C);
    for (long i = 0; i < R * C; i++) x[i] = rnd() * 3.0f + 1.0f;
    for (int i = 0; i < C; i++) w[i] = rnd(), b[i] = rnd();
    sg_layernorm_fwd(x, w, b, y, mean, rstd, R, C, 1e-5f);
    for (long r = 0; r < R; r++) {
        double m = 0.0, v = 0.0;
        for (int i = 0; i < C; i++) m += x[r * C + i];
        m /= C;
        for (int i = 0; i < C; i++) v += (x[r * C + i] - m) * (x[r * C + i] - m);
        double rs = 1.0 / sqrt(v / C + 1e-5);
        for (int i = 0; i < C; i++) want[r * C + i] = (x[r * C + i] - m) * rs * w[i] + b[i];
    }
    check("sg_layernorm_fwd", y, want, R * C, 1e-5, 1e-5);
    sg_gelu_fwd(x, y, R * C);
    for (long i = 0; i < R * C; i++) {
        double h = x[i];
        want[i] = 0.5 * h * (1.0 + tanh(sqrt(2.0 / M_PI) * (h + 0.044715 * h * h * h)));
    }
    check("sg_gelu_fwd", y, want, R * C, 1e-6, 1e-6);
    free(x), free(w), free(b), free(y), free(mean), free(rstd), free(want);
}

static void attention(int B, int T, int C, int H) {
    int D = C / H;
    float *qkv = malloc(sizeof(float) * B * T * 3 * C), *out = malloc(sizeof(float) * B * T * C);
    float *lse = malloc(sizeof(float) * B * H * T);
    double *want = malloc(sizeof(double) * B * T * C), *p = malloc(sizeof(double) * T);
    for (long i = 0; i < (long)B * T * 3 * C; i++) qkv[i] = rnd() * 2.0f;
    if (!sg_attn_fwd(qkv, out, lse, B, T, C, H, 1.0f / sqrtf((float)D))) failed = printf("sg_attn_fwd: no memory\n");
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < T; i++) {
                const float *q = qkv + ((long)b * T + i) * 3 * C + h * D;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j <= i; j++) {
                    const float *k = qkv + ((long)b * T + j) * 3 * C + C + h * D;
                    double s = 0.0;
                    for (int d = 0; d < D; d++) s += (double)q[d] * k[d];
                    p[j] = s / sqrt(D);
                    mx = fmax(mx, p[j]);
                }
                for (int j = 0; j <= i; j++) sum += p[j] = exp(p[j] - mx);
                for (int d = 0; d < D; d++) {
                    double o = 0.0;
                    for (int j = 0; j <= i; j++) o += p[j] / sum * qkv[((long)b * T + j) * 3 * C + 2 * C + h * D + d];
                    want[((long)b * T + i) * C + h * D + d] = o;
                }
            }
    check("sg_attn_fwd", out, want, (long)B * T * C, 1e-5, 1e-4);
    free(qkv), free(out), free(lse), free(want), free(p);
}

int main(void) {
    srand(1);
    sg_init(3);
    int shapes[][2] = {{7, 13}, {96, 32}, {301, 771}, {5, 40}, {131, 3072}};
    for (int s = 0; s < 5; s++)
        for (int M = 1; M <= 16; M += 15)
            for (int threads = 1; threads <= 3; threads += 2) gemv(M, shapes[s][0], shapes[s][1], threads);
    layernorm_gelu(37, 13);
    layernorm_gelu(100, 771);
    attention(2, 13, 64, 2);
    attention(3, 37, 96, 3);
    printf(failed ? "FAILED (%s)\n" : "ok (%s)\n", sg_variant());
    return failed;
}
