/* The whole model with the Llama-style options and its loss, for a training step (llama_model.py):
 * what model.c does for GPT-2, one call each way, for blocks with RMSNorm or LayerNorm, rotary or
 * learned positions, grouped-query attention, QK-norm, a SwiGLU, ReLU^2 or GELU MLP, biases or
 * none, and a tied or untied head. Composed of the op kernels as llama_ops.py's autograd functions
 * compose them (_QKVAttention: QK-norm, then the rotation, then attention, over c_attn's q | k | v
 * through strides; _FusedSwiGLU over c_fc's gate | up), the products in torch's sgemm (matmul.c),
 * the rest on OpenMP's threads, every sum in a fixed order: the same bits on any thread count.
 *
 * params: wte (V, C), wpe (>= T, C) or NULL (rotary positions), the head (V, C) or NULL (tied to
 * wte), then LLAMA_NSLOTS per block (llama.h), then the final norm's weight and bias (either may be
 * NULL for RMSNorm; LayerNorm needs its weight). dims: llama.h's. */
#include "kernels.h"
#include "llama.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { P_WTE, P_WPE, P_HEAD, P_BLOCKS };

typedef struct {
    int C, H, K, D, F, F2, W, HD, KD, mlp, rms, qk_norm, rotary;
} shape;

static shape shape_of(const int *dims, int rotary) {
    shape s = {.C = dims[DIM_C], .H = dims[DIM_H], .K = dims[DIM_K], .D = dims[DIM_D], .F = dims[DIM_F],
               .mlp = dims[DIM_MLP], .rms = dims[DIM_NORM] == NORM_RMS, .qk_norm = dims[DIM_QK_NORM],
               .rotary = rotary};
    s.F2 = s.mlp == MLP_SWIGLU ? 2 * s.F : s.F;
    s.HD = s.H * s.D;
    s.KD = s.K * s.D;
    s.W = s.HD + 2 * s.KD;
    return s;
}

/* What a block's forward keeps for the backward, carved in this order out of one buffer of
 * sg_llama_saved_floats() floats. qr, kr: the queries and keys after QK-norm and the rotation
 * ((M, H D) and (M, K D)), only where either applies (else attention reads them in qkv); rq, rk
 * QK-norm's rstd per head and token. mean1/mean2 are LayerNorm's only. */
typedef struct {
    float *ln1, *mean1, *rstd1, *qkv, *qr, *kr, *rq, *rk, *att, *lse, *x2, *ln2, *mean2, *rstd2, *u, *g;
} block_saved;

static block_saved carve(float *m, long M, const shape *s) {
    block_saved b;
    int moved = s->qk_norm || s->rotary;
    b.ln1 = m; m += M * s->C;
    b.mean1 = m; m += M;
    b.rstd1 = m; m += M;
    b.qkv = m; m += M * s->W;
    b.qr = moved ? m : NULL; m += moved ? M * s->HD : 0;
    b.kr = moved ? m : NULL; m += moved ? M * s->KD : 0;
    b.rq = s->qk_norm ? m : NULL; m += s->qk_norm ? M * s->H : 0;
    b.rk = s->qk_norm ? m : NULL; m += s->qk_norm ? M * s->K : 0;
    b.att = m; m += M * s->HD;
    b.lse = m; m += M * s->H;
    b.x2 = m; m += M * s->C;
    b.ln2 = m; m += M * s->C;
    b.mean2 = m; m += M;
    b.rstd2 = m; m += M;
    b.u = m; m += M * s->F2;
    b.g = m;
    return b;
}

/* floats of one block's saved buffer for B rows of T tokens; rotary: whether positions are rotary */
long sg_llama_saved_floats(int B, int T, const int *dims, int rotary) {
    shape s = shape_of(dims, rotary);
    long M = (long)B * T, moved = s.qk_norm || s.rotary;
    return M * (3L * s.C + 4 + s.W + moved * (s.HD + s.KD) + (s.qk_norm ? s.H + s.K : 0) + s.HD + s.H + s.F2 + s.F);
}

/* y = the norm of each row of x (R, C); mean (LayerNorm only) and rstd kept for the backward */
static void norm_fwd(const shape *s, const float *x, const float *w, const float *b, float *y, float *mean,
                     float *rstd, long R, float eps) {
    if (s->rms) sg_rmsnorm_fwd(x, w, y, rstd, R, s->C, eps);
    else sg_layernorm_fwd(x, w, b, y, mean, rstd, R, s->C, eps);
}

