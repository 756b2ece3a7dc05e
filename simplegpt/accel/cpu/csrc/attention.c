/* Causal self-attention: for training, forward and backward over all positions of a fused q|k|v
 * buffer (sg_attn_fwd/bwd, on OpenMP's threads); for decoding, one new query per row and head
 * against a KV cache (attend_cached, on the pool). Both take their probabilities from one softmax,
 * softmax_row (as does model.c's loss). The products around it differ because the layouts do: the
 * training kernel transposes each head's keys into tiles once and reuses them for T queries; a
 * decode step has one query, and reads each cached key and value once, in place.
 *
 * Training: head h of row b reads q, k, v at columns h D, C + h D, 2C + h D of each token (the
 * layout of c_attn's output), so no transposes or copies of the inputs are needed, and writes its
 * output at columns h D of a (B, T, C) buffer (the layout c_proj reads). Every (b, h) pair is one
 * OpenMP work item, so results do not depend on the thread count. Sequences are short (the model
 * sends up to 256 positions here): each item keeps its (T, T) probabilities in scratch memory and
 * runs small register-tiled products, two query rows at a time. D = 8 DV with DV in 1, 2, 4, 8. */
#include "kernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>


typedef struct {
    float *kt, *vt; /* (D, Tp): the head's keys and values transposed, zero-padded to Tp columns */
    float *p, *ds;  /* (T + 1, Tp): probabilities and score gradients; zero right of the diagonal */
} scratch;

static float *scratch_alloc(scratch *s, int T, int D) {
    int Tp = (T + 15) & ~15;
    size_t n = (size_t)2 * D * Tp + (size_t)2 * (T + 1) * Tp;
    float *m = aligned_alloc(32, ((n * sizeof(float)) + 31) & ~(size_t)31);
    if (!m) return NULL;
    memset(m, 0, n * sizeof(float));
    s->kt = m;
    s->vt = m + (size_t)D * Tp;
    s->p = m + (size_t)2 * D * Tp;
    s->ds = s->p + (size_t)(T + 1) * Tp; /* p and ds have a spare row T for an odd last row's pair */
    return m;
}

