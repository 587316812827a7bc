/* RMSNorm of rows (see kernels/rmsnorm.py): each row normalised in fp32 on its own, so a row's result
 * never depends on the others. The sum of squares runs in the order torch's CPU mean takes for rows
 * of 256 (four accumulators of eight lanes over 32-element blocks, then the lanes in order), the
 * mean is that sum times 1/width, and bf16 rounds the normalised row before the weight's product,
 * as the reference does: where a probe at load finds the result the reference's bit for bit
 * (kernels/rmsnorm.py), the native kernel serves. */
#pragma GCC optimize("fp-contract=off") /* torch squares, then adds: no fused products here */

#include <math.h>
#include <stdlib.h>

#include "common.h"

#define SUM_LANES 8
#define SUM_ACCUMULATORS 4

static float sum_of_squares(const float *restrict h, int64_t width) {
    float acc[SUM_ACCUMULATORS][SUM_LANES] = {{0}};
    const int64_t block = SUM_LANES * SUM_ACCUMULATORS, blocked = width / block * block;
    for (int64_t i = 0; i < blocked; i += block)
        for (int a = 0; a < SUM_ACCUMULATORS; a++)
            for (int l = 0; l < SUM_LANES; l++) {
                const float x = h[i + a * SUM_LANES + l];
                acc[a][l] = acc[a][l] + x * x;
            }
    float lanes[SUM_LANES];
    for (int l = 0; l < SUM_LANES; l++) {
        lanes[l] = acc[0][l];
        for (int a = 1; a < SUM_ACCUMULATORS; a++) lanes[l] = lanes[l] + acc[a][l];
    }
    int64_t i = blocked;
    for (; i + SUM_LANES <= width; i += SUM_LANES)
        for (int l = 0; l < SUM_LANES; l++) lanes[l] = lanes[l] + h[i + l] * h[i + l];
    float total = 0.0f;
    for (int l = 0; l < SUM_LANES; l++) total = total + lanes[l];
    for (; i < width; i++) total = total + h[i] * h[i];
    return total;
}

/* x rows [rows][width] at x_stride, weight [width] -> out [rows][width]; returns -1 when out of memory */
#define STACK_WIDTH 8192
int rms_norm(const void *x, int64_t x_stride, const void *weight, void *out, int64_t rows, int64_t width, float eps,
             int dtype) {
    float stack[STACK_WIDTH];
    float *h = width <= STACK_WIDTH ? stack : malloc((size_t)width * sizeof(float));
    if (!h) return -1;
    const float factor = 1.0f / (float)width;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t e = 0; e < width; e++) h[e] = load_one(x, r * x_stride + e, dtype);
        const float inverse = 1.0f / sqrtf(sum_of_squares(h, width) * factor + eps);
        for (int64_t e = 0; e < width; e++) {
            const float normed = as_dtype(h[e] * inverse, dtype);
            store_one(out, r * width + e, load_one(weight, e, dtype) * normed, dtype);
        }
    }
    if (h != stack) free(h);
    return 0;
}
