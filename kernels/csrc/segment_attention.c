/* Attention of packed segments over a paged KV cache, one query row at a time (see
 * kernels/cpu_attention.py for the contract and why it exists).
 *
 * Shape invariance by construction: a query row's output comes from the same instructions on the
 * same values whatever else shares the call. Its scores are lanes of 16-wide vectors, each a sum
 * over the head dimension in order; lanes past the row's visible keys are masked; the softmax sum
 * adds 16 lane accumulators chunk after chunk, then the lanes in a fixed tree; the weighted values
 * are summed key after key up to the row's last visible key. Which loop a sum runs in (a run of
 * CHAINS sums or the remainder) depends on the query heads per KV head, the head width and the
 * row's visible keys, all properties of the model and the row, never of the call.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

static inline vf select_lanes(vi mask, vf yes, vf no) {
    vi a, b;
    memcpy(&a, &yes, sizeof a);
    memcpy(&b, &no, sizeof b);
    a = (a & mask) | (b & ~mask);
    memcpy(&yes, &a, sizeof yes);
    return yes;
}

/* exp of x <= 0 per lane (a score minus its row's maximum): 2^n * p(r), r = x - n ln 2 in
 * [-ln2/2, ln2/2], p a degree-6 Taylor polynomial (relative error about 2e-7); 0 below -87. */
static inline vf exp_nonpositive(vf x) {
    const vf zero = {0};
    const vi underflow = x < -87.0f;
    x = select_lanes(underflow, zero - 87.0f, x);
    vf n = x * 1.44269504088896341f + 12582912.0f; /* rounded to an integer by the 1.5 * 2^23 trick */
    n = n - 12582912.0f;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = zero + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi bits;
    memcpy(&bits, &p, sizeof bits);
    bits = bits + (__builtin_convertvector(n, vi) << 23);
    memcpy(&p, &bits, sizeof p);
    return select_lanes(underflow, zero, p);
}

/* One segment and one KV head: its keys transposed (kt [d][padded], zero past `keys`) and its values
 * (vals [keys][d]), widened to fp32. */
#define GATHER(T, LOAD)                                                                                        \
    for (int64_t j = 0; j < keys; j++) {                                                                       \
        const T *kr, *vr;                                                                                      \
        if (j < prefix) {                                                                                      \
            kr = (const T *)k_cache + (slots[j] * hkv + head) * d;                                             \
            vr = (const T *)v_cache + (slots[j] * hkv + head) * d;                                             \
        } else {                                                                                               \
            kr = (const T *)k + (q_start + j - prefix) * k_stride + head * d;                                  \
            vr = (const T *)v + (q_start + j - prefix) * v_stride + head * d;                                  \
        }                                                                                                      \
        for (int64_t e = 0; e < d; e++) {                                                                      \
            kt[e * padded + j] = LOAD(kr[e]);                                                                  \
            vals[j * d + e] = LOAD(vr[e]);                                                                     \
        }                                                                                                      \
    }

#define AS_FLOAT(x) (x)

static void gather_keys(const void *k, int64_t k_stride, const void *v, int64_t v_stride, const void *k_cache,
                        const void *v_cache, const int64_t *slots, int64_t q_start, int64_t prefix, int64_t keys,
                        int64_t padded, int64_t head, int64_t hkv, int64_t d, int dtype, float *restrict kt,
                        float *restrict vals) {
    if (dtype == DTYPE_F32) {
        GATHER(float, AS_FLOAT)
    } else {
        GATHER(uint16_t, widen_bf16)
    }
    for (int64_t e = 0; e < d; e++)
        for (int64_t j = keys; j < padded; j++) kt[e * padded + j] = 0.0f;
}

/* Runs of up to CHAINS independent sums go through the loops below side by side, so that the
 * latency of one addition hides behind the others; each sum still adds its terms in one fixed order. */
#define CHAINS 8

/* The `group` query heads (q [group][d]) of one row that share a KV head, over its first `limit`
 * keys: out [group][d]. scores holds [group][padded / LANES] vectors; d is a multiple of LANES. */