/* the 8 x 8 block at src (rows ld apart) transposed into dst (rows ldd apart) */
static inline void transpose8x8(const float *src, long ld, float *dst, long ldd) {
#ifdef SG_PORTABLE
    for (int k = 0; k < 8; k++)
        for (int d = 0; d < 8; d++) dst[d * ldd + k] = src[k * ld + d];
#else
    __m256 r[8], t[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(src + k * ld);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(dst + k * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(dst + (k + 4) * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
#endif
}

/* transpose T rows of D floats (stride ld; D a multiple of 8) into (D, Tp) */
static void transpose_in(const float *src, long ld, float *dst, int T, int D, int Tp) {
    int t = 0;
    for (; t + 8 <= T; t += 8)
        for (int d = 0; d < D; d += 8) transpose8x8(src + (size_t)t * ld + d, ld, dst + (size_t)d * Tp + t, Tp);
    for (; t < T; t++)
        for (int d = 0; d < D; d++) dst[(size_t)d * Tp + t] = src[(size_t)t * ld + d];
}

#ifdef SG_AVX512
/* s0[j] = scale a0 . bt[:, j] and s1[j] = scale a1 . bt[:, j] for j < n rounded up to 16: two
 * rows share every load of bt (D, Tp), 16 columns a vector; eight accumulators (four d's apart)
 * hide the FMA latency. D is a multiple of 8. */
static inline void dots2(const float *a0, const float *a1, const float *bt, int D, int Tp, int n, float scale,
                         float *s0, float *s1) {
    __m512 sc = _mm512_set1_ps(scale);
    for (int j = 0; j < n; j += 16) {
        __m512 x[4], y[4];
        for (int u = 0; u < 4; u++) x[u] = y[u] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 4)
            for (int u = 0; u < 4; u++) {
                __m512 b = _mm512_loadu_ps(bt + (size_t)(d + u) * Tp + j);
                x[u] = _mm512_fmadd_ps(_mm512_set1_ps(a0[d + u]), b, x[u]);
                y[u] = _mm512_fmadd_ps(_mm512_set1_ps(a1[d + u]), b, y[u]);
            }
        __m512 sx = _mm512_add_ps(_mm512_add_ps(x[0], x[1]), _mm512_add_ps(x[2], x[3]));
        __m512 sy = _mm512_add_ps(_mm512_add_ps(y[0], y[1]), _mm512_add_ps(y[2], y[3]));
        _mm512_storeu_ps(s0 + j, _mm512_mul_ps(sx, sc));
        _mm512_storeu_ps(s1 + j, _mm512_mul_ps(sy, sc));
    }
}
#else
/* s0[j] = scale a0 . bt[:, j] and s1[j] = scale a1 . bt[:, j] for j < n rounded up to 16:
 * two rows share every load of bt (D, Tp); eight accumulators hide the FMA latency */
static inline void dots2(const float *a0, const float *a1, const float *bt, int D, int Tp, int n, float scale,
                         float *s0, float *s1) {
    __m256 sc = _mm256_set1_ps(scale);
    for (int j = 0; j < n; j += 16) {
        __m256 x00 = _mm256_setzero_ps(), x01 = x00, x10 = x00, x11 = x00;
        __m256 y00 = x00, y01 = x00, y10 = x00, y11 = x00;
        for (int d = 0; d < D; d += 2) {
            const float *r = bt + (size_t)d * Tp + j;
            __m256 b0 = _mm256_load_ps(r), b1 = _mm256_load_ps(r + 8);
            __m256 c0 = _mm256_load_ps(r + Tp), c1 = _mm256_load_ps(r + Tp + 8);
            __m256 p = _mm256_set1_ps(a0[d]), q = _mm256_set1_ps(a0[d + 1]);
            __m256 u = _mm256_set1_ps(a1[d]), v = _mm256_set1_ps(a1[d + 1]);
            x00 = _mm256_fmadd_ps(p, b0, x00);
            x01 = _mm256_fmadd_ps(p, b1, x01);
            y00 = _mm256_fmadd_ps(q, c0, y00);
            y01 = _mm256_fmadd_ps(q, c1, y01);
            x10 = _mm256_fmadd_ps(u, b0, x10);
            x11 = _mm256_fmadd_ps(u, b1, x11);
            y10 = _mm256_fmadd_ps(v, c0, y10);
            y11 = _mm256_fmadd_ps(v, c1, y11);
        }
        _mm256_storeu_ps(s0 + j, _mm256_mul_ps(_mm256_add_ps(x00, y00), sc));
        _mm256_storeu_ps(s0 + j + 8, _mm256_mul_ps(_mm256_add_ps(x01, y01), sc));
        _mm256_storeu_ps(s1 + j, _mm256_mul_ps(_mm256_add_ps(x10, y10), sc));
        _mm256_storeu_ps(s1 + j + 8, _mm256_mul_ps(_mm256_add_ps(x11, y11), sc));
    }
}
#endif

/* o0 = sum over j in [lo, hi) of w0[j ws] b[j] and o1 likewise with w1 (b: rows of D = 8 DV floats,
 * ldb apart): two output rows share every load of b. DV is a constant where this is inlined. */
static inline __attribute__((always_inline)) void wsum2(const float *w0, const float *w1, long ws, const float *b,
                                                        long ldb, int lo, int hi, float *o0, float *o1,
                                                        const int DV) {
    __m256 a0[8], a1[8];
#pragma GCC unroll 8
    for (int v = 0; v < DV; v++) a0[v] = a1[v] = _mm256_setzero_ps();
    for (int j = lo; j < hi; j++) {
        const float *r = b + (size_t)j * ldb;
        __m256 p = _mm256_set1_ps(w0[(size_t)j * ws]), q = _mm256_set1_ps(w1[(size_t)j * ws]);
#pragma GCC unroll 8
        for (int v = 0; v < DV; v++) {
            __m256 x = _mm256_loadu_ps(r + 8 * v);
            a0[v] = _mm256_fmadd_ps(p, x, a0[v]);
            a1[v] = _mm256_fmadd_ps(q, x, a1[v]);
        }
    }
#pragma GCC unroll 8
    for (int v = 0; v < DV; v++) {
        _mm256_storeu_ps(o0 + 8 * v, a0[v]);
        _mm256_storeu_ps(o1 + 8 * v, a1[v]);
    }
}

#ifdef SG_AVX512
/* wsum2 for D = 16 DV (DV in 1, 2, 4) floats: 16 a vector */
static inline __attribute__((always_inline)) void wsum2_16(const float *w0, const float *w1, long ws, const float *b,
                                                           long ldb, int lo, int hi, float *o0, float *o1,
                                                           const int DV) {
    __m512 a0[4], a1[4];
#pragma GCC unroll 4
    for (int v = 0; v < DV; v++) a0[v] = a1[v] = _mm512_setzero_ps();
    for (int j = lo; j < hi; j++) {
        const float *r = b + (size_t)j * ldb;
        __m512 p = _mm512_set1_ps(w0[(size_t)j * ws]), q = _mm512_set1_ps(w1[(size_t)j * ws]);
#pragma GCC unroll 4
        for (int v = 0; v < DV; v++) {
            __m512 x = _mm512_loadu_ps(r + 16 * v);
            a0[v] = _mm512_fmadd_ps(p, x, a0[v]);
            a1[v] = _mm512_fmadd_ps(q, x, a1[v]);
        }
    }
#pragma GCC unroll 4
    for (int v = 0; v < DV; v++) {
        _mm512_storeu_ps(o0 + 16 * v, a0[v]);
        _mm512_storeu_ps(o1 + 16 * v, a1[v]);
    }
}
#endif

/* With w a causal (T, Tp) matrix (rows Tp apart, zero right of the diagonal up to the next
 * multiple of 16 past it), rows i of out (ldo apart) = sum over j of W[i, j] b[j], where lower = 1
 * takes W = w (j in [0, i + 1)) and lower = 0 its transpose (j in [i, T), w read down column i) */
static void wsum_rows(const float *w, int T, int Tp, const float *b, long ldb, float *out, long ldo, int D, int lower) {
    float spare[64];
    long ws = lower ? 1 : Tp;
    for (int i = 0; i < T; i += 2) {
        int two = i + 1 < T;
        const float *w0 = lower ? w + (size_t)i * Tp : w + i, *w1 = two ? w0 + (lower ? Tp : 1) : w0;
        float *o0 = out + (size_t)i * ldo, *o1 = two ? o0 + ldo : spare;
        /* the union of both rows' ranges: entries outside a row's own range are zeros */
        int lo = lower ? 0 : i, hi = lower ? (two ? i + 2 : i + 1) : T;
        switch (D) {
        case 8: wsum2(w0, w1, ws, b, ldb, lo, hi, o0, o1, 1); break;
#ifdef SG_AVX512
        case 16: wsum2_16(w0, w1, ws, b, ldb, lo, hi, o0, o1, 1); break;
        case 32: wsum2_16(w0, w1, ws, b, ldb, lo, hi, o0, o1, 2); break;
        default: wsum2_16(w0, w1, ws, b, ldb, lo, hi, o0, o1, 4); break;
#else
        case 16: wsum2(w0, w1, ws, b, ldb, lo, hi, o0, o1, 2); break;
        case 32: wsum2(w0, w1, ws, b, ldb, lo, hi, o0, o1, 4); break;
        default: wsum2(w0, w1, ws, b, ldb, lo, hi, o0, o1, 8); break;
#endif
        }
    }
}

/* softmax of p[0..n) in place (n >= 1), returning its log-sum-exp */
float softmax_row(float *p, int n) {
    int nv = n - n % VF, j;
    vf mv = vf_set1(-3.4e38f);
    for (j = 0; j < nv; j += VF) mv = vf_max(mv, vf_load(p + j));
    float mx = vf_hmax(mv);
    for (; j < n; j++) mx = p[j] > mx ? p[j] : mx;
    vf sv = vf_zero(), mxv = vf_set1(mx);
    for (j = 0; j < nv; j += VF) {
        vf e = vf_exp(vf_sub(vf_load(p + j), mxv));
        vf_store(p + j, e);
        sv = vf_add(sv, e);
    }
    float sum = vf_sum(sv);
    for (; j < n; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    float inv = 1.0f / sum;
    vf iv = vf_set1(inv);
    for (j = 0; j < nv; j += VF) vf_store(p + j, vf_mul(vf_load(p + j), iv));
    for (; j < n; j++) p[j] *= inv;
    return mx + logf(sum);
}


typedef struct {
    const float *qkv, *out, *dout, *lse; /* inputs; out and lse are written by the forward */
    float *y, *l, *dqkv;                 /* the forward's out and lse; the backward's dqkv */
    int T, C, H, D, Tp;
    float scale;
} attn_args;

/* item(a, scratch, b, h) for every (b, h) pair, one OpenMP work item each, with per-thread scratch;
 * returns 0 if a thread had no memory for its scratch (its items are then skipped) */
static int for_each_head(int B, const attn_args *a, void (*item)(const attn_args *, scratch *, int, int)) {
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        scratch s = {0};
        float *mem = scratch_alloc(&s, a->T, a->D);
        /* every thread must reach the work-sharing loop, so one that has no memory skips its items */
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * a->H; bh++) {
            if (!mem) {
                failed = 1;
                continue;
            }
            item(a, &s, bh / a->H, bh % a->H);
        }
        free(mem);
    }
    return !failed;
}

static void attn_fwd_item(const attn_args *a, scratch *s, int b, int h) {
    int T = a->T, C = a->C, D = a->D, Tp = a->Tp;
    long ld = 3L * C;
    const float *base = a->qkv + (size_t)b * T * ld + (size_t)h * D;
    float *l = a->l + ((size_t)b * a->H + h) * T;
    transpose_in(base + C, ld, s->kt, T, D, Tp);
    for (int i = 0; i < T; i += 2) {
        int two = i + 1 < T;
        const float *q0 = base + (size_t)i * ld;
        float *p0 = s->p + (size_t)i * Tp, *p1 = p0 + Tp;
        dots2(q0, two ? q0 + ld : q0, s->kt, D, Tp, i + 1 + two, a->scale, p0, p1);
        l[i] = softmax_row(p0, i + 1);
        p0[i + 1] = 0.0f; /* row i's range ends where row i + 1's does not */
        if (two) l[i + 1] = softmax_row(p1, i + 2);
    }
    wsum_rows(s->p, T, Tp, base + 2 * C, ld, a->y + (size_t)b * T * C + (size_t)h * D, C, D, 1);
}

/* out (B, T, C) = softmax(q k^T * scale, causal) v per head; lse (B, H, T) keeps each row's
 * log-sum-exp for the backward pass. Returns 0 if scratch memory could not be allocated. */
int sg_attn_fwd(const float *qkv, float *out, float *lse, int B, int T, int C, int H, float scale) {
    attn_args a = {.qkv = qkv, .y = out, .l = lse, .T = T, .C = C, .H = H, .D = C / H, .Tp = (T + 15) & ~15,
                   .scale = scale};
    return for_each_head(B, &a, attn_fwd_item);
}

static void attn_bwd_item(const attn_args *a, scratch *s, int b, int h) {
    int T = a->T, C = a->C, D = a->D, Tp = a->Tp;
    long ld = 3L * C;
    float scale = a->scale;
    const float *base = a->qkv + (size_t)b * T * ld + (size_t)h * D;
    const float *o = a->out + (size_t)b * T * C + (size_t)h * D, *g = a->dout + (size_t)b * T * C + (size_t)h * D;
    const float *l = a->lse + ((size_t)b * a->H + h) * T;
    float *dbase = a->dqkv + (size_t)b * T * ld + (size_t)h * D;
    transpose_in(base + C, ld, s->kt, T, D, Tp);
    transpose_in(base + 2 * C, ld, s->vt, T, D, Tp);
    for (int i = 0; i < T; i += 2) {
        int two = i + 1 < T, n = i + 1 + two, n16 = (n + 15) & ~15;
        const float *q0 = base + (size_t)i * ld, *g0 = g + (size_t)i * C;
        float *p0 = s->p + (size_t)i * Tp, *d0 = s->ds + (size_t)i * Tp;
        dots2(q0, two ? q0 + ld : q0, s->kt, D, Tp, n, scale, p0, p0 + Tp); /* scores */
        dots2(g0, two ? g0 + C : g0, s->vt, D, Tp, n, 1.0f, d0, d0 + Tp);    /* dP = dO_i . V_j */
        for (int r = 0; r <= two; r++) {
            const float *gi = g0 + (size_t)r * C, *oi = o + (size_t)(i + r) * C;
            float *pr = p0 + (size_t)r * Tp, *dr = d0 + (size_t)r * Tp, delta = 0.0f;
            for (int d = 0; d < D; d++) delta += gi[d] * oi[d]; /* dO_i . O_i = sum_j P_ij dP_ij */
            __m256 lv = _mm256_set1_ps(l[i + r]), dv8 = _mm256_set1_ps(delta), sc = _mm256_set1_ps(scale);
            int m = i + r + 1, j = 0;
            for (; j + 8 <= m; j += 8) {
                __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(pr + j), lv));
                _mm256_storeu_ps(pr + j, p);
                /* dS = P (dP - delta), times scale for the q.k products */
                _mm256_storeu_ps(dr + j, _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dr + j), dv8)), sc));
            }
            for (; j < m; j++) {
                pr[j] = expf(pr[j] - l[i + r]);
                dr[j] = pr[j] * (dr[j] - delta) * scale;
            }
            for (; j < n16 && j < Tp; j++) pr[j] = dr[j] = 0.0f; /* right of the diagonal */
        }
    }
    wsum_rows(s->ds, T, Tp, base + C, ld, dbase, ld, D, 1); /* dQ_i = sum_j dS_ij K_j */
    wsum_rows(s->ds, T, Tp, base, ld, dbase + C, ld, D, 0); /* dK_j = sum_i dS_ij Q_i */
    wsum_rows(s->p, T, Tp, g, C, dbase + 2 * C, ld, D, 0);  /* dV_j = sum_i P_ij dO_i */
}

