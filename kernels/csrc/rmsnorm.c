/* RMSNorm of rows (see kernels/rmsnorm.py): each row normalised in fp32, its sum of squares added
 * in 16 lane accumulators and then a fixed tree, so a row's result never depends on the others.
 * bf16 rounds the normalised row before the weight's product, as the PyTorch reference does. */
#include <math.h>

#include "common.h"

void rms_norm(const void *x, int64_t x_stride, const void *weight, void *out, int64_t rows, int64_t width,
              float eps, int dtype) {
    for (int64_t r = 0; r < rows; r++) {
        float lanes[LANES] = {0};
        int64_t e = 0;
        for (; e + LANES <= width; e += LANES)
            for (int l = 0; l < LANES; l++) {
                const float h = load_one(x, r * x_stride + e + l, dtype);
                lanes[l] += h * h;
            }
        for (; e < width; e++) {
            const float h = load_one(x, r * x_stride + e, dtype);
            lanes[e % LANES] += h * h;
        }
        for (int step = LANES / 2; step >= 1; step /= 2)
            for (int l = 0; l < step; l++) lanes[l] += lanes[l + step];
        const float inverse = 1.0f / sqrtf(lanes[0] / (float)width + eps);
        for (e = 0; e < width; e++) {
            const float normed = as_dtype(load_one(x, r * x_stride + e, dtype) * inverse, dtype);
            store_one(out, r * width + e, load_one(weight, e, dtype) * normed, dtype);
        }
    }
}
