/* A choice per row of logits (see kernels/row_stats.py): its argmax, or its two likeliest tokens with
 * their softmax probabilities. PyTorch's CPU argmax over a 4096-wide row is scalar code and its topk
 * sorts; a greedy step wants one or two indices per row, a few microseconds each through torch, well
 * under one here: a vector pass for the row's maximum, then the first index that holds it.
 *
 * Rows are independent: a row's result comes from the same operations on its own values whatever
 * else is in the call, and the softmax sum adds LANES lane accumulators chunk after chunk, then the
 * lanes in a fixed tree.
 */
#include <math.h>

#include "common.h"

/* the index of the largest value of row[0..width) leaving out `skip` and `skip2` (-1: none), the first of
 * equal ones, and that value; one pass in which each lane keeps its largest value and where it first
 * saw it. A row holding a NaN gives its first NaN, as torch.argmax; a row with nothing above -inf its
 * first index not left out. */
static int64_t row_best(const void *row, int64_t width, int dtype, int64_t skip, int64_t skip2, float *value) {
    vf most = (vf){0} - INFINITY;
    vi at = (vi){0} - 1, unordered = {0}, lane;
    for (int l = 0; l < LANES; l++) lane[l] = l;
    int64_t j = 0;
    for (; j + LANES <= width; j += LANES) {
        vf v = load_lanes(row, j, dtype);
        if ((skip >= j && skip < j + LANES) || (skip2 >= j && skip2 < j + LANES)) {
            for (int l = 0; l < LANES; l++)
                if (j + l == skip || j + l == skip2) v[l] = -INFINITY;
        }
        unordered |= v != v;
        const vi greater = v > most;
        most = select_lanes(greater, v, most);
        at = (greater & (lane + (int32_t)j)) | (~greater & at);
    }
    float best = -INFINITY;
    int64_t index = -1;
    int nan = 0;
    for (int l = 0; l < LANES; l++) {
        nan |= unordered[l] != 0;
        if (at[l] >= 0 && (most[l] > best || (most[l] == best && at[l] < index))) best = most[l], index = at[l];
    }
    for (; j < width; j++) {
        if (j == skip || j == skip2) continue;
        const float v = load_one(row, j, dtype);
        nan |= v != v;
        if (v > best) best = v, index = j;
    }
    if (nan || index < 0) { /* the first NaN; or, nothing above -inf, the first index not left out */
        for (j = 0; j < width; j++) {
            if (j == skip || j == skip2) continue;
            const float v = load_one(row, j, dtype);
            if (!nan || v != v) {
                index = j, best = v;
                break;
            }
        }
    }
    *value = best;
    return index;
}

/* per row of x [rows][width] (rows `stride` elements apart): the index of its largest value, the first
 * of equal ones and the first NaN if it holds one, as torch.argmax */
void row_argmax(const void *x, int64_t rows, int64_t width, int64_t stride, int dtype, int64_t *out) {
    const size_t bytes = dtype == DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    for (int64_t r = 0; r < rows; r++) {
        const void *row = (const char *)x + (size_t)(r * stride) * bytes;
        float best;
        out[r] = row_best(row, width, dtype, -1, -1, &best);
    }
}

/* per row of x (as row_argmax reads it) with index `exclude` left out (-1: none): the indices of its
 * largest and second largest values (first of equal ones each; index [r][0] is row_argmax's with
 * `exclude` left out) and their probabilities under the softmax of the row without `exclude`, in fp32.
 * NaN rows are not supported (their results are unspecified). */
void row_top2(const void *x, int64_t rows, int64_t width, int64_t stride, int dtype, int64_t exclude,
              int64_t *index, float *prob) {
    const size_t bytes = dtype == DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    for (int64_t r = 0; r < rows; r++) {
        const void *row = (const char *)x + (size_t)(r * stride) * bytes;
        float best, next;
        const int64_t first = row_best(row, width, dtype, exclude, -1, &best);
        const int64_t second = row_best(row, width, dtype, exclude, first, &next);
        vf lanes = {0};
        int64_t j = 0;
        for (; j + LANES <= width; j += LANES) {
            vf v = load_lanes(row, j, dtype);
            if (exclude >= j && exclude < j + LANES) v[exclude - j] = -INFINITY;
            lanes = lanes + exp_nonpositive(v - best);
        }
        for (int width_half = LANES / 2; width_half >= 1; width_half /= 2)
            for (int l = 0; l < width_half; l++) lanes[l] = lanes[l] + lanes[l + width_half];
        float total = lanes[0];
        for (; j < width; j++) {
            if (j == exclude) continue;
            vf v = {0};
            v[0] = load_one(row, j, dtype) - best;
            total += exp_nonpositive(v)[0];
        }
        index[2 * r] = first;
        index[2 * r + 1] = second;
        prob[2 * r] = 1.0f / total;
        vf gap = {0};
        gap[0] = next - best;
        prob[2 * r + 1] = second < 0 ? 0.0f : exp_nonpositive(gap)[0] / total;
    }
}
