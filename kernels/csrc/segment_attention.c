/* Attention of packed segments over a paged KV cache, one query row at a time (see
 * kernels/cpu_attention.py for the contract and why it exists).
 *
 * Shape invariance by construction: a query row's output comes from the same instructions on the
 * same values whatever else shares the call. Its scores are lanes of 16-wide vectors, each a sum
 * over the head dimension in order; lanes past the row's visible keys are masked; the softmax sum
 * adds 16 lane accumulators chunk after chunk, then the lanes in a fixed tree; the weighted values
 * are summed key after key up to the row's last visible key. Which register tile a sum runs in
 * depends on the query heads per KV head, the head width and the row's visible keys, all
 * properties of the model and the row, never of the call.
 *
 * bf16 operands, on a CPU with AVX512-BF16, take their scores from VDPBF16PS: the head dimension's
 * pairs in order, two multiply-adds an instruction (a bf16 product is exact in fp32; the pair's sum
 * rounds as the CPU's instruction rounds it, so scores agree with the fp32 path's to float rounding,
 * not bit for bit). Softmax and the weighted values stay in fp32 for every dtype.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "common.h"

#ifdef __AVX512BF16__
#define HAVE_BF16_DOTS 1 /* bf16 scores may take VDPBF16PS */
#include <immintrin.h>
#else
#define HAVE_BF16_DOTS 0
#endif

/* One segment and one KV head: its values widened to fp32 (vals [keys][d]) and its keys transposed, zero
 * past `keys`: widened to fp32 (KEYS_WIDENED: kt [d][padded] floats) or, bf16 only, as pairs of head
 * dimensions for VDPBF16PS (KEYS_PAIRED: kt [d / 2][padded], one 32-bit pair a key). */
#define KEYS_WIDENED(T, LOAD)                                                                                  \
    for (int64_t e = 0; e < d; e++) ((float *)kt)[e * padded + j] = LOAD(kr[e]);
#define KEYS_PAIRED(T, LOAD)                                                                                   \
    for (int64_t p = 0; p < d / 2; p++) memcpy((uint32_t *)kt + p * padded + j, kr + 2 * p, sizeof(uint32_t));
#define GATHER(T, LOAD, KEYS)                                                                                  \
    for (int64_t j = 0; j < keys; j++) {                                                                       \
        const T *kr, *vr;                                                                                      \
        if (j < prefix) {                                                                                      \
            kr = (const T *)k_cache + (slots[j] * hkv + head) * d;                                             \
            vr = (const T *)v_cache + (slots[j] * hkv + head) * d;                                             \
        } else {                                                                                               \
            kr = (const T *)k + (q_start + j - prefix) * k_stride + head * d;                                  \
            vr = (const T *)v + (q_start + j - prefix) * v_stride + head * d;                                  \
        }                                                                                                      \
        KEYS(T, LOAD)                                                                                          \
        for (int64_t e = 0; e < d; e++) vals[j * d + e] = LOAD(vr[e]);                                         \
    }

#define AS_FLOAT(x) (x)

static void gather_keys(const void *k, int64_t k_stride, const void *v, int64_t v_stride, const void *k_cache,
                        const void *v_cache, const int64_t *slots, int64_t q_start, int64_t prefix, int64_t keys,
                        int64_t padded, int64_t head, int64_t hkv, int64_t d, int dtype, int bf16_dots,
                        void *restrict kt, float *restrict vals) {
    if (dtype == DTYPE_F32) {
        GATHER(float, AS_FLOAT, KEYS_WIDENED)
    } else if (bf16_dots) {
        GATHER(uint16_t, widen_bf16, KEYS_PAIRED)
    } else {
        GATHER(uint16_t, widen_bf16, KEYS_WIDENED)
    }
    /* past `keys`: zero bits, 0.0f in either layout (a float or a pair, four bytes each) */
    for (int64_t e = 0; e < (bf16_dots ? d / 2 : d); e++)
        memset((uint32_t *)kt + e * padded + keys, 0, (size_t)(padded - keys) * sizeof(uint32_t));
}

/* Register tiles: up to TILE_HEADS query heads by TILE_COLUMNS vectors (of keys for the scores, of
 * the head dimension for the weighted values), so that one load of a key or value vector serves
 * several heads and one broadcast of a query or probability serves several vectors. Each sum in a
 * tile still adds its terms in one fixed order; which tile shape a sum lands in depends on the
 * query heads per KV head, the head width and the row's visible keys, never on the call. */
#define TILE_HEADS 4
#define TILE_COLUMNS 2

