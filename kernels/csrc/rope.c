/* Rotate-half RoPE of queries (times the Llama-4 scale) and keys, element by element the operations
 * of the PyTorch reference (kernels/rope.py): x * cos, the rotated half times sin, their sum, then
 * the query scale, each rounded to the dtype as torch rounds a tensor operation's result, and none
 * fused into another (hence no contraction here), so the results are the reference's bit for bit. */
#pragma GCC optimize("fp-contract=off")

#include "common.h"

/* q rows [T][hq][d] at q_stride, k rows [T][hkv][d] at k_stride; cos, sin [T][d]; scale [T] or NULL;
 * out [T][hq + hkv][d]: the rotated queries, then the rotated keys. */
void rope(const void *q, int64_t q_stride, const void *k, int64_t k_stride, const void *cos, const void *sin,
          const void *scale, void *out, int64_t rows, int64_t hq, int64_t hkv, int64_t d, int dtype) {
    const int64_t half = d / 2, heads = hq + hkv;
    for (int64_t t = 0; t < rows; t++) {
        const float s = scale ? load_one(scale, t, dtype) : 1.0f;
        for (int64_t h = 0; h < heads; h++) {
            const int64_t src = h < hq ? t * q_stride + h * d : t * k_stride + (h - hq) * d;
            const void *x = h < hq ? q : k;
            for (int64_t e = 0; e < d; e++) {
                const float value = load_one(x, src + e, dtype);
                const float other = load_one(x, src + (e < half ? e + half : e - half), dtype);
                const float rotated = e < half ? -other : other;
                const float a = as_dtype(value * load_one(cos, t * d + e, dtype), dtype);
                const float b = as_dtype(rotated * load_one(sin, t * d + e, dtype), dtype);
                float y = as_dtype(a + b, dtype);
                if (scale && h < hq) y = y * s;
                store_one(out, (t * heads + h) * d + e, y, dtype);
            }
        }
    }
}
