/* One decode step of a model with the Llama-style options (simplegpt.model.Block with RMSNorm or
 * LayerNorm, rotary or learned positions, grouped-query attention, QK-norm, a SwiGLU, ReLU^2 or
 * GELU MLP, biases or none): all its blocks in one call, as block.c's sg_blocks1 runs GPT-2's,
 * composed of the same op kernels (the products on the pool, gemv.c; rmsnorm_row, rope_row,
 * swiglu_row, relu2_span and attend_cached on the calling thread or the pool).
 *
 * A block's parameters: BLOCK_SLOTS (slots.h: the norms' weights and biases, c_attn holding
 * q | k | v, c_proj, c_fc holding gate | up for SwiGLU, the MLP's c_proj; NULL for a missing bias
 * or gain) followed by the QK-norm gains (Q_NORM_W, K_NORM_W: decode.py's LLAMA_SLOTS). */
#include "kernels.h"
#include "llama.h" /* the slots and the dims array (decode.py's LlamaDecodeBlocks fills them) */
#include <math.h>

int sg_llama_slots(void) { return LLAMA_NSLOTS; }

/* scratch floats sg_llama_blocks1 needs for B rows and S keys */
long sg_llama_block1_scratch(int B, const int *dims, int S, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    long C = dims[DIM_C], HD = (long)dims[DIM_H] * dims[DIM_D], KD = (long)dims[DIM_K] * dims[DIM_D];
    long F = dims[DIM_F], F2 = dims[DIM_MLP] == MLP_SWIGLU ? 2 * F : F;
    /* xn, qkv, att, tmp, h (and SwiGLU's product), each row's cos | sin, scores */
    return B * (2 * C + HD + 2 * KD + HD + F2 + F + dims[DIM_D]) + (long)S * (threads < 1 ? 1 : threads);
}

static void norm_rows(const float *x, const float *w, const float *b, float *y, int B, int C, int kind, float eps) {
    float mean, rstd; /* the backward's, not needed here */
    for (int r = 0; r < B; r++) {
        if (kind == NORM_RMS) rmsnorm_row(x + (size_t)r * C, w, y + (size_t)r * C, &rstd, C, eps);
        else layernorm_row(x + (size_t)r * C, w, b, y + (size_t)r * C, &mean, &rstd, C, eps);
    }
}

/* One block for one token of each of B rows, x (B, C) in place (see sg_llama_blocks1); cs: each row's
 * D / 2 cosines then D / 2 sines of its rotary angles, NULL without rotary positions. */