/* acc[g][c] = sum over e < depth of a[g * a_stride + e] * b[e * b_stride + c * LANES], e in order */
static inline __attribute__((always_inline)) void tile_sums(const float *restrict a, int64_t a_stride,
                                                            const float *restrict b, int64_t b_stride, int64_t depth,
                                                            int heads, int columns, vf acc[TILE_HEADS][TILE_COLUMNS]) {
    const vf zero = {0};
    for (int g = 0; g < heads; g++)
        for (int c = 0; c < columns; c++) acc[g][c] = zero;
    for (int64_t e = 0; e < depth; e++) {
        vf column[TILE_COLUMNS];
        for (int c = 0; c < columns; c++) column[c] = *(const vf *)(b + e * b_stride + c * LANES);
        for (int g = 0; g < heads; g++) {
            const float ag = a[g * a_stride + e];
            for (int c = 0; c < columns; c++) acc[g][c] = acc[g][c] + ag * column[c];
        }
    }
}

/* Defines `name`: `sums` (a tile's sums over elem_t operands) with the full tile's constant shape where
 * it fits, so that the compiler keeps the tile in registers */
#define CONSTANT_SHAPE_TILE(name, sums, elem_t)                                                              \
    static void name(const elem_t *restrict a, int64_t a_stride, const elem_t *restrict b, int64_t b_stride, \
                     int64_t depth, int heads, int columns, vf acc[TILE_HEADS][TILE_COLUMNS]) {               \
        if (heads == TILE_HEADS && columns == TILE_COLUMNS)                                                  \
            sums(a, a_stride, b, b_stride, depth, TILE_HEADS, TILE_COLUMNS, acc);                            \
        else                                                                                                 \
            sums(a, a_stride, b, b_stride, depth, heads, columns, acc);                                      \
    }

CONSTANT_SHAPE_TILE(tile, tile_sums, float)

#if HAVE_BF16_DOTS
/* tile_sums on pairs: acc[g][c] = sum over p < pairs of the 32-bit bf16 pair a[g * a_stride + p] dotted
 * with each of the 16 pairs at b + p * b_stride + c * LANES (VDPBF16PS), p in order */
static inline __attribute__((always_inline)) void pair_tile_sums(const uint32_t *restrict a, int64_t a_stride,
                                                                 const uint32_t *restrict b, int64_t b_stride,
                                                                 int64_t pairs, int heads, int columns,
                                                                 vf acc[TILE_HEADS][TILE_COLUMNS]) {
    const vf zero = {0};
    for (int g = 0; g < heads; g++)
        for (int c = 0; c < columns; c++) acc[g][c] = zero;
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh column[TILE_COLUMNS];
        for (int c = 0; c < columns; c++) column[c] = (__m512bh)_mm512_loadu_si512(b + p * b_stride + c * LANES);
        for (int g = 0; g < heads; g++) {
            const __m512bh ag = (__m512bh)_mm512_set1_epi32((int)a[g * a_stride + p]);
            for (int c = 0; c < columns; c++) acc[g][c] = (vf)_mm512_dpbf16_ps((__m512)acc[g][c], ag, column[c]);
        }
    }
}

CONSTANT_SHAPE_TILE(pair_tile, pair_tile_sums, uint32_t)
#endif

/* The `group` query heads of one row that share a KV head, over its first `limit` keys: out [group][d].
 * q [group][d] and kt as gather_keys lays them out: fp32, or with `bf16_dots` bf16 pairs. probs holds
 * [group][padded] floats; d is a multiple of LANES. */