/* dx = the norm's backward of dy, plus add (NULL: none); dw, db the gain's and bias's gradients
 * (NULL: not wanted). unused: C floats for a LayerNorm gain's gradient nobody wants. */
static int norm_bwd(const shape *s, const float *x, const float *w, const float *mean, const float *rstd,
                    const float *dy, const float *add, float *dx, float *dw, float *db, float *unused, long R) {
    int C = s->C;
    if (!s->rms) return sg_layernorm_bwd(x, w, mean, rstd, dy, add, dx, dw ? dw : unused, db, R, C);
    if (!sg_rmsnorm_bwd(x, w, rstd, dy, dx, w ? dw : NULL, R, C)) return 0;
    if (add) {
        SG_FOR_EACH_CHUNK(R * C, i, end) for (; i < end; i++) dx[i] += add[i];
    }
    return 1;
}

/* Y (M, N) = X (M, K) W (N, K)^T + b (b may be NULL) */
static void linear_fwd(const float *X, const float *W, const float *b, float *Y, long M, int N, int K) {
    if (b) {
#pragma omp parallel for schedule(static)
        for (long r = 0; r < M; r++) memcpy(Y + r * N, b, N * sizeof(float));
    }
    mm_xwt(X, W, Y, (int)M, N, K, b ? 1.0f : 0.0f);
}

/* a (B, n heads, T, D) view of rows ld floats apart, heads D apart: its three strides */
static void head_strides(long *st, int T, int D, long ld) {
    st[0] = T * ld;
    st[1] = D;
    st[2] = ld;
}

/* the attention's q, k, v, out strides (attention.c's first four tensors) and q, k */
static void attn_views(const shape *s, const block_saved *b, int T, long *st, const float **q, const float **k) {
    int moved = s->qk_norm || s->rotary;
    *q = moved ? b->qr : b->qkv;
    *k = moved ? b->kr : b->qkv + s->HD;
    head_strides(st, T, s->D, moved ? s->HD : s->W);
    head_strides(st + 3, T, s->D, moved ? s->KD : s->W);
    head_strides(st + 6, T, s->D, s->W);
    head_strides(st + 9, T, s->D, s->HD);
}

static float attn_scale(int D) { return (float)(1.0 / sqrt((double)D)); } /* as llama_ops.py's */

/* y (M, C) = the block on x (M, C): x2 = x + proj(attention(qkv(norm1(x)))), y = x2 + mlp(norm2(x2));
 * cos, sin (T, D / 2) or NULL. Returns 0 if attention had no memory for its scratch. */
