/* The MLP activations of Llama-style blocks, forward and backward on OpenMP's threads (gelu.c
 * holds GPT-2's): SwiGLU, silu(gate) * up with silu(g) = g sigmoid(g) (Llama, Qwen, SmolLM), and
 * ReLU^2, relu(x)^2 (nanochat). */
#include "kernels.h"

/* sigmoid(g) = 1 / (1 + e^-g); vf_exp's clamp keeps it finite at both ends */
static inline vf sigmoid(vf g) { return vf_div(vf_set1(1.0f), vf_add(vf_set1(1.0f), vf_exp(vf_sub(vf_zero(), g)))); }

static inline float sigmoid1(float g) { return 1.0f / (1.0f + __builtin_expf(-g)); }

/* the rows of an (R, F) operation split into work items of about CHUNK floats */
static inline long row_items(long R, int F, long *rows) {
    *rows = F >= CHUNK ? 1 : CHUNK / F;
    return (R + *rows - 1) / *rows;
}

/* y (R, F) contiguous = silu(gate) * up, gate and up (R, F) with their rows ldg and ldu floats
 * apart (the halves of a fused gate|up product need no copy) */
/* one row of F floats on the calling thread (also the decode step's, llama_decode.c) */
void swiglu_row(const float *g, const float *u, float *yr, int F) {
    int FV = F - F % VF, i = 0;
    for (; i < FV; i += VF) {
        vf gv = vf_load(g + i);
        vf_store(yr + i, vf_mul(vf_mul(gv, sigmoid(gv)), vf_load(u + i)));
    }
    for (; i < F; i++) yr[i] = g[i] * sigmoid1(g[i]) * u[i];
}

void sg_swiglu_fwd(const float *gate, const float *up, float *y, long R, int F, long ldg, long ldu) {
    long per, items = row_items(R, F, &per);
#pragma omp parallel for schedule(static)
    for (long it = 0; it < items; it++)
        for (long r = it * per; r < R && r < (it + 1) * per; r++) swiglu_row(gate + r * ldg, up + r * ldu, y + r * F, F);
}

/* dgate, dup (R, F) with their rows ldd floats apart, from dy (R, F) contiguous: dup = dy silu(g),
 * dgate = dy up silu'(g) with silu'(g) = s (1 + g (1 - s)), s = sigmoid(g). With ldd = 2F and
 * dup = dgate + F the gradient of a fused gate|up product is written as one (R, 2F) tensor. */
void sg_swiglu_bwd_ld(const float *gate, const float *up, const float *dy, float *dgate, float *dup, long R, int F,
                      long ldg, long ldu, long ldd) {
    long per, items = row_items(R, F, &per);
    int FV = F - F % VF;
#pragma omp parallel for schedule(static)
    for (long it = 0; it < items; it++)
        for (long r = it * per; r < R && r < (it + 1) * per; r++) {
            const float *g = gate + r * ldg, *u = up + r * ldu, *d = dy + r * F;
            float *dg = dgate + r * ldd, *du = dup + r * ldd;
            int i = 0;
            for (; i < FV; i += VF) {
                vf gv = vf_load(g + i), s = sigmoid(gv), dv = vf_load(d + i), one = vf_set1(1.0f);
                vf_store(du + i, vf_mul(dv, vf_mul(gv, s)));
                vf ds = vf_mul(s, vf_fmadd(gv, vf_sub(one, s), one));
                vf_store(dg + i, vf_mul(vf_mul(dv, vf_load(u + i)), ds));
            }
            for (; i < F; i++) {
                float s = sigmoid1(g[i]);
                du[i] = d[i] * g[i] * s;
                dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
            }
        }
}

/* sg_swiglu_bwd_ld with dgate and dup (R, F) contiguous */
void sg_swiglu_bwd(const float *gate, const float *up, const float *dy, float *dgate, float *dup, long R, int F,
                   long ldg, long ldu) {
    sg_swiglu_bwd_ld(gate, up, dy, dgate, dup, R, F, ldg, ldu, F);
}

/* y = relu(x)^2, n floats on the calling thread (also the decode step's, llama_decode.c) */
void relu2_span(const float *x, float *y, long n) {
    long i = 0;
    for (; i + VF <= n; i += VF) {
        vf r = vf_max(vf_load(x + i), vf_zero());
        vf_store(y + i, vf_mul(r, r));
    }
    for (; i < n; i++) y[i] = x[i] > 0.0f ? x[i] * x[i] : 0.0f;
}

/* y = relu(x)^2, n floats */
void sg_relu2_fwd(const float *x, float *y, long n) {
    SG_FOR_EACH_CHUNK(n, i, end) relu2_span(x + i, y + i, end - i);
}

/* dx = 2 relu(x) dy, n floats */
void sg_relu2_bwd(const float *x, const float *dy, float *dx, long n) {
    SG_FOR_EACH_CHUNK(n, i, end) {
        for (; i + VF <= end; i += VF) {
            vf r = vf_max(vf_load(x + i), vf_zero());
            vf_store(dx + i, vf_mul(vf_add(r, r), vf_load(dy + i)));
        }
        for (; i < end; i++) dx[i] = x[i] > 0.0f ? 2.0f * x[i] * dy[i] : 0.0f;
    }
}