static void attend_row(const float *restrict q, int64_t group, const float *restrict kt, const float *restrict vals,
                       int64_t limit, int64_t padded, int64_t d, float scale, vf *restrict scores,
                       float *restrict out) {
    const int64_t chunks = (limit + LANES - 1) / LANES, stride = padded / LANES;
    const vf zero = {0};
    vf lanes_j;
    for (int l = 0; l < LANES; l++) lanes_j[l] = (float)l;
    /* scores: one sum over the head dimension per (head, chunk of keys) */
    const int64_t score_sums = group * chunks;
    for (int64_t first = 0; first < score_sums; first += CHAINS) {
        const int64_t n = score_sums - first < CHAINS ? score_sums - first : CHAINS;
        vf acc[CHAINS];
        const float *qs[CHAINS];
        const float *ks[CHAINS];
        for (int64_t x = 0; x < n; x++) {
            acc[x] = zero;
            qs[x] = q + (first + x) / chunks * d;
            ks[x] = kt + (first + x) % chunks * LANES;
        }
        if (n == CHAINS) /* the same sums, with a count the compiler can keep in registers */
            for (int64_t e = 0; e < d; e++)
                for (int x = 0; x < CHAINS; x++) acc[x] = acc[x] + qs[x][e] * *(const vf *)(ks[x] + e * padded);
        else
            for (int64_t e = 0; e < d; e++)
                for (int64_t x = 0; x < n; x++) acc[x] = acc[x] + qs[x][e] * *(const vf *)(ks[x] + e * padded);
        for (int64_t x = 0; x < n; x++) scores[(first + x) / chunks * stride + (first + x) % chunks] = acc[x] * scale;
    }
    float totals[64]; /* group <= 64, checked by the caller */
    for (int64_t g = 0; g < group; g++) {
        vf *row = scores + g * stride;
        vf lane_most = zero - INFINITY; /* a maximum is exact in any order */
        for (int64_t c = 0; c < chunks; c++) {
            const vi visible = (lanes_j + (float)(c * LANES)) < (float)limit;
            const vf s = select_lanes(visible, row[c], zero - INFINITY);
            lane_most = select_lanes(s > lane_most, s, lane_most);
        }
        float most = lane_most[0];
        for (int l = 1; l < LANES; l++) most = lane_most[l] > most ? lane_most[l] : most;
        vf total = zero;
        for (int64_t c = 0; c < chunks; c++) {
            const vi visible = (lanes_j + (float)(c * LANES)) < (float)limit;
            const vf p = select_lanes(visible, exp_nonpositive(row[c] - most), zero);
            row[c] = p;
            total = total + p;
        }
        for (int width = LANES / 2; width >= 1; width /= 2)
            for (int l = 0; l < width; l++) total[l] = total[l] + total[l + width];
        totals[g] = total[0];
    }
    /* weighted values: one sum over keys per (head, LANES-wide piece of the head dimension) */
    const int64_t pieces = d / LANES, value_sums = group * pieces;
    for (int64_t first = 0; first < value_sums; first += CHAINS) {
        const int64_t n = value_sums - first < CHAINS ? value_sums - first : CHAINS;
        vf acc[CHAINS];
        const float *ps[CHAINS];
        const float *vs[CHAINS];
        for (int64_t x = 0; x < n; x++) {
            acc[x] = zero;
            ps[x] = (const float *)(scores + (first + x) / pieces * stride);
            vs[x] = vals + (first + x) % pieces * LANES;
        }
        if (n == CHAINS)
            for (int64_t j = 0; j < limit; j++)
                for (int x = 0; x < CHAINS; x++) acc[x] = acc[x] + ps[x][j] * *(const vf *)(vs[x] + j * d);
        else
            for (int64_t j = 0; j < limit; j++)
                for (int64_t x = 0; x < n; x++) acc[x] = acc[x] + ps[x][j] * *(const vf *)(vs[x] + j * d);
        for (int64_t x = 0; x < n; x++) {
            const int64_t g = (first + x) / pieces;
            *(vf *)(out + g * d + (first + x) % pieces * LANES) = acc[x] / totals[g];
        }
    }
}

/* segments: per segment q_start, q_len, prefix_len, causal (1) or bidirectional (0).
 * slots: [segments, slot_stride] cache slots of each segment's prefix. Returns 0, or -1 when out of memory. */
int segment_attention(const void *q, int64_t q_stride, const void *k, int64_t k_stride, const void *v,
                      int64_t v_stride, const void *k_cache, const void *v_cache, void *out, int64_t hq, int64_t hkv,
                      int64_t d, int64_t n_segments, const int64_t *segments, const int64_t *slots,
                      int64_t slot_stride, float scale, int dtype) {
    const int64_t group = hq / hkv;
    if (group > 64 || d % LANES) return -2;
    int64_t widest = 0;
    for (int64_t s = 0; s < n_segments; s++) {
        int64_t keys = segments[4 * s + 1] + segments[4 * s + 2];
        if (keys > widest) widest = keys;
    }
    const int64_t padded_max = (widest + LANES - 1) / LANES * LANES;
    const size_t floats = (size_t)(2 * padded_max * d + group * padded_max + 2 * group * d);
    float *scratch = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
    if (!scratch) return -1;
    float *kt = scratch;
    float *vals = kt + padded_max * d;
    vf *scores = (vf *)(vals + padded_max * d);
    float *qrows = (float *)(scores + group * padded_max / LANES);
    float *results = qrows + group * d;
    for (int64_t s = 0; s < n_segments; s++) {
        const int64_t q_start = segments[4 * s], q_len = segments[4 * s + 1];
        const int64_t prefix = segments[4 * s + 2], causal = segments[4 * s + 3];
        const int64_t keys = prefix + q_len, padded = (keys + LANES - 1) / LANES * LANES;
        for (int64_t h = 0; h < hkv; h++) {
            gather_keys(k, k_stride, v, v_stride, k_cache, v_cache, slots + s * slot_stride, q_start, prefix, keys,
                        padded, h, hkv, d, dtype, kt, vals);
            for (int64_t i = 0; i < q_len; i++) {
                const int64_t limit = causal ? prefix + i + 1 : keys;
                const int64_t row = (q_start + i) * q_stride + h * group * d, dst = ((q_start + i) * hq + h * group) * d;
                for (int64_t e = 0; e < group * d; e++) qrows[e] = load_one(q, row + e, dtype);
                attend_row(qrows, group, kt, vals, limit, padded, d, scale, scores, results);
                for (int64_t e = 0; e < group * d; e++) store_one(out, dst + e, results[e], dtype);
            }
        }
    }
    free(scratch);
    return 0;
}