static void attend_row(const void *restrict q, int64_t group, const void *restrict kt, const float *restrict vals,
                       int64_t limit, int64_t padded, int64_t d, float scale, int bf16_dots, float *restrict probs,
                       float *restrict out) {
    const int64_t chunks = (limit + LANES - 1) / LANES;
    const vf zero = {0};
    vf lanes_j;
    for (int l = 0; l < LANES; l++) lanes_j[l] = (float)l;
    vf acc[TILE_HEADS][TILE_COLUMNS];
    /* scores: one sum over the head dimension per (head, chunk of keys) */
    for (int64_t g0 = 0; g0 < group; g0 += TILE_HEADS) {
        const int heads = group - g0 < TILE_HEADS ? (int)(group - g0) : TILE_HEADS;
        for (int64_t c0 = 0; c0 < chunks; c0 += TILE_COLUMNS) {
            const int columns = chunks - c0 < TILE_COLUMNS ? (int)(chunks - c0) : TILE_COLUMNS;
#if HAVE_BF16_DOTS
            if (bf16_dots)
                pair_tile((const uint32_t *)q + g0 * d / 2, d / 2, (const uint32_t *)kt + c0 * LANES, padded, d / 2,
                          heads, columns, acc);
            else
#endif
                tile((const float *)q + g0 * d, d, (const float *)kt + c0 * LANES, padded, d, heads, columns, acc);
            for (int g = 0; g < heads; g++)
                for (int c = 0; c < columns; c++)
                    *(vf *)(probs + (g0 + g) * padded + (c0 + c) * LANES) = acc[g][c] * scale;
        }
    }
    (void)bf16_dots; /* without HAVE_BF16_DOTS, always 0 */
    float totals[64]; /* group <= 64, checked by the caller */
    for (int64_t g = 0; g < group; g++) {
        vf *row = (vf *)(probs + g * padded);
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
    const int64_t pieces = d / LANES;
    for (int64_t g0 = 0; g0 < group; g0 += TILE_HEADS) {
        const int heads = group - g0 < TILE_HEADS ? (int)(group - g0) : TILE_HEADS;
        for (int64_t c0 = 0; c0 < pieces; c0 += TILE_COLUMNS) {
            const int columns = pieces - c0 < TILE_COLUMNS ? (int)(pieces - c0) : TILE_COLUMNS;
            tile(probs + g0 * padded, padded, vals + c0 * LANES, d, limit, heads, columns, acc);
            for (int g = 0; g < heads; g++)
                for (int c = 0; c < columns; c++)
                    *(vf *)(out + (g0 + g) * d + (c0 + c) * LANES) = acc[g][c] / totals[g0 + g];
        }
    }
}

/* segments: per segment q_start, q_len, prefix_len, causal (1) or bidirectional (0).
 * slots: [segments, slot_stride] cache slots of each segment's prefix. The (segment, KV head) pairs are
 * shared out among up to `threads` threads (OpenMP, each with its own scratch): a pair's rows are
 * computed by the same instructions whichever thread takes it, so the thread count changes no bit.
 * Returns 0; -1 when out of memory, -2 for more than 64 query heads per KV head or a head width LANES
 * does not divide. */
int segment_attention(const void *q, int64_t q_stride, const void *k, int64_t k_stride, const void *v,
                      int64_t v_stride, const void *k_cache, const void *v_cache, void *out, int64_t hq, int64_t hkv,
                      int64_t d, int64_t n_segments, const int64_t *segments, const int64_t *slots,
                      int64_t slot_stride, float scale, int dtype, int64_t threads) {
    const int64_t group = hq / hkv, pairs = n_segments * hkv;
    if (group > 64 || d % LANES) return -2;
    int64_t widest = 0;
    for (int64_t s = 0; s < n_segments; s++) {
        int64_t keys = segments[4 * s + 1] + segments[4 * s + 2];
        if (keys > widest) widest = keys;
    }
    if (threads > pairs) threads = pairs;
    if (threads < 1) threads = 1;
    const int64_t padded_max = (widest + LANES - 1) / LANES * LANES;
    const int bf16_dots = HAVE_BF16_DOTS && dtype == DTYPE_BF16;
    const size_t floats = (size_t)(2 * padded_max * d + group * padded_max + 2 * group * d);
    const size_t share = (floats * sizeof(float) + 63) / 64 * 64; /* one thread's scratch, in bytes */
    char *scratch = aligned_alloc(64, share * (size_t)threads);
    if (!scratch) return -1;
#pragma omp parallel for num_threads((int)threads) schedule(dynamic) if (threads > 1)
    for (int64_t pair = 0; pair < pairs; pair++) {
        float *kt = (float *)(scratch + share * (size_t)omp_get_thread_num());
        float *vals = kt + padded_max * d;
        float *probs = vals + padded_max * d;
        float *qrows = probs + group * padded_max;
        float *results = qrows + group * d;
        const int64_t s = pair / hkv, h = pair % hkv;
        const int64_t q_start = segments[4 * s], q_len = segments[4 * s + 1];
        const int64_t prefix = segments[4 * s + 2], causal = segments[4 * s + 3];
        const int64_t keys = prefix + q_len, padded = (keys + LANES - 1) / LANES * LANES;
        gather_keys(k, k_stride, v, v_stride, k_cache, v_cache, slots + s * slot_stride, q_start, prefix, keys,
                    padded, h, hkv, d, dtype, bf16_dots, kt, vals);
        for (int64_t i = 0; i < q_len; i++) {
            const int64_t limit = causal ? prefix + i + 1 : keys;
            const int64_t row = (q_start + i) * q_stride + h * group * d, dst = ((q_start + i) * hq + h * group) * d;
            if (bf16_dots) /* the bf16 values as they are */
                memcpy(qrows, (const uint16_t *)q + row, (size_t)(group * d) * sizeof(uint16_t));
            else
                for (int64_t e = 0; e < group * d; e++) qrows[e] = load_one(q, row + e, dtype);
            attend_row(qrows, group, kt, vals, limit, padded, d, scale, bf16_dots, probs, results);
            for (int64_t e = 0; e < group * d; e++) store_one(out, dst + e, results[e], dtype);
        }
    }
    free(scratch);
    return 0;
}
