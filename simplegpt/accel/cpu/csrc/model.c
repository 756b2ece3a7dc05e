/* The whole model with its loss, for a training step (training.py's model_loss): token and position
 * embeddings, the L blocks (block.c), the final LayerNorm, the output head tied to the token
 * embedding and the mean cross-entropy over the targets that are not IGNORE_INDEX: one call each
 * way, so that the step spends no time in Python or autograd between layers. */
#include "kernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- the loss of the whole-model passes (this file's and llama_model.c's) ---------------------- */

/* whether every target is in [0, V) or IGNORE_INDEX */
int targets_ok(const long *tgt, long M, int V) {
    for (long r = 0; r < M; r++)
        if (tgt[r] != IGNORE_INDEX && (tgt[r] < 0 || tgt[r] >= V)) return 0;
    return 1;
}

/* The logits (M, V) become their softmax rows in place; returns the mean of -log p[target] over the
 * targets that are not IGNORE_INDEX (NAN without any), their number into *count. Each term is
 * lse - logit[target], summed in row order (the same bits on any thread count). */
double xent_rows(float *logits, const long *tgt, long M, int V, long *count) {
    double total = 0.0;
    long n = 0;
    for (long r = 0; r < M; r++) {
        float z = tgt[r] != IGNORE_INDEX ? logits[r * V + tgt[r]] : 0.0f;
        float lse = softmax_row(logits + r * V, V);
        if (tgt[r] != IGNORE_INDEX) {
            total += (double)lse - z;
            n++;
        }
    }
    *count = n;
    return n ? total / n : NAN;
}

/* dlogits (M, V) of scale * the summed loss: (softmax - onehot(target)) scale per counted row, 0 elsewhere */
void xent_grad(const float *probs, const long *tgt, long M, int V, float scale, float *dlogits) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) {
        float *d = dlogits + r * V;
        const float *p = probs + r * V;
        if (tgt[r] == IGNORE_INDEX) {
            memset(d, 0, V * sizeof(float));
            continue;
        }
        for (int i = 0; i < V; i++) d[i] = p[i] * scale;
        d[tgt[r]] -= scale;
    }
}

typedef struct {
    float *xs;            /* (L + 1, M, C): each block's input, then the last block's output */
    float *const *saved;  /* L blocks' sg_block_saved_floats() each */
    float *lnf, *lnf_mean, *lnf_rstd;
    float *probs;         /* (M, V) softmax of the logits */
} gpt_saved;

/* The floats of what the forward keeps, in L + 2 buffers: bufs[0] the blocks' inputs ((L + 1) M C),
 * bufs[1..L] one block's sg_block_saved_floats() each, bufs[L + 1] the head's (M C + 2 M + M V).
 * Separate buffers stay under glibc's largest heap block at the sizes of CPU training, where one
 * buffer of all of them would be mapped fresh (and faulted in page by page) every step. */
long sg_gpt_head_floats(int B, int T, int C, int V) {
    long M = (long)B * T;
    return M * C + 2 * M + M * V;
}

static gpt_saved carve_gpt(float *const *bufs, int B, int T, int C, int L) {
    long M = (long)B * T;
    gpt_saved s;
    s.xs = bufs[0];
    s.saved = bufs + 1;
    s.lnf = bufs[L + 1];
    s.lnf_mean = s.lnf + M * C;
    s.lnf_rstd = s.lnf_mean + M;
    s.probs = s.lnf_rstd + M;
    return s;
}

/* The mean loss into *loss and the number of counted targets into *count. params: wte (V, C),
 * wpe (>= T, C), then BLOCK_NSLOTS per block (as for sg_block_fwd), then ln_f's weight and bias (bias may
 * be NULL). Returns 1, 0 without memory, -1 for a target outside [0, V) that is not IGNORE_INDEX. */
int sg_gpt_fwd(const long *idx, const long *tgt, int B, int T, int C, int V, int L, int F, int H, float eps,
               float *const *params, float *const *bufs, double *loss, long *count) {
    long M = (long)B * T;
    if (!targets_ok(tgt, M, V)) return -1;
    gpt_saved s = carve_gpt(bufs, B, T, C, L);
    const float *wte = params[0], *wpe = params[1];
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) {
        const float *e = wte + idx[r] * C, *p = wpe + (r % T) * C;
        for (int i = 0; i < C; i++) s.xs[r * C + i] = e[i] + p[i];
    }
    for (int l = 0; l < L; l++)
        if (!sg_block_fwd(s.xs + l * M * C, params + 2 + BLOCK_NSLOTS * l, s.xs + (l + 1) * M * C, s.saved[l], B, T, C, F, H,
                          eps, eps))
            return 0;
    float *const *lnf = params + 2 + BLOCK_NSLOTS * L;
    sg_layernorm_fwd(s.xs + L * M * C, lnf[0], lnf[1], s.lnf, s.lnf_mean, s.lnf_rstd, M, C, eps);
    mm_xwt(s.lnf, wte, s.probs, (int)M, V, C, 0.0f);
    *loss = xent_rows(s.probs, tgt, M, V, count);
    return 1;
}

/* Gradients of scale * (the forward's summed loss over counted targets) (scale = dloss / count)
 * into grads, laid out as params (NULL where none is wanted; wte's gathers the head's and the
 * embedding's). Returns 0 if there was no memory. */
int sg_gpt_bwd(const long *idx, const long *tgt, int B, int T, int C, int V, int L, int F, int H, float scale,
               float *const *params, float *const *bufs, float *const *grads, int n_positions) {
    long M = (long)B * T;
    gpt_saved s = carve_gpt(bufs, B, T, C, L);
    float *work = malloc(((size_t)M * V + 2 * (size_t)M * C + C) * sizeof(float));
    if (!work) return 0;
    float *dlogits = work, *dx = dlogits + M * V, *dprev = dx + M * C, *unused = dprev + M * C;
    const float *wte = params[0];
    int ok = 1;
    xent_grad(s.probs, tgt, M, V, scale, dlogits);
    if (grads[0]) mm_atb(dlogits, s.lnf, grads[0], (int)M, V, C); /* the head's share of wte's gradient */
    mm_ab(dlogits, wte, dprev, (int)M, C, V);
    float *const *lnf = params + 2 + BLOCK_NSLOTS * L, *const *dlnf = grads + 2 + BLOCK_NSLOTS * L;
    ok &= sg_layernorm_bwd(s.xs + L * M * C, lnf[0], s.lnf_mean, s.lnf_rstd, dprev, NULL, dx,
                           dlnf[0] ? dlnf[0] : unused, dlnf[1], M, C);
    for (int l = L - 1; l >= 0 && ok; l--) {
        ok &= sg_block_bwd(s.xs + l * M * C, params + 2 + BLOCK_NSLOTS * l, s.saved[l], dx, dprev, grads + 2 + BLOCK_NSLOTS * l, B, T,
                           C, F, H);
        float *t = dx;
        dx = dprev;
        dprev = t;
    }
    /* the embeddings: rows added in order, so the sums do not depend on the thread count */
    if (ok && grads[0]) {
        for (long r = 0; r < M; r++) {
            float *g = grads[0] + idx[r] * C;
            for (int i = 0; i < C; i++) g[i] += dx[r * C + i];
        }
    }
    if (ok && grads[1]) {
        memset(grads[1], 0, (size_t)n_positions * C * sizeof(float));
        for (long r = 0; r < M; r++) {
            float *g = grads[1] + (r % T) * C;
            for (int i = 0; i < C; i++) g[i] += dx[r * C + i];
        }
    }
    free(work);
    return ok;
}