static int block_fwd(const shape *s, const float *x, float *const *p, float *y, float *saved, int B, int T,
                     const float *cos, const float *sin, float eps, float qk_eps) {
    long M = (long)B * T;
    int C = s->C, H = s->H, K = s->K, D = s->D, W = s->W, HD = s->HD, KD = s->KD, F = s->F, F2 = s->F2;
    block_saved b = carve(saved, M, s);
    norm_fwd(s, x, p[LN1_W], p[LN1_B], b.ln1, b.mean1, b.rstd1, M, eps);
    linear_fwd(b.ln1, p[ATTN_W], p[ATTN_B], b.qkv, M, W, C);
    if (s->qk_norm) { /* each head's D floats, into qr and kr */
        sg_rmsnorm_fwd_ld(b.qkv, W, p[Q_NORM_W], b.qr, HD, b.rq, M, H, D, qk_eps);
        sg_rmsnorm_fwd_ld(b.qkv + HD, W, p[K_NORM_W], b.kr, KD, b.rk, M, K, D, qk_eps);
    }
    if (s->rotary) { /* from qkv into qr and kr, or in place after QK-norm */
        long xs[3], ys[3];
        head_strides(xs, T, D, s->qk_norm ? HD : W);
        head_strides(ys, T, D, HD);
        sg_rope(s->qk_norm ? b.qr : b.qkv, xs, cos, sin, 0, b.qr, ys, B, H, T, D, 0);
        head_strides(xs, T, D, s->qk_norm ? KD : W);
        head_strides(ys, T, D, KD);
        sg_rope(s->qk_norm ? b.kr : b.qkv + HD, xs, cos, sin, 0, b.kr, ys, B, K, T, D, 0);
    }
    long st[12];
    const float *q, *k;
    attn_views(s, &b, T, st, &q, &k);
    if (!sg_attn_gqa_fwd(q, k, b.qkv + HD + KD, b.att, b.lse, st, B, T, H, H / K, D, attn_scale(D))) return 0;
    mm_xwt(b.att, p[PROJ_W], y, (int)M, C, HD, 0.0f); /* h, in y for now */
    const float *hb = p[PROJ_B], *eb = p[MP_B];
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) { /* x2 = x + h + proj_b; y = x2 + mp_b, which the MLP adds onto; norm2(x2) */
        const float *xr = x + r * C;
        float *x2 = b.x2 + r * C, *yr = y + r * C;
        for (int i = 0; i < C; i++) {
            float v = xr[i] + yr[i] + (hb ? hb[i] : 0.0f);
            x2[i] = v;
            yr[i] = v + (eb ? eb[i] : 0.0f);
        }
        if (s->rms) rmsnorm_row(x2, p[LN2_W], b.ln2 + r * C, b.rstd2 + r, C, eps);
        else layernorm_row(x2, p[LN2_W], p[LN2_B], b.ln2 + r * C, b.mean2 + r, b.rstd2 + r, C, eps);
    }
    if (s->mlp == MLP_GELU) {
        mm_xwt(b.ln2, p[FC_W], b.u, (int)M, F, C, 0.0f);
        bias_gelu_fwd(b.u, p[FC_B], b.g, M, F);
    } else {
        linear_fwd(b.ln2, p[FC_W], p[FC_B], b.u, M, F2, C);
        if (s->mlp == MLP_SWIGLU) sg_swiglu_fwd(b.u, b.u + F, b.g, M, F, F2, F2);
        else sg_relu2_fwd(b.u, b.g, M * F);
    }
    mm_xwt(b.g, p[MP_W], y, (int)M, C, F, 1.0f);
    return 1;
}

/* floats of block_bwd's work buffer */
static long block_work_floats(const shape *s, long M) {
    long a = s->F > s->HD ? s->F : s->HD;
    return M * (a + s->F2 + s->W + 2L * s->C) + s->C;
}

/* dx (M, C) from dy (M, C), and each parameter's gradient into grad[i] where it is not NULL
 * (dx must not be dy). work: block_work_floats() floats. Returns 0 if there was no memory. */