static void llama_block1(float *x, const float **p, const float **scales, float *kc, float *vc, long head_stride,
                         long row_stride, int B, int pos, const int64_t *mask, long mask_stride, const int *dims,
                         const float *cs, float eps, float qk_eps, float *scratch, int threads) {
    const float *s[BLOCK_NSCALES] = {NULL};
    if (scales) for (int i = 0; i < BLOCK_NSCALES; i++) s[i] = scales[i];
    int C = dims[DIM_C], H = dims[DIM_H], K = dims[DIM_K], D = dims[DIM_D], F = dims[DIM_F];
    int mlp = dims[DIM_MLP], F2 = mlp == MLP_SWIGLU ? 2 * F : F, W = (H + 2 * K) * D; /* c_attn's width */
    size_t BC = (size_t)B * C;
    float *xn = scratch, *qkv = xn + BC, *att = qkv + (size_t)B * W, *tmp = att + (size_t)B * H * D;
    float *h = tmp + BC, *act = h + (size_t)B * F2, *scores = act + (size_t)B * F;
    float rstd;
    norm_rows(x, p[LN1_W], p[LN1_B], xn, B, C, dims[DIM_NORM], eps);
    gemv_pooled(p[ATTN_W], s[ATTN_S], xn, p[ATTN_B], qkv, B, W, C, threads);
    for (int b = 0; b < B; b++) {
        float *q = qkv + (size_t)b * W, *k = q + H * D, *v = k + K * D;
        if (dims[DIM_QK_NORM]) {
            for (int hd = 0; hd < H; hd++) rmsnorm_row(q + hd * D, p[Q_NORM_W], q + hd * D, &rstd, D, qk_eps);
            for (int hd = 0; hd < K; hd++) rmsnorm_row(k + hd * D, p[K_NORM_W], k + hd * D, &rstd, D, qk_eps);
        }
        if (cs) {
            const float *c = cs + (size_t)b * D, *sn = c + D / 2;
            for (int hd = 0; hd < H; hd++) rope_row(q + hd * D, c, sn, q + hd * D, D, 1.0f);
            for (int hd = 0; hd < K; hd++) rope_row(k + hd * D, c, sn, k + hd * D, D, 1.0f);
        }
        for (int hd = 0; hd < K; hd++) {
            size_t at = (size_t)b * row_stride + (size_t)hd * head_stride + (size_t)pos * D;
            for (int i = 0; i < D; i++) {
                kc[at + i] = k[hd * D + i];
                vc[at + i] = v[hd * D + i];
            }
        }
    }
    struct attend_args a = {.q = qkv, .k = kc, .v = vc, .out = att, .scores = scores, .mask = mask, .B = B, .H = H,
                            .G = H / K, .S = pos + 1, .D = D, .q_stride = W, .head_stride = head_stride,
                            .row_stride = row_stride, .mask_stride = mask_stride,
                            .scale = 1.0f / __builtin_sqrtf((float)D)};
    attend_cached(&a, threads);
    gemv_pooled(p[PROJ_W], s[PROJ_S], att, p[PROJ_B], tmp, B, C, H * D, threads);
    for (size_t i = 0; i < BC; i++) x[i] += tmp[i];
    norm_rows(x, p[LN2_W], p[LN2_B], xn, B, C, dims[DIM_NORM], eps);
    gemv_pooled(p[FC_W], s[FC_S], xn, p[FC_B], h, B, F2, C, threads);
    if (mlp == MLP_SWIGLU)
        for (int b = 0; b < B; b++) swiglu_row(h + (size_t)b * F2, h + (size_t)b * F2 + F, act + (size_t)b * F, F);
    else if (mlp == MLP_RELU2) relu2_span(h, act, (long)B * F);
    else gelu_span(h, act, (long)B * F);
    gemv_pooled(p[MP_W], s[MP_S], act, p[MP_B], tmp, B, C, F, threads);
    for (size_t i = 0; i < BC; i++) x[i] += tmp[i];
}

/* L blocks in a row for one decode step of B rows (at most MAX_ROWS; returns -1, doing nothing, past
 * it): x (B, C) in place. Each row's new key and value go to slot `pos` of its block's cache kc[l],
 * vc[l] (row b at b row_stride, K heads head_stride floats apart, slots D floats apart), and its
 * query attends to the slots 0..pos that mask marks real (as in block.c). positions (B): each row's
 * rotary position (its real tokens before this one: left padding does not count); inv_freq (D / 2)
 * the rotary frequencies, NULL for none (learned positions, added to x by the caller). p holds
 * LLAMA_NSLOTS pointers per block, scales BLOCK_NSCALES per block (int8 linear weights) or is
 * NULL (fp32). eps: the block norms', qk_eps: QK-norm's. scratch holds sg_llama_block1_scratch(B,
 * dims, pos + 1, threads) floats. */
int sg_llama_blocks1(float *x, const float **p, const float **scales, float **kc, float **vc, long head_stride,
                     long row_stride, int B, int pos, const int64_t *positions, const int64_t *mask, long mask_stride,
                     const int *dims, int L, const float *inv_freq, float eps, float qk_eps, float *scratch,
                     int threads) {
    if (B < 1 || B > MAX_ROWS) return -1;
    int D = dims[DIM_D];
    float *cs = NULL;
    if (inv_freq) { /* every layer's angles: rotary_angles' (model.py), position * inv_freq in float */
        cs = scratch;
        scratch += (size_t)B * D;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < D / 2; i++) {
                float a = (float)positions[b] * inv_freq[i];
                cs[(size_t)b * D + i] = cosf(a);
                cs[(size_t)b * D + D / 2 + i] = sinf(a);
            }
    }
    pool_lock();
    for (int l = 0; l < L; l++)
        llama_block1(x, p + LLAMA_NSLOTS * l, scales ? scales + BLOCK_NSCALES * l : NULL, kc[l], vc[l], head_stride,
                     row_stride, B, pos, mask, mask_stride, dims, cs, eps, qk_eps, scratch, threads);
    pool_unlock();
    return 0;
}
