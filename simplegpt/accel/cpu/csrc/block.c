/* A GPT-2 block (simplegpt.model.Block, pre-LN: x += proj(attn(ln_1(x))); x += fc2(gelu(fc(ln_2(x)))))
 * composed of the op kernels: for one decode step of a few rows (sg_blocks1: the products on the
 * pool, with the KV cache), and for training, forward and backward (sg_block_fwd/bwd: the products
 * in torch's sgemm, the rest on OpenMP's threads, the biases, residual adds and bias gradients
 * folded into the other passes). Both take the block's parameters in slots.h's order. */
#include "kernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SLOT_NAME(name, module, param) module "." param,
static const char *const slot_names[BLOCK_NSLOTS] = {BLOCK_SLOTS(SLOT_NAME)};
#undef SLOT_NAME

/* "module.parameter" of slot i, NULL past the last: the library's copy of slots.h, which lib.py
 * checks against the list slots.py read (a library built from another slots.h fails to load) */
const char *sg_block_slot(int i) { return i >= 0 && i < BLOCK_NSLOTS ? slot_names[i] : NULL; }

/* ---- one decode step ----------------------------------------------------------------------------
 * One block for one token of each of B rows, x (B, C). Each row's new key and value go to slot
 * `pos` of its cache (row b at kc + b row_stride, heads head_stride floats apart, slots C / H
 * floats apart), and its query attends to the slots 0..pos that mask marks real (see attend_args in
 * kernels.h). p holds the block's parameters (slots.h). scales: NULL for fp32 linear weights, else
 * the 4 linears' row scales (their weights are int8). scratch holds sg_block1_scratch(B, C, pos + 1,
 * threads) floats. The caller holds the pool. */
static void block1(float *x, const float **p, const float **scales, float *kc, float *vc, long head_stride,
                   long row_stride, int B, int pos, const int64_t *mask, long mask_stride, int C, int H, float eps,
                   float *scratch, int threads) {
    const float *s[BLOCK_NSCALES] = {NULL};
    if (scales) for (int i = 0; i < BLOCK_NSCALES; i++) s[i] = scales[i];
    int D = C / H;
    size_t BC = (size_t)B * C;
    float *xn = scratch, *qkv = xn + BC, *att = qkv + 3 * BC, *tmp = att + BC, *h = tmp + BC, *scores = h + 4 * BC;
    float mean, rstd; /* the backward's, not needed here */
    for (int b = 0; b < B; b++) layernorm_row(x + b * C, p[LN1_W], p[LN1_B], xn + b * C, &mean, &rstd, C, eps);
    gemv_pooled(p[ATTN_W], s[ATTN_S], xn, p[ATTN_B], qkv, B, 3 * C, C, threads);
    for (int b = 0; b < B; b++)
        for (int hd = 0; hd < H; hd++) {
            size_t at = (size_t)b * row_stride + (size_t)hd * head_stride + (size_t)pos * D;
            for (int i = 0; i < D; i++) {
                kc[at + i] = qkv[(size_t)b * 3 * C + C + hd * D + i];
                vc[at + i] = qkv[(size_t)b * 3 * C + 2 * C + hd * D + i];
            }
        }
    struct attend_args a = {.q = qkv, .k = kc, .v = vc, .out = att, .scores = scores, .mask = mask, .B = B, .H = H,
                            .G = 1, .S = pos + 1, .D = D, .q_stride = 3L * C, .head_stride = head_stride,
                            .row_stride = row_stride, .mask_stride = mask_stride,
                            .scale = 1.0f / __builtin_sqrtf((float)D)};
    attend_cached(&a, threads);
    gemv_pooled(p[PROJ_W], s[PROJ_S], att, p[PROJ_B], tmp, B, C, C, threads);
    for (size_t i = 0; i < BC; i++) x[i] += tmp[i];
    for (int b = 0; b < B; b++) layernorm_row(x + b * C, p[LN2_W], p[LN2_B], xn + b * C, &mean, &rstd, C, eps);
    gemv_pooled(p[FC_W], s[FC_S], xn, p[FC_B], h, B, 4 * C, C, threads);
    gelu_span(h, h, 4 * (long)BC);
    gemv_pooled(p[MP_W], s[MP_S], h, p[MP_B], tmp, B, C, 4 * C, threads);
    for (size_t i = 0; i < BC; i++) x[i] += tmp[i];
}

/* scratch floats block1 needs for B rows and S keys */
long sg_block1_scratch(int B, int C, int S, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    return 10L * B * C + (long)S * (threads < 1 ? 1 : threads);
}

/* block1 for L blocks in a row, in one call: p holds BLOCK_NSLOTS pointers per block, scales
 * BLOCK_NSCALES per block (or is NULL), kc and vc each block's cache (as for block1). B at most
 * MAX_ROWS (the int8 kernel's buffers); returns -1 (doing nothing) past it. */
int sg_blocks1(float *x, const float **p, const float **scales, float **kc, float **vc, long head_stride,
               long row_stride, int B, int pos, const int64_t *mask, long mask_stride, int C, int H, int L, float eps,
               float *scratch, int threads) {
    if (B < 1 || B > MAX_ROWS) return -1;
    pool_lock();
    for (int l = 0; l < L; l++)
        block1(x, p + BLOCK_NSLOTS * l, scales ? scales + BLOCK_NSCALES * l : NULL, kc[l], vc[l], head_stride,
               row_stride, B, pos, mask, mask_stride, C, H, eps, scratch, threads);
    pool_unlock();
    return 0;
}

/* ---- training, forward and backward -------------------------------------------------------------
 * What the forward keeps for the backward, carved in this order out of one buffer of
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