static int block_bwd(const shape *s, const float *x, float *const *p, const float *saved_, const float *dy, float *dx,
                     float *const *grad, int B, int T, const float *cos, const float *sin, float *work) {
    long M = (long)B * T;
    int C = s->C, H = s->H, K = s->K, D = s->D, W = s->W, HD = s->HD, KD = s->KD, F = s->F, F2 = s->F2;
    block_saved b = carve((float *)saved_, M, s);
    long a = F > HD ? F : HD;
    float *dg = work, *datt = work, *du = dg + M * a, *dqkv = du + M * F2, *dln = dqkv + M * W, *dx2 = dln + M * C;
    float *unused = dx2 + M * C;
    int ok = 1;
    /* MLP: y = x2 + act(ln2 fc_W^T + fc_b) mp_W^T + mp_b */
    if (grad[MP_W]) mm_atb(dy, b.g, grad[MP_W], (int)M, C, F);
    if (grad[MP_B]) ok &= colsum(dy, M, C, grad[MP_B]);
    mm_ab(dy, p[MP_W], dg, (int)M, F, C);
    if (s->mlp == MLP_GELU) {
        ok &= gelu_bwd_db(b.u, dg, du, grad[FC_B], M, F);
    } else {
        if (s->mlp == MLP_SWIGLU) sg_swiglu_bwd_ld(b.u, b.u + F, dg, du, du + F, M, F, F2, F2, F2);
        else sg_relu2_bwd(b.u, dg, du, M * F);
        if (grad[FC_B]) ok &= colsum(du, M, F2, grad[FC_B]);
    }
    if (grad[FC_W]) mm_atb(du, b.ln2, grad[FC_W], (int)M, F2, C);
    mm_ab(du, p[FC_W], dln, (int)M, C, F2);
    ok &= norm_bwd(s, b.x2, p[LN2_W], b.mean2, b.rstd2, dln, dy, dx2, grad[LN2_W], grad[LN2_B], unused, M);
    /* attention: x2 = x + attention(qkv) proj_W^T + proj_b */
    if (grad[PROJ_W]) mm_atb(dx2, b.att, grad[PROJ_W], (int)M, C, HD);
    if (grad[PROJ_B]) ok &= colsum(dx2, M, C, grad[PROJ_B]);
    mm_ab(dx2, p[PROJ_W], datt, (int)M, HD, C);
    long st[24];
    const float *q, *k;
    attn_views(s, &b, T, st, &q, &k);
    head_strides(st + 12, T, D, HD); /* dout */
    for (int t = 5; t < 8; t++) head_strides(st + 3 * t, T, D, W); /* dq, dk, dv: parts of dqkv */
    ok &= sg_attn_gqa_bwd(q, k, b.qkv + HD + KD, b.att, datt, b.lse, dqkv, dqkv + HD, dqkv + HD + KD, st, B, T, H,
                          H / K, D, attn_scale(D));
    if (s->rotary) { /* the inverse rotation, in place */
        sg_rope(dqkv, st + 15, cos, sin, 0, dqkv, st + 15, B, H, T, D, 1);
        sg_rope(dqkv + HD, st + 18, cos, sin, 0, dqkv + HD, st + 18, B, K, T, D, 1);
    }
    if (s->qk_norm) { /* through QK-norm, in place */
        ok &= sg_rmsnorm_bwd_ld(b.qkv, W, p[Q_NORM_W], b.rq, dqkv, W, dqkv, W, p[Q_NORM_W] ? grad[Q_NORM_W] : NULL, M,
                                H, D);
        ok &= sg_rmsnorm_bwd_ld(b.qkv + HD, W, p[K_NORM_W], b.rk, dqkv + HD, W, dqkv + HD, W,
                                p[K_NORM_W] ? grad[K_NORM_W] : NULL, M, K, D);
    }
    if (grad[ATTN_W]) mm_atb(dqkv, b.ln1, grad[ATTN_W], (int)M, W, C);
    if (grad[ATTN_B]) ok &= colsum(dqkv, M, W, grad[ATTN_B]);
    mm_ab(dqkv, p[ATTN_W], dln, (int)M, C, W);
    ok &= norm_bwd(s, x, p[LN1_W], b.mean1, b.rstd1, dln, dx2, dx, grad[LN1_W], grad[LN1_B], unused, M);
    return ok;
}

/* What the model keeps besides the blocks' buffers: bufs[0] each block's input, then the last
 * block's output ((L + 1) M C); bufs[1..L] a block's sg_llama_saved_floats() each; bufs[L + 1] the
 * final norm's output, mean and rstd, and the softmax of the logits (sg_gpt_head_floats(), model.c) */
typedef struct {
    float *xs, *lnf, *lnf_mean, *lnf_rstd, *probs;
} model_saved;

static model_saved carve_model(float *const *bufs, long M, int C, int L) {
    model_saved m = {.xs = bufs[0], .lnf = bufs[L + 1]};
    m.lnf_mean = m.lnf + M * C;
    m.lnf_rstd = m.lnf_mean + M;
    m.probs = m.lnf_rstd + M;
    return m;
}

/* The mean cross-entropy of the targets that are not IGNORE_INDEX into *loss, their number into
 * *count. idx, tgt (B, T); cos, sin (T, D / 2) the rotary tables (model.py's rotary_angles at
 * positions 0..T-1), NULL with learned positions; eps the block norms' and the final norm's epsilon,
 * qk_eps QK-norm's. Returns 1, 0 without memory, -1 for a target outside [0, V) that is not
 * IGNORE_INDEX. */
