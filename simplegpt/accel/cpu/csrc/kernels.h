/* What the library's files share among themselves (hidden: not part of api.h's ABI). */
#ifndef SIMPLEGPT_KERNELS_H
#define SIMPLEGPT_KERNELS_H
#include <stddef.h>
#include <stdint.h>
#include "api.h"
#include "simd.h"
#include "slots.h"

#define MAX_THREADS 64 /* the decoding pool's threads; part numbers fit in 8 bits */
#define MAX_ROWS 16    /* rows of a decoding product: simplegpt.accel.cpu.MAX_ROWS (lib.py checks) */
#define CHUNK 4096     /* floats per OpenMP work item in the elementwise loops */
/* The elementwise loops: the body runs once per chunk of CHUNK of the n floats, in parallel, with
 * i (advanced by the body) from the chunk's start to its end. */
#define SG_FOR_EACH_CHUNK(n, i, end)                                                               \
    _Pragma("omp parallel for schedule(static)")                                                  \
    for (long sg_chunk = 0; sg_chunk < ((n) + CHUNK - 1) / CHUNK; sg_chunk++)                     \
        for (long i = sg_chunk * CHUNK, end = i + CHUNK < (n) ? i + CHUNK : (n), sg_once = 1; sg_once; sg_once = 0)

/* pool.c: the decoding kernels' spinning pool. A call runs fn(arg, part, parts) for part = 0..parts-1,
 * part 0 on the calling thread, while holding the pool (pool_lock: one call at a time). */
typedef void (*pool_fn)(void *arg, int part, int parts);
void pool_lock(void);
void pool_unlock(void);
int pool_parts(int threads);
void pool_run(pool_fn fn, void *arg, int parts);

/* gemv.c: y = x W^T + b for M <= MAX_ROWS rows on the pool (int8 W where scale is not NULL); the
 * caller holds the pool */
void gemv_pooled(const void *W, const float *scale, const float *x, const float *b, float *y, int M, int N, int K,
                 int threads);

/* layernorm.c: one row of LayerNorm, the op's only forward (w required, b may be NULL) */
void layernorm_row(const float *xr, const float *w, const float *b, float *yr, float *mean, float *rstd, int C,
                   float eps);
void residual_layernorm_fwd(const float *x, const float *h, const float *hb, float *x2, const float *eb, float *xb,
                            const float *w, const float *b, float *y, float *mean, float *rstd, long R, int C,
                            float eps);

/* gelu.c: GPT-2's tanh-GELU of n floats on the calling thread, the op's only forward loop */
void gelu_span(const float *x, float *y, long n);
void bias_gelu_fwd(float *u, const float *b, float *y, long M, int N);
int gelu_bwd_db(const float *u, const float *dy, float *du, float *db, long M, int N);

/* rmsnorm.c, rope.c, activation.c: one row (span) of the Llama-style ops on the calling thread, the
 * ops' only forward loops (the decode step, llama_decode.c, calls them per row) */
void rmsnorm_row(const float *xr, const float *w, float *yr, float *rstd, int C, float eps);
void rope_row(const float *x, const float *c, const float *s, float *y, int D, float sign);
void swiglu_row(const float *g, const float *u, float *yr, int F);
void relu2_span(const float *x, float *y, long n);

/* attention.c: the softmax of training, decoding and the loss */
float softmax_row(float *p, int n);

/* model.c: the cross-entropy of the whole-model passes (model.c's GPT-2, llama_model.c's) */
#define IGNORE_INDEX (-100)
int targets_ok(const long *tgt, long M, int V);
double xent_rows(float *logits, const long *tgt, long M, int V, long *count);
void xent_grad(const float *probs, const long *tgt, long M, int V, float scale, float *dlogits);
/* attention_decode.c: one decode step (G query heads per key/value head) */
struct attend_args {
    const float *q, *k, *v;
    float *out, *scores;
    const int64_t *mask;
    int B, H, G, S, D;
    long q_stride, head_stride, row_stride, mask_stride;
    float scale;
};
void attend_cached(const struct attend_args *a, int threads);

/* matmul.c: row-major products in the BLAS torch uses (sg_set_sgemm), and bias gradients */
void mm_xwt(const float *X, const float *W, float *Y, int M, int N, int K, float beta);
void mm_ab(const float *A, const float *B, float *Y, int M, int N, int K);
void mm_atb(const float *A, const float *B, float *Y, int M, int N, int K);
#define COLSUM_ROWS 32 /* rows per work item of the column sums; items are then summed in order */
void sum_partials(const float *partial, long items, int N, float *out);
int colsum(const float *a, long M, int N, float *out);

#endif
