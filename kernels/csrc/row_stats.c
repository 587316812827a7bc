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

/* row r of x, rows `stride` elements apart */
static const void *row_at(const void *x, int64_t r, int64_t stride, int dtype) {
    return (const char *)x + (size_t)(r * stride) * (dtype == DTYPE_F32 ? sizeof(float) : sizeof(uint16_t));
}

/* per row of x [rows][width] (rows `stride` elements apart): the index of its largest value, the first
 * of equal ones and the first NaN if it holds one, as torch.argmax */
void row_argmax(const void *x, int64_t rows, int64_t width, int64_t stride, int dtype, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const void *row = row_at(x, r, stride, dtype);
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
    for (int64_t r = 0; r < rows; r++) {
        const void *row = row_at(x, r, stride, dtype);
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

/* float64 lanes, for the confidences a diffusion step compares with its threshold */
#define DLANES 8
typedef double vd __attribute__((vector_size(DLANES * sizeof(double))));
typedef int64_t vl __attribute__((vector_size(DLANES * sizeof(int64_t))));

static inline vd select_d(vl mask, vd yes, vd no) {
    vl a, b;
    memcpy(&a, &yes, sizeof a);
    memcpy(&b, &no, sizeof b);
    a = (a & mask) | (b & ~mask);
    memcpy(&yes, &a, sizeof yes);
    return yes;
}

/* exp of x <= 0 per lane in float64: 2^n * p(r), r = x - n ln 2 (ln 2 in two parts) in [-ln2/2, ln2/2],
 * p the degree-13 Taylor polynomial (truncation below 1e-17); 0 below -708, where a term of a sum at
 * least 1 no longer counts. */
static inline vd exp_nonpositive_d(vd x) {
    const vd zero = {0};
    const vl underflow = x < -708.0;
    x = select_d(underflow, zero - 708.0, x);
    vd n = x * 1.4426950408889634 + 6755399441055744.0; /* rounded to an integer by the 1.5 * 2^52 trick */
    n = n - 6755399441055744.0;
    vd r = x - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    static const double inverse_factorial[14] = {1.0,
                                                 1.0,
                                                 1.0 / 2,
                                                 1.0 / 6,
                                                 1.0 / 24,
                                                 1.0 / 120,
                                                 1.0 / 720,
                                                 1.0 / 5040,
                                                 1.0 / 40320,
                                                 1.0 / 362880,
                                                 1.0 / 3628800,
                                                 1.0 / 39916800,
                                                 1.0 / 479001600,
                                                 1.0 / 6227020800};
    vd p = zero + inverse_factorial[13];
    for (int i = 12; i >= 0; i--) p = p * r + inverse_factorial[i];
    vl bits;
    memcpy(&bits, &p, sizeof bits);
    bits = bits + (__builtin_convertvector(n, vl) << 52);
    memcpy(&p, &bits, sizeof p);
    return select_d(underflow, zero, p);
}

/* per row of x (as row_argmax reads it): the index of its largest value with `exclude` left out (-1:
 * none; as row_argmax) and that token's probability under the softmax of the whole row (`exclude`
 * included), computed in float64 and rounded to fp32, as torch's float64 softmax is (the sums add in
 * another order: the two agree to about 1e-16, so their fp32 roundings agree unless the value lies that
 * close to a rounding boundary). NaN rows are not supported. */
void row_confidence(const void *x, int64_t rows, int64_t width, int64_t stride, int dtype, int64_t exclude,
                    int64_t *token, float *prob) {
    for (int64_t r = 0; r < rows; r++) {
        const void *row = row_at(x, r, stride, dtype);
        float best, most;
        const int64_t chosen = row_best(row, width, dtype, exclude, -1, &best);
        row_best(row, width, dtype, -1, -1, &most);
        vd low = {0}, high = {0};
        int64_t j = 0;
        for (; j + LANES <= width; j += LANES) { /* LANES floats widened exactly into two float64 vectors */
            const vf v = load_lanes(row, j, dtype);
            vd a, b;
            for (int l = 0; l < DLANES; l++) a[l] = (double)v[l], b[l] = (double)v[DLANES + l];
            low = low + exp_nonpositive_d(a - (double)most);
            high = high + exp_nonpositive_d(b - (double)most);
        }
        vd lanes = low + high;
        for (int half = DLANES / 2; half >= 1; half /= 2)
            for (int l = 0; l < half; l++) lanes[l] = lanes[l] + lanes[l + half];
        double total = lanes[0];
        for (; j < width; j++) {
            vd v = {0};
            v[0] = (double)load_one(row, j, dtype) - (double)most;
            total += exp_nonpositive_d(v)[0];
        }
        vd gap = {0};
        gap[0] = (double)best - (double)most;
        token[r] = chosen;
        prob[r] = (float)(exp_nonpositive_d(gap)[0] / total);
    }
}