int sg_llama_fwd(const long *idx, const long *tgt, int B, int T, int V, int L, const int *dims, const float *cos,
                 const float *sin, float eps, float qk_eps, float *const *params, float *const *bufs, double *loss,
                 long *count) {
    long M = (long)B * T;
    if (!targets_ok(tgt, M, V)) return -1;
    shape s = shape_of(dims, cos != NULL);
    int C = s.C;
    model_saved m = carve_model(bufs, M, C, L);
    const float *wte = params[P_WTE], *wpe = params[P_WPE];
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) {
        const float *e = wte + idx[r] * C, *pe = wpe ? wpe + (r % T) * C : NULL;
        for (int i = 0; i < C; i++) m.xs[r * C + i] = e[i] + (pe ? pe[i] : 0.0f);
    }
    for (int l = 0; l < L; l++)
        if (!block_fwd(&s, m.xs + l * M * C, params + P_BLOCKS + LLAMA_NSLOTS * l, m.xs + (l + 1) * M * C,
                       bufs[1 + l], B, T, cos, sin, eps, qk_eps))
            return 0;
    float *const *nf = params + P_BLOCKS + LLAMA_NSLOTS * L;
    norm_fwd(&s, m.xs + L * M * C, nf[0], nf[1], m.lnf, m.lnf_mean, m.lnf_rstd, M, eps);
    mm_xwt(m.lnf, params[P_HEAD] ? params[P_HEAD] : wte, m.probs, (int)M, V, C, 0.0f);
    *loss = xent_rows(m.probs, tgt, M, V, count);
    return 1;
}

/* rows r of src (M, C) added to dst's row at[r] ... in row order: an embedding's gradient, the same
 * bits on any thread count (threads take columns) */
static void add_rows(float *dst, const float *src, const long *at, long M, int T, int C) {
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += 16) {
        int c1 = c0 + 16 < C ? c0 + 16 : C;
        for (long r = 0; r < M; r++) {
            float *d = dst + (at ? at[r] : r % T) * C;
            const float *x = src + r * C;
            for (int i = c0; i < c1; i++) d[i] += x[i];
        }
    }
}

/* Gradients of scale * (the forward's summed loss) (scale = dloss / count) into grads, laid out as
 * params (NULL where none is wanted; with a tied head wte's gathers the head's and the embedding's).
 * n_positions: wpe's rows. Returns 0 if there was no memory. */
int sg_llama_bwd(const long *idx, const long *tgt, int B, int T, int V, int L, const int *dims, const float *cos,
                 const float *sin, float scale, float *const *params, float *const *bufs, float *const *grads,
                 int n_positions) {
    long M = (long)B * T;
    shape s = shape_of(dims, cos != NULL);
    int C = s.C;
    model_saved m = carve_model(bufs, M, C, L);
    size_t bw = (size_t)block_work_floats(&s, M);
    float *work = malloc(((size_t)M * V + 2 * (size_t)M * C + bw) * sizeof(float));
    if (!work) return 0;
    float *dlogits = work, *dx = dlogits + M * V, *dprev = dx + M * C, *bwork = dprev + M * C;
    const float *head = params[P_HEAD] ? params[P_HEAD] : params[P_WTE];
    float *dhead = params[P_HEAD] ? grads[P_HEAD] : grads[P_WTE];
    int ok = 1;
    xent_grad(m.probs, tgt, M, V, scale, dlogits);
    if (dhead) mm_atb(dlogits, m.lnf, dhead, (int)M, V, C);
    mm_ab(dlogits, head, dprev, (int)M, C, V);
    float *const *nf = params + P_BLOCKS + LLAMA_NSLOTS * L, *const *dnf = grads + P_BLOCKS + LLAMA_NSLOTS * L;
    ok &= norm_bwd(&s, m.xs + L * M * C, nf[0], m.lnf_mean, m.lnf_rstd, dprev, NULL, dx, dnf[0], dnf[1],
                   bwork, M);
    for (int l = L - 1; l >= 0 && ok; l--) {
        ok &= block_bwd(&s, m.xs + l * M * C, params + P_BLOCKS + LLAMA_NSLOTS * l, bufs[1 + l], dx, dprev,
                        grads + P_BLOCKS + LLAMA_NSLOTS * l, B, T, cos, sin, bwork);
        float *t = dx;
        dx = dprev;
        dprev = t;
    }
    if (ok && grads[P_WTE]) {
        if (params[P_HEAD]) memset(grads[P_WTE], 0, (size_t)V * C * sizeof(float)); /* untied: the embedding's only */
        add_rows(grads[P_WTE], dx, idx, M, T, C);
    }
    if (ok && grads[P_WPE]) {
        memset(grads[P_WPE], 0, (size_t)n_positions * C * sizeof(float));
        add_rows(grads[P_WPE], dx, NULL, M, T, C);
    }
    free(work);
    return ok;
}
