/* Attention for one decode step: a query per row and head against the KV cache, on the decoding
 * pool (pool.c); for GPT-2's decode block (block.c's attend_cached call) and for any model's step
 * (sg_attn_decode). Grouped-query attention reads key/value head h / G for query head h.
 *
 * out[b, h] = softmax(q[b, h] . k[b, h / G, s] * scale over the slots s < S that mask[b] marks
 * real) @ v[b, h / G] (struct attend_args in kernels.h): q rows are q_stride floats apart, heads D
 * apart; out is (B, H, D) contiguous; k and v hold each row's (H / G, S, D) with rows D floats
 * apart, heads head_stride and batch rows row_stride floats apart (a KV cache slice). mask: NULL
 * (every slot real), else B rows of int64, mask_stride apart, 0 = padding. scores holds S floats
 * per part. */
#include "kernels.h"
#include <stdlib.h>

/* Rows of different lengths: each row's padding is skipped, not computed (its scores and weighted
 * values are never formed), and scanned only once per row: a row's heads start at its first real
 * slot (`first`, found once per step), so a short row beside a long one costs its own keys. */
struct attend_job {
    const struct attend_args *a;
    int first[MAX_ROWS];  /* each row's first real slot (S: none) */
    long cost[MAX_ROWS + 1]; /* cost[b]: the work of rows before b, a row's keys + 1 (its fixed part) */
};

static void attend_head(const struct attend_args *a, int b, int h, int first, float *scores) {
    int D = a->D, S = a->S, n = 0;
    const float *qh = a->q + (size_t)b * a->q_stride + (size_t)h * D;
    const float *kh = a->k + (size_t)b * a->row_stride + (size_t)(h / a->G) * a->head_stride;
    const float *vh = a->v + (size_t)b * a->row_stride + (size_t)(h / a->G) * a->head_stride;
    const int64_t *real = a->mask ? a->mask + (size_t)b * a->mask_stride : NULL;
    float *oh = a->out + ((size_t)b * a->H + h) * D;
    for (int s = first; s < S; s++) { /* the real slots' scores, side by side */
        if (real && !real[s]) continue;
        const float *ks = kh + (size_t)s * D;
        float d = 0.0f;
        int i = 0;
        if (D >= 8) {
            __m256 acc = _mm256_setzero_ps();
            for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(ks + i), acc);
            d = hsum(acc);
        }
        for (; i < D; i++) d += qh[i] * ks[i];
        scores[n++] = d * a->scale;
    }
    for (int i = 0; i < D; i++) oh[i] = 0.0f;
    if (!n) return;
    softmax_row(scores, n);
    n = 0;
    for (int s = first; s < S; s++) {
        if (real && !real[s]) continue;
        float p = scores[n++];
        if (p == 0.0f) continue;
        const float *vs = vh + (size_t)s * D;
        for (int i = 0; i < D; i++) oh[i] += p * vs[i];
    }
}

/* The (row, head) pairs split between the parts by their work, not their count: a part takes the
 * pairs whose work starts in its share (rows of 1000 keys beside rows of 10 would otherwise leave
 * one thread with most of it). Which part runs a pair does not change its numbers. */
static void attend_part(void *arg, int part, int parts) {
    const struct attend_job *j = arg;
    const struct attend_args *a = j->a;
    long total = j->cost[a->B] * a->H;
    for (int b = 0; b < a->B; b++) {
        long row = j->cost[b + 1] - j->cost[b];
        for (int h = 0; h < a->H; h++) {
            long start = j->cost[b] * a->H + h * row;
            if ((int)(start * parts / total) == part)
                attend_head(a, b, h, j->first[b], a->scores + (size_t)part * a->S);
        }
    }
}

/* the (row, head) pairs split between the pool's threads (the caller holds the pool); one thread
 * below min_keys real keys in all, where waking the workers costs more than the work. B is at most
 * MAX_ROWS. */
void attend_cached(const struct attend_args *a, int threads) {
    struct attend_job j = {.a = a};
    j.cost[0] = 0;
    for (int b = 0; b < a->B; b++) {
        const int64_t *real = a->mask ? a->mask + (size_t)b * a->mask_stride : NULL;
        int first = 0, keys = a->S;
        if (real) {
            while (first < a->S && !real[first]) first++;
            keys = 0;
            for (int s = first; s < a->S; s++) keys += real[s] != 0;
        }
        j.first[b] = first;
        j.cost[b + 1] = j.cost[b] + keys + 1;
    }
    int parts = pool_parts(threads), min_keys = 64;
    if (parts > a->B * a->H) parts = a->B * a->H;
    if (parts < 1 || j.cost[a->B] - a->B < min_keys) parts = 1;
    pool_run(attend_part, &j, parts);
}

/* out (B, H, D) = one decode step's attention (see the top of this file) for any number of rows,
 * MAX_ROWS at a time, on `threads` of the pool; H is a multiple of the key/value heads' count,
 * G = H / (key/value heads). Returns 0 if there was no memory for the scores. */
int sg_attn_decode(const float *q, const float *k, const float *v, float *out, const int64_t *mask, long mask_stride,
                   int B, int H, int G, int S, int D, long q_stride, long head_stride, long row_stride, float scale,
                   int threads) {
    pool_lock();
    float *scores = malloc(sizeof(float) * (size_t)S * pool_parts(threads < 1 ? 1 : threads));
    int ok = scores != NULL;
    for (int b = 0; ok && b < B; b += MAX_ROWS) {
        struct attend_args a = {.q = q + (size_t)b * q_stride, .k = k + (size_t)b * row_stride,
                                .v = v + (size_t)b * row_stride, .out = out + (size_t)b * H * D, .scores = scores,
                                .mask = mask ? mask + (size_t)b * mask_stride : NULL, .B = B - b < MAX_ROWS ? B - b : MAX_ROWS,
                                .H = H, .G = G, .S = S, .D = D, .q_stride = q_stride, .head_stride = head_stride,
                                .row_stride = row_stride, .mask_stride = mask_stride, .scale = scale};
        attend_cached(&a, threads);
    }
    pool_unlock();
    free(scores);
    return ok;
}
