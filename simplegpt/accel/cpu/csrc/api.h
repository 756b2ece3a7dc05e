/* The library's exported functions: what simplegpt/accel/cpu/lib.py loads, with the ctypes
 * signatures in its SIGNATURES table (tests/test_native_layout.py checks the two agree). Each is
 * documented where it is defined. Everything else in the library is hidden (-fvisibility=hidden). */
#ifndef SIMPLEGPT_API_H
#define SIMPLEGPT_API_H
#include <stdint.h>

#define SG_API __attribute__((visibility("default")))

/* pool.c: the decoding kernels' thread pool; OpenMP's thread count for the training kernels; the
 * build's variant (simd.h) */
SG_API int sg_init(int threads);
SG_API const char *sg_variant(void);
SG_API int sg_omp_threads(void);

/* gemv.c: matrix-vector products (fp32 and int8 weights) for up to sg_max_rows() rows */
SG_API int sg_max_rows(void);
SG_API void sg_gemv(const float *W, const float *x, const float *b, float *y, int M, int N, int K, int threads);
SG_API void sg_gemv_q8(const int8_t *W, const float *scale, const float *x, const float *b, float *y, int M, int N,
                       int K, int threads);

/* layernorm.c */
SG_API void sg_layernorm_fwd(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd,
                             long R, int C, float eps);
SG_API int sg_layernorm_bwd(const float *x, const float *w, const float *mean, const float *rstd, const float *dy,
                            const float *add, float *dx, float *dw, float *db, long R, int C);

/* rmsnorm.c */
SG_API void sg_rmsnorm_fwd(const float *x, const float *w, float *y, float *rstd, long R, int C, float eps);
SG_API int sg_rmsnorm_bwd(const float *x, const float *w, const float *rstd, const float *dy, float *dx, float *dw,
                          long R, int C);
SG_API void sg_rmsnorm_fwd_ld(const float *x, long ldx, const float *w, float *y, long ldy, float *rstd, long N, int M,
                              int C, float eps);
SG_API int sg_rmsnorm_bwd_ld(const float *x, long ldx, const float *w, const float *rstd, const float *dy, long ldy,
                             float *dx, long ldd, float *dw, long N, int M, int C);

/* rope.c */
SG_API void sg_rope_fwd(const float *x, const long *xs, const float *cos, const float *sin, long cs_b, float *y, int B,
                        int H, int T, int D, int inverse);
SG_API void sg_rope(const float *x, const long *xs, const float *cos, const float *sin, long cs_b, float *y,
                    const long *ys, int B, int H, int T, int D, int inverse);

/* gelu.c */
SG_API void sg_gelu_fwd(const float *x, float *y, long n);
SG_API void sg_gelu_bwd(const float *x, const float *dy, float *dx, long n);

/* activation.c */
SG_API void sg_swiglu_fwd(const float *gate, const float *up, float *y, long R, int F, long ldg, long ldu);
SG_API void sg_swiglu_bwd(const float *gate, const float *up, const float *dy, float *dgate, float *dup, long R, int F,
                          long ldg, long ldu);
SG_API void sg_swiglu_bwd_ld(const float *gate, const float *up, const float *dy, float *dgate, float *dup, long R,
                             int F, long ldg, long ldu, long ldd);
SG_API void sg_relu2_fwd(const float *x, float *y, long n);
SG_API void sg_relu2_bwd(const float *x, const float *dy, float *dx, long n);

/* attention.c */
SG_API int sg_attn_fwd(const float *qkv, float *out, float *lse, int B, int T, int C, int H, float scale);
SG_API int sg_attn_bwd(const float *qkv, const float *out, const float *dout, const float *lse, float *dqkv, int B,
                       int T, int C, int H, float scale);
SG_API int sg_attn_gqa_fwd(const float *q, const float *k, const float *v, float *out, float *lse, const long *strides,
                           int B, int T, int H, int G, int D, float scale);
SG_API int sg_attn_gqa_bwd(const float *q, const float *k, const float *v, const float *out, const float *dout,
                           const float *lse, float *dq, float *dk, float *dv, const long *strides, int B, int T, int H,
                           int G, int D, float scale);

/* attention_decode.c */
SG_API int sg_attn_decode(const float *q, const float *k, const float *v, float *out, const int64_t *mask,
                          long mask_stride, int B, int H, int G, int S, int D, long q_stride, long head_stride,
                          long row_stride, float scale, int threads);

/* matmul.c */
SG_API void sg_set_sgemm(void *fn);

/* block.c: a GPT-2 block, for one decode step (sg_blocks1) and for training (sg_block_fwd/bwd) */
SG_API const char *sg_block_slot(int i);
SG_API long sg_block1_scratch(int B, int C, int S, int threads);
SG_API int sg_blocks1(float *x, const float **p, const float **scales, float **kc, float **vc, long head_stride,
                      long row_stride, int B, int pos, const int64_t *mask, long mask_stride, int C, int H, int L,
                      float eps, float *scratch, int threads);
SG_API long sg_block_saved_floats(int B, int T, int C, int F, int H);
SG_API int sg_block_fwd(const float *x, float *const *prm, float *y, float *saved, int B, int T, int C, int F, int H,
                        float eps1, float eps2);
SG_API int sg_block_bwd(const float *x, float *const *prm, const float *saved, const float *dy, float *dx,
                        float *const *grad, int B, int T, int C, int F, int H);

/* llama_decode.c: a decode step of a model with the Llama-style options */
SG_API int sg_llama_slots(void);
SG_API long sg_llama_block1_scratch(int B, const int *dims, int S, int threads);
SG_API int sg_llama_blocks1(float *x, const float **p, const float **scales, float **kc, float **vc, long head_stride,
                            long row_stride, int B, int pos, const int64_t *positions, const int64_t *mask,
                            long mask_stride, const int *dims, int L, const float *inv_freq, float eps, float qk_eps,
                            float *scratch, int threads);

/* model.c: the whole model with its loss, for a training step */
SG_API long sg_gpt_head_floats(int B, int T, int C, int V);
SG_API int sg_gpt_fwd(const long *idx, const long *tgt, int B, int T, int C, int V, int L, int F, int H, float eps,
                      float *const *params, float *const *bufs, double *loss, long *count);
SG_API int sg_gpt_bwd(const long *idx, const long *tgt, int B, int T, int C, int V, int L, int F, int H, float scale,
                      float *const *params, float *const *bufs, float *const *grads, int n_positions);

/* llama_model.c: the whole model with the Llama-style options and its loss, for a training step */
SG_API long sg_llama_saved_floats(int B, int T, const int *dims, int rotary);
SG_API int sg_llama_fwd(const long *idx, const long *tgt, int B, int T, int V, int L, const int *dims,
                        const float *cos, const float *sin, float eps, float qk_eps, float *const *params,
                        float *const *bufs, double *loss, long *count);
SG_API int sg_llama_bwd(const long *idx, const long *tgt, int B, int T, int V, int L, const int *dims,
                        const float *cos, const float *sin, float scale, float *const *params, float *const *bufs,
                        float *const *grads, int n_positions);

/* adamw.c: AdamW with the gradients' norm for clipping */
SG_API int sg_sqnorm(float *const *g, const long *n, int count, int threads, double *out);
SG_API int sg_adamw(float *const *p, float *const *g, float *const *m, float *const *v, const long *n,
                    const double *hp, int count, float gscale, int threads);

#endif
