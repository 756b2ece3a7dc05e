/* GPT-2's tanh-GELU, forward and backward: the op's one implementation, for training (on OpenMP's
 * threads) and for decoding (block.c's decode step calls gelu_span). */
#include "kernels.h"
#include <stdlib.h>

#define GELU_K (-1.5957691216057308f) /* -2 sqrt(2/pi) */
#define GELU_A 0.044715f

/* 1 / (1 + e^(-2z)) with z = sqrt(2/pi) (h + 0.044715 h^3): GPT-2's tanh-GELU is h times this */
static inline vf gelu_gate(vf h) {
    vf u = vf_mul(vf_fmadd(vf_mul(vf_set1(GELU_A), h), vf_mul(h, h), h), vf_set1(GELU_K));
    return vf_div(vf_set1(1.0f), vf_add(vf_set1(1.0f), vf_exp(u)));
}

static inline float gelu_gate1(float h) { return 1.0f / (1.0f + __builtin_expf(GELU_K * (h + GELU_A * h * h * h))); }

/* y = gelu(x) for n floats on the calling thread (y may be x) */
void gelu_span(const float *x, float *y, long n) {
    long i = 0;
    for (; i + VF <= n; i += VF) {
        vf h = vf_load(x + i);
        vf_store(y + i, vf_mul(h, gelu_gate(h)));
    }
    for (; i < n; i++) y[i] = x[i] * gelu_gate1(x[i]);
}

/* y = gelu(x), n floats */
void sg_gelu_fwd(const float *x, float *y, long n) {
    long chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
    for (long c = 0; c < chunks; c++) {
        long i = c * CHUNK;
        gelu_span(x + i, y + i, (i + CHUNK < n ? i + CHUNK : n) - i);
    }
}

/* gelu'(h). With s the gate above, gelu(h) = h s and
 * gelu'(h) = s + h s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 h^2). */
static inline vf gelu_grad(vf h) {
    const vf c2 = vf_set1(-GELU_K), c3 = vf_set1(-GELU_K * 3.0f * GELU_A);
    vf s = gelu_gate(h);
    vf dz = vf_fmadd(c3, vf_mul(h, h), c2); /* 2 dz/dh */
    vf hs1s = vf_mul(vf_mul(h, s), vf_sub(vf_set1(1.0f), s));
    return vf_fmadd(hs1s, dz, s);
}

static inline float gelu_grad1(float h) {
    float s = gelu_gate1(h);
    return s + h * s * (1.0f - s) * (-GELU_K + -GELU_K * 3.0f * GELU_A * h * h);
}

/* du = dy * gelu'(u) for n floats on the calling thread (du may be dy) */
static void gelu_grad_span(const float *u, const float *dy, float *du, long n) {
    long i = 0;
    for (; i + VF <= n; i += VF) vf_store(du + i, vf_mul(vf_load(dy + i), gelu_grad(vf_load(u + i))));
    for (; i < n; i++) du[i] = dy[i] * gelu_grad1(u[i]);
}

/* dx = dy * gelu'(x) */
void sg_gelu_bwd(const float *x, const float *dy, float *dx, long n) {
    long chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
    for (long c = 0; c < chunks; c++) {
        long i = c * CHUNK;
        gelu_grad_span(x + i, dy + i, dx + i, (i + CHUNK < n ? i + CHUNK : n) - i);
    }
}

/* The MLP's bias and GELU after its first matmul, for the fused block (block.c):
 * u += b per column (u is the (M, N) product, b may be NULL), then y = gelu(u). */
void bias_gelu_fwd(float *u, const float *b, float *y, long M, int N) {
    int NV = N - N % VF;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) {
        float *ur = u + r * N;
        if (b) {
            int i = 0;
            for (; i < NV; i += VF) vf_store(ur + i, vf_add(vf_load(ur + i), vf_load(b + i)));
            for (; i < N; i++) ur[i] += b[i];
        }
        gelu_span(ur, y + r * N, N);
    }
}

/* du = dy * gelu'(u) (du may be dy) and, when db is not NULL, db = the column sums of du (the
 * bias gradient), the same bits on any thread count. Returns 0 if there was no memory. */
int gelu_bwd_db(const float *u, const float *dy, float *du, float *db, long M, int N) {
    long items = (M + COLSUM_ROWS - 1) / COLSUM_ROWS;
    int NV = N - N % VF;
    float *partial = db ? calloc((size_t)items * N, sizeof(float)) : NULL;
    if (db && !partial) return 0;
#pragma omp parallel for schedule(static)
    for (long it = 0; it < items; it++) {
        long r1 = (it + 1) * COLSUM_ROWS < M ? (it + 1) * COLSUM_ROWS : M;
        float *pd = partial ? partial + it * N : NULL;
        for (long r = it * COLSUM_ROWS; r < r1; r++) {
            float *dr = du + r * N;
            gelu_grad_span(u + r * N, dy + r * N, dr, N);
            if (!pd) continue;
            int i = 0;
            for (; i < NV; i += VF) vf_store(pd + i, vf_add(vf_load(pd + i), vf_load(dr + i)));
            for (; i < N; i++) pd[i] += dr[i];
        }
    }
    if (db) {
        sum_partials(partial, items, N, db);
        free(partial);
    }
    return 1;
}
