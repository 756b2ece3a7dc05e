/* The training kernels' matrix products (block.c, model.c), in the BLAS that torch itself uses (its
 * Fortran sgemm_, whose address training.py hands over): the same products torch.mm would run,
 * called from here, so that a block is one call from Python and a split training step's threads
 * never wait for each other's Python in between (the GIL). All matrices are row-major. Also the
 * column sums that give the bias gradients, the same bits on any thread count. */
#include "kernels.h"
#include <stdlib.h>

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
static sgemm_fn sgemm_ptr;

void sg_set_sgemm(void *fn) { sgemm_ptr = (sgemm_fn)fn; }

/* Y (M, N) = X (M, K) W (N, K)^T + beta Y */
void mm_xwt(const float *X, const float *W, float *Y, int M, int N, int K, float beta) {
    const float one = 1.0f;
    sgemm_ptr("T", "N", &N, &M, &K, &one, W, &K, X, &K, &beta, Y, &N);
}

/* Y (M, N) = A (M, K) B (K, N) */
void mm_ab(const float *A, const float *B, float *Y, int M, int N, int K) {
    const float one = 1.0f, zero = 0.0f;
    sgemm_ptr("N", "N", &N, &M, &K, &one, B, &N, A, &K, &zero, Y, &N);
}

/* Y (N, K) = A (M, N)^T B (M, K): a weight's gradient */
void mm_atb(const float *A, const float *B, float *Y, int M, int N, int K) {
    const float one = 1.0f, zero = 0.0f;
    sgemm_ptr("N", "T", &K, &N, &M, &one, B, &K, A, &N, &zero, Y, &K);
}

/* out[i] = sum over items of partial[item][i] (items rows of N), in item order */
void sum_partials(const float *partial, long items, int N, float *out) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        float acc = 0.0f;
        for (long it = 0; it < items; it++) acc += partial[it * N + i];
        out[i] = acc;
    }
}

/* out[N] = column sums of a (M, N), per item of COLSUM_ROWS rows, then in item order */
int colsum(const float *a, long M, int N, float *out) {
    long items = (M + COLSUM_ROWS - 1) / COLSUM_ROWS;
    float *partial = calloc((size_t)items * N, sizeof(float));
    if (!partial) return 0;
#pragma omp parallel for schedule(static)
    for (long it = 0; it < items; it++) {
        long r1 = (it + 1) * COLSUM_ROWS < M ? (it + 1) * COLSUM_ROWS : M;
        float *pd = partial + it * N;
        for (long r = it * COLSUM_ROWS; r < r1; r++)
            for (int i = 0; i < N; i++) pd[i] += a[r * N + i];
    }
    sum_partials(partial, items, N, out);
    free(partial);
    return 1;
}