/* The gradients of sg_attn_fwd: dqkv (B, T, 3C) from dout (B, T, C), recomputing the
 * probabilities from q, k and lse. */
int sg_attn_bwd(const float *qkv, const float *out, const float *dout, const float *lse, float *dqkv, int B, int T,
                int C, int H, float scale) {
    attn_args a = {.qkv = qkv, .out = out, .dout = dout, .lse = lse, .dqkv = dqkv, .T = T, .C = C, .H = H,
                   .D = C / H, .Tp = (T + 15) & ~15, .scale = scale};
    return for_each_head(B, &a, attn_bwd_item);
}

/* ---- one decode step: a query per row and head against the KV cache ---------------------------
 * out[b, h] = softmax(q[b, h] . k[b, h, s] * scale over the slots s < S that mask[b] marks real)
 * @ v[b, h] (struct attend_args in kernels.h): q rows are q_stride floats apart, out is (B, H, D)
 * contiguous; k and v hold each row's (H, S, D) with rows D floats apart, heads head_stride and
 * batch rows row_stride floats apart (a KV cache slice). mask: NULL (every slot real), else B rows
 * of int64, mask_stride apart, 0 = padding. scores holds S floats per part. */

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
    const float *kh = a->k + (size_t)b * a->row_stride + (size_t)h * a->head_stride;
    const float *vh = a->v + (size_t)b * a->row_stride + (size_t)h * a->head_stride;
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
