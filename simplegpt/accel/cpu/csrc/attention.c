/* Causal self-attention for training: forward and backward over all positions (sg_attn_gqa_fwd/bwd,
 * on OpenMP's threads), for multi-head and grouped-query attention, with GPT-2's fused q|k|v
 * layout as one case of it (sg_attn_fwd/bwd). attention_decode.c holds the decode step; both take
 * their probabilities from one softmax, softmax_row (as does model.c's loss). The products around
 * it differ because the layouts do: the training kernel transposes each head's keys into tiles once
 * and reuses them for T queries (and for the G query heads that share them); a decode step has one
 * query, and reads each cached key and value once, in place.
 *
 * Every tensor is read and written through its own strides, so the model's views (heads of c_attn's
 * output, a transposed (B, T, H, D) buffer) need no copies. Every (batch row, key/value head) pair
 * is one OpenMP work item, so results do not depend on the thread count. Sequences are short (the
 * model sends up to 256 positions here): each item keeps its (T, T) probabilities in scratch memory
 * and runs small register-tiled products, two query rows at a time. D is 8, 16 or a multiple of 32. */
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

/* o0 = sum over j in [lo, hi) of w0[j ws] b[j] and o1 likewise with w1 (b: rows of DV vectors of
 * W floats, ldb apart), added to what o0 and o1 hold when acc is set: two output rows share every
 * load of b. DV is a constant where this is inlined; one definition per vector width. */
#define DEFINE_WSUM2(name, V, W, MAXV, zero, set1, load, store, fmadd)                                            \
    static inline __attribute__((always_inline)) void name(const float *w0, const float *w1, long ws,             \
                                                           const float *b, long ldb, int lo, int hi, float *o0,   \
                                                           float *o1, int acc, const int DV) {                    \
        V a0[MAXV], a1[MAXV];                                                                                     \
        _Pragma("GCC unroll 8") for (int v = 0; v < DV; v++) {                                                    \
            a0[v] = acc ? load(o0 + W * v) : zero();                                                              \
            a1[v] = acc ? load(o1 + W * v) : zero();                                                              \
        }                                                                                                         \
        for (int j = lo; j < hi; j++) {                                                                           \
            const float *r = b + (size_t)j * ldb;                                                                 \
            V p = set1(w0[(size_t)j * ws]), q = set1(w1[(size_t)j * ws]);                                         \
            _Pragma("GCC unroll 8") for (int v = 0; v < DV; v++) {                                                \
                V x = load(r + W * v);                                                                            \
                a0[v] = fmadd(p, x, a0[v]);                                                                       \
                a1[v] = fmadd(q, x, a1[v]);                                                                       \
            }                                                                                                     \
        }                                                                                                         \
        _Pragma("GCC unroll 8") for (int v = 0; v < DV; v++) {                                                    \
            store(o0 + W * v, a0[v]);                                                                             \
            store(o1 + W * v, a1[v]);                                                                             \
        }                                                                                                         \
    }
DEFINE_WSUM2(wsum2, __m256, 8, 8, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps,
             _mm256_fmadd_ps)
#ifdef SG_AVX512
DEFINE_WSUM2(wsum2_16, __m512, 16, 4, _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps,
             _mm512_fmadd_ps)
#endif

/* With w a causal (T, Tp) matrix (rows Tp apart, zero right of the diagonal up to the next
 * multiple of 16 past it), rows i of out (ldo apart) = sum over j of W[i, j] b[j] (added to out's
 * rows when acc is set), where lower = 1 takes W = w (j in [0, i + 1)) and lower = 0 its transpose
 * (j in [i, T), w read down column i). D is 8, 16 or a multiple of 32, done 64 columns at a time. */
