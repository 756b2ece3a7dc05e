/* Rotary position embedding (RoPE) in the rotate-half convention of Hugging Face's Llama: with
 * x = (x1, x2) the two halves of a head's D floats and c, s the cosines and sines of its position's
 * D / 2 angles, y = (x1 c - x2 s, x2 c + x1 s). The backward is the inverse rotation (s -> -s). */
#include "kernels.h"

/* one row of D floats: y = rope(x) with sign = 1, its inverse with sign = -1 (y may be x); c and s
 * the D / 2 cosines and sines (also the decode step's, llama_decode.c) */
void rope_row(const float *x, const float *c, const float *s, float *y, int D, float sign) {
    int half = D / 2, HV = half - half % VF, i;
    vf sg = vf_set1(sign);
    for (i = 0; i < HV; i += VF) {
        vf x1 = vf_load(x + i), x2 = vf_load(x + half + i), cv = vf_load(c + i), sv = vf_mul(vf_load(s + i), sg);
        vf_store(y + i, vf_sub(vf_mul(x1, cv), vf_mul(x2, sv)));
        vf_store(y + half + i, vf_fmadd(x1, sv, vf_mul(x2, cv)));
    }
    for (; i < half; i++) {
        float x1 = x[i], x2 = x[half + i], sv = s[i] * sign;
        y[i] = x1 * c[i] - x2 * sv;
        y[half + i] = x2 * c[i] + x1 * sv;
    }
}

/* y = rope(x) (inverse: the inverse rotation, for the backward pass), x and y (B, H, T, D) read and
 * written through their strides xs[0..2] and ys[0..2] (batch row, head, position; the D floats
 * contiguous), so heads of a fused q|k|v product need no copy and y may be x itself (in place).
 * cos and sin (B or 1, T, D / 2) contiguous: their batch stride cs_b is T D / 2, or 0 for one table
 * shared by every row. D is even. */
void sg_rope(const float *x, const long *xs, const float *cos, const float *sin, long cs_b, float *y, const long *ys,
             int B, int H, int T, int D, int inverse) {
    long rows = (long)B * H * T;
    float sign = inverse ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        long b = r / ((long)H * T), h = r / T % H, t = r % T;
        const float *c = cos + b * cs_b + t * (D / 2), *s = sin + b * cs_b + t * (D / 2);
        rope_row(x + b * xs[0] + h * xs[1] + t * xs[2], c, s, y + b * ys[0] + h * ys[1] + t * ys[2], D, sign);
    }
}

/* sg_rope with y (B, H, T, D) contiguous */
void sg_rope_fwd(const float *x, const long *xs, const float *cos, const float *sin, long cs_b, float *y, int B, int H,
                 int T, int D, int inverse) {
    long ys[3] = {(long)H * T * D, (long)T * D, D};
    sg_rope(x, xs, cos, sin, cs_b, y, ys, B, H, T, D, inverse);
}
