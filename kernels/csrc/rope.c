/* Rotate-half RoPE of queries (times the Llama-4 scale) and keys, element by element the operations
 * of the PyTorch reference (kernels/rope.py): x * cos, the rotated half times sin, their sum, then
 * the query scale, each rounded to the dtype as torch rounds a tensor operation's result, and none
 * fused into another (hence no contraction here), so the results are the reference's bit for bit. */
#pragma GCC optimize("fp-contract=off")

#include "common.h"

#define MAX_HEAD 1024

/* one head's row: out[e] = round(round(x[e] * cos[e]) + round(rot(x)[e] * sin[e])), times scale;
 * ROUND is the dtype's rounding of an operation's result */
#define ROTATE_ROW(NAME, ROUND)                                                                              \
    static void NAME(const float *restrict x, const float *restrict cos, const float *restrict sin,         \
                     float scale, int scaled, int64_t d, float *restrict out) {                              \
        const int64_t half = d / 2;                                                                          \
        for (int64_t e = 0; e < half; e++)                                                                   \
            out[e] = ROUND(ROUND(x[e] * cos[e]) + ROUND(-x[e + half] * sin[e]));                             \
        for (int64_t e = half; e < d; e++)                                                                   \
            out[e] = ROUND(ROUND(x[e] * cos[e]) + ROUND(x[e - half] * sin[e]));                              \
        if (scaled)                                                                                          \
            for (int64_t e = 0; e < d; e++) out[e] = ROUND(out[e] * scale);                                  \
    }

#define EXACT(value) (value)
ROTATE_ROW(rotate_row_f32, EXACT)
ROTATE_ROW(rotate_row_bf16, through_bf16)

/* q rows [T][hq][d] at q_stride, k rows [T][hkv][d] at k_stride; cos, sin [T][d]; scale [T] or NULL;
 * out [T][hq + hkv][d]: the rotated queries, then the rotated keys. d <= MAX_HEAD. */
void rope(const void *q, int64_t q_stride, const void *k, int64_t k_stride, const void *cos, const void *sin,
          const void *scale, void *out, int64_t rows, int64_t hq, int64_t hkv, int64_t d, int dtype) {
    const int64_t heads = hq + hkv;
    float c[MAX_HEAD], s[MAX_HEAD], x[MAX_HEAD], y[MAX_HEAD];
    for (int64_t t = 0; t < rows; t++) {
        const float factor = scale ? load_one(scale, t, dtype) : 1.0f;
        for (int64_t e = 0; e < d; e++) {
            c[e] = load_one(cos, t * d + e, dtype);
            s[e] = load_one(sin, t * d + e, dtype);
        }
        for (int64_t h = 0; h < heads; h++) {
            const void *src = h < hq ? q : k;
            const int64_t at = h < hq ? t * q_stride + h * d : t * k_stride + (h - hq) * d;
            for (int64_t e = 0; e < d; e++) x[e] = load_one(src, at + e, dtype);
            (dtype == DTYPE_BF16 ? rotate_row_bf16 : rotate_row_f32)(x, c, s, factor, scale && h < hq, d, y);
            for (int64_t e = 0; e < d; e++) store_one(out, (t * heads + h) * d + e, y[e], dtype);
        }
    }
}