static void wsum_rows(const float *w, int T, int Tp, const float *b, long ldb, float *out, long ldo, int D, int lower,
                      int acc) {
    float spare[64] = {0};
    long ws = lower ? 1 : Tp;
    for (int i = 0; i < T; i += 2) {
        int two = i + 1 < T;
        const float *w0 = lower ? w + (size_t)i * Tp : w + i, *w1 = two ? w0 + (lower ? Tp : 1) : w0;
        /* the union of both rows' ranges: entries outside a row's own range are zeros */
        int lo = lower ? 0 : i, hi = lower ? (two ? i + 2 : i + 1) : T;
        for (int c = 0; c < D; c += 64) {
            const float *bc = b + c;
            float *o0 = out + (size_t)i * ldo + c, *o1 = two ? o0 + ldo : spare;
            switch (D - c < 64 ? D - c : 64) {
            case 8: wsum2(w0, w1, ws, bc, ldb, lo, hi, o0, o1, acc, 1); break;
#ifdef SG_AVX512
            case 16: wsum2_16(w0, w1, ws, bc, ldb, lo, hi, o0, o1, acc, 1); break;
            case 32: wsum2_16(w0, w1, ws, bc, ldb, lo, hi, o0, o1, acc, 2); break;
            default: wsum2_16(w0, w1, ws, bc, ldb, lo, hi, o0, o1, acc, 4); break;
#else
            case 16: wsum2(w0, w1, ws, bc, ldb, lo, hi, o0, o1, acc, 2); break;
            case 32: wsum2(w0, w1, ws, bc, ldb, lo, hi, o0, o1, acc, 4); break;
            default: wsum2(w0, w1, ws, bc, ldb, lo, hi, o0, o1, acc, 8); break;
#endif
            }
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


/* A causal attention's tensors, each indexed by (batch row, head, position) through its own three
 * strides in floats, its last dimension (D floats) contiguous: q, dq (B, H, T, D); k, v, dk, dv
 * (B, Hkv, T, D), each key and value head shared by G = H / Hkv query heads (grouped-query
 * attention; G = 1 is multi-head attention); out, dout (B, H, T, D); lse (B, H, T) contiguous. */
enum { Q, K, V, O, GO, DQ, DK, DV, NT };
typedef struct {
    const float *q, *k, *v, *out, *dout, *lse; /* inputs; out and lse are written by the forward */
    float *y, *l, *dq, *dk, *dv;               /* the forward's out and lse; the backward's gradients */
    const long *st;                            /* strides: st[3 t + 0, 1, 2] for tensor t of the enum */
    int T, H, G, D, Tp;
    float scale;
} attn_args;

/* tensor t's (b, h) plane: its T rows are st[3 t + 2] floats apart */
#define AT(a, t, ptr, b, h) ((ptr) + (size_t)(b) * (a)->st[3 * (t)] + (size_t)(h) * (a)->st[3 * (t) + 1])

/* item(a, scratch, b, g) for every (batch row, key/value head) pair, one OpenMP work item each,
 * with per-thread scratch; returns 0 if a thread had no memory for its scratch (its items are then
 * skipped). The G query heads of a key/value head are one item: they share its transposed keys
 * and values, and their key and value gradients are summed in head order, whatever the threads. */
static int for_each_head(int B, const attn_args *a, void (*item)(const attn_args *, scratch *, int, int)) {
    int failed = 0, Hkv = a->H / a->G;
#pragma omp parallel reduction(| : failed)
    {
        scratch s = {0};
        float *mem = scratch_alloc(&s, a->T, a->D);
        /* every thread must reach the work-sharing loop, so one that has no memory skips its items */
#pragma omp for schedule(static)
        for (int bg = 0; bg < B * Hkv; bg++) {
            if (!mem) {
                failed = 1;
                continue;
            }
            item(a, &s, bg / Hkv, bg % Hkv);
        }
        free(mem);
    }
    return !failed;
}

static void attn_fwd_item(const attn_args *a, scratch *s, int b, int g) {
    int T = a->T, D = a->D, Tp = a->Tp;
    long ld = a->st[3 * Q + 2];
    transpose_in(AT(a, K, a->k, b, g), a->st[3 * K + 2], s->kt, T, D, Tp);
    for (int h = g * a->G; h < (g + 1) * a->G; h++) {
        const float *base = AT(a, Q, a->q, b, h);
        float *l = a->l + ((size_t)b * a->H + h) * T;
        for (int i = 0; i < T; i += 2) {
            int two = i + 1 < T;
            const float *q0 = base + (size_t)i * ld;
            float *p0 = s->p + (size_t)i * Tp, *p1 = p0 + Tp;
            dots2(q0, two ? q0 + ld : q0, s->kt, D, Tp, i + 1 + two, a->scale, p0, p1);
            l[i] = softmax_row(p0, i + 1);
            p0[i + 1] = 0.0f; /* row i's range ends where row i + 1's does not */
            if (two) l[i + 1] = softmax_row(p1, i + 2);
        }
        wsum_rows(s->p, T, Tp, AT(a, V, a->v, b, g), a->st[3 * V + 2], AT(a, O, a->y, b, h), a->st[3 * O + 2], D,
                  1, 0);
    }
}

/* out = softmax(q k^T * scale, causal) v per query head, with the key and value head it shares
 * (attn_args: q (B, H, T, D), k and v (B, H / G, T, D), out (B, H, T, D), each through its strides
 * in st[0..11]: q, k, v, out); lse (B, H, T) keeps each row's log-sum-exp for the backward pass.
 * D is 8, 16 or a multiple of 32. Returns 0 if scratch memory could not be allocated. */
int sg_attn_gqa_fwd(const float *q, const float *k, const float *v, float *out, float *lse, const long *strides,
                    int B, int T, int H, int G, int D, float scale) {
    attn_args a = {.q = q, .k = k, .v = v, .y = out, .l = lse, .st = strides, .T = T, .H = H, .G = G, .D = D,
                   .Tp = (T + 15) & ~15, .scale = scale};
    return for_each_head(B, &a, attn_fwd_item);
}

static void attn_bwd_item(const attn_args *a, scratch *s, int b, int g) {
    int T = a->T, D = a->D, Tp = a->Tp;
    long ld = a->st[3 * Q + 2], lo = a->st[3 * O + 2], lg = a->st[3 * GO + 2];
    float scale = a->scale;
    const float *kb = AT(a, K, a->k, b, g), *vb = AT(a, V, a->v, b, g);
    float *dk = AT(a, DK, a->dk, b, g), *dv = AT(a, DV, a->dv, b, g);
    transpose_in(kb, a->st[3 * K + 2], s->kt, T, D, Tp);
    transpose_in(vb, a->st[3 * V + 2], s->vt, T, D, Tp);
    for (int h = g * a->G; h < (g + 1) * a->G; h++) {
        const float *base = AT(a, Q, a->q, b, h), *o = AT(a, O, a->out, b, h), *g0h = AT(a, GO, a->dout, b, h);
        const float *l = a->lse + ((size_t)b * a->H + h) * T;
        for (int i = 0; i < T; i += 2) {
            int two = i + 1 < T, n = i + 1 + two, n16 = (n + 15) & ~15;
            const float *q0 = base + (size_t)i * ld, *g0 = g0h + (size_t)i * lg;
            float *p0 = s->p + (size_t)i * Tp, *d0 = s->ds + (size_t)i * Tp;
            dots2(q0, two ? q0 + ld : q0, s->kt, D, Tp, n, scale, p0, p0 + Tp); /* scores */
            dots2(g0, two ? g0 + lg : g0, s->vt, D, Tp, n, 1.0f, d0, d0 + Tp);  /* dP = dO_i . V_j */
            for (int r = 0; r <= two; r++) {
                const float *gi = g0 + (size_t)r * lg, *oi = o + (size_t)(i + r) * lo;
                float *pr = p0 + (size_t)r * Tp, *dr = d0 + (size_t)r * Tp;
                vf dsum = vf_zero();
                int d = 0;
                for (; d + VF <= D; d += VF) dsum = vf_fmadd(vf_load(gi + d), vf_load(oi + d), dsum);
                float delta = vf_sum(dsum); /* dO_i . O_i = sum_j P_ij dP_ij */
                for (; d < D; d++) delta += gi[d] * oi[d];
                /* the build's widest vectors (16 floats in the avx512 build) */
                vf lv = vf_set1(l[i + r]), dvv = vf_set1(delta), sc = vf_set1(scale);
                int m = i + r + 1, j = 0;
                for (; j + VF <= m; j += VF) {
                    vf p = vf_exp(vf_sub(vf_load(pr + j), lv));
                    vf_store(pr + j, p);
                    /* dS = P (dP - delta), times scale for the q.k products */
                    vf_store(dr + j, vf_mul(vf_mul(p, vf_sub(vf_load(dr + j), dvv)), sc));
                }
                for (; j < m; j++) {
                    pr[j] = expf(pr[j] - l[i + r]);
                    dr[j] = pr[j] * (dr[j] - delta) * scale;
                }
                for (; j < n16 && j < Tp; j++) pr[j] = dr[j] = 0.0f; /* right of the diagonal */
            }
        }
        int acc = h > g * a->G; /* the group's later heads add to the key and value gradients */
        wsum_rows(s->ds, T, Tp, kb, a->st[3 * K + 2], AT(a, DQ, a->dq, b, h), a->st[3 * DQ + 2], D, 1, 0);
        wsum_rows(s->ds, T, Tp, base, ld, dk, a->st[3 * DK + 2], D, 0, acc); /* dK_j += sum_i dS_ij Q_i */
        wsum_rows(s->p, T, Tp, g0h, lg, dv, a->st[3 * DV + 2], D, 0, acc);   /* dV_j += sum_i P_ij dO_i */
    }
}

/* The gradients of sg_attn_gqa_fwd: dq, dk, dv from dout, recomputing the probabilities from q, k
 * and lse; strides[0..23] are those of q, k, v, out, dout, dq, dk, dv (see attn_args). dk and dv
 * sum over the G query heads that share a key/value head. */
int sg_attn_gqa_bwd(const float *q, const float *k, const float *v, const float *out, const float *dout,
                    const float *lse, float *dq, float *dk, float *dv, const long *strides, int B, int T, int H, int G,
                    int D, float scale) {
    attn_args a = {.q = q, .k = k, .v = v, .out = out, .dout = dout, .lse = lse, .dq = dq, .dk = dk, .dv = dv,
                   .st = strides, .T = T, .H = H, .G = G, .D = D, .Tp = (T + 15) & ~15, .scale = scale};
    return for_each_head(B, &a, attn_bwd_item);
}

/* GPT-2's layout, heads side by side: q, k, v at columns h D, C + h D, 2C + h D of each token's 3C
 * floats (c_attn's output), out at columns h D of (B, T, C) (c_proj's input); dqkv as qkv */
static void fused_strides(long *st, int T, int C, int D) {
    long qkv[3] = {3L * T * C, D, 3L * C}, o[3] = {(long)T * C, D, C};
    for (int t = 0; t < NT; t++)
        for (int i = 0; i < 3; i++) st[3 * t + i] = t == O || t == GO ? o[i] : qkv[i];
}

/* out (B, T, C) = softmax(q k^T * scale, causal) v per head of the fused (B, T, 3C) qkv; lse
 * (B, H, T). Returns 0 if scratch memory could not be allocated. */
int sg_attn_fwd(const float *qkv, float *out, float *lse, int B, int T, int C, int H, float scale) {
    long st[3 * NT];
    fused_strides(st, T, C, C / H);
    return sg_attn_gqa_fwd(qkv, qkv + C, qkv + 2 * C, out, lse, st, B, T, H, 1, C / H, scale);
}

/* The gradients of sg_attn_fwd: dqkv (B, T, 3C) from dout (B, T, C). */
int sg_attn_bwd(const float *qkv, const float *out, const float *dout, const float *lse, float *dqkv, int B, int T,
                int C, int H, float scale) {
    long st[3 * NT];
    fused_strides(st, T, C, C / H);
    return sg_attn_gqa_bwd(qkv, qkv + C, qkv + 2 * C, out, dout, lse, dqkv, dqkv + C, dqkv + 2 * C, st, B, T, H, 1,
                           C / H, scale);
}
