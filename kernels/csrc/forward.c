/* The decoder layers of one CPU serving forward in a single call (see models/native_forward.py).
 *
 * Each layer chains what the fast path's Python forward runs as two dozen tensor operations, each
 * a few microseconds of dispatch: RMSNorm, the fused q/k/v product, RoPE, the KV cache write, the
 * attention, the output product and residual, RMSNorm, the fused gate/up product, SiLU times up,
 * the down product and residual. The norms, RoPE and attention are the kernels of the other files;
 * products call triserve's packed kernels or BLAS through function pointers from Python (fp32: the
 * AVX-512 kernel of fma32_gemm.c on weights packed once, or the sgemm torch.mm calls on the Python
 * fast path's transposed weights; bf16: the AMX kernel of amx_gemm.c or the AVX512-BF16 one
 * of dpbf16_gemm.c on weights packed once, or MKL's bf16 GEMM where neither can serve), padded and split
 * into pieces as models.matmul's probes decided, so a row's product depends on the row alone. Draft rows
 * may take products of their own (adapter-merged weights, or int8 ones: int8_gemm.c), gathered apart from
 * the others. Every other step works row by row. A row's result therefore never depends on what shares
 * the forward.
 */
#include <omp.h>
#include <stdlib.h>

#include "common.h"

/* threads > 1: the passes are shared out among up to that many threads through OpenMP (the runtime
 * torch's CPU build loads too), four passes at least each for fewer than four rows (a lone row's pass
 * is too little work: starting a thread costs about what it saves), one at least from four rows (on a
 * Zen 4, two threads then take 20-40% off a product of 256 outputs at 8 rows, which four passes a
 * thread kept on one); each output is computed by the same operations whichever thread runs it, so
 * the thread count changes no bit */
void run_passes(column_passes columns, const void *in, int64_t rows, const void *packed, int64_t n, int64_t k,
                float *out, int64_t passes, int64_t threads) {
    const int64_t least = rows >= 4 ? 1 : 4; /* passes a thread takes at least */
    if (threads > passes / least) threads = passes / least;
    if (threads <= 1 || rows == 0) {
        columns(in, rows, packed, n, k, out, 0, passes);
        return;
    }
#pragma omp parallel num_threads((int)threads)
    {
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
        columns(in, rows, packed, n, k, out, passes * t / count, passes * (t + 1) / count);
    }
}

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);
typedef void (*gemm_bf16_fn)(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t *a,
                             int lda, const uint16_t *b, int ldb, float beta, float *c, int ldc);

/* which kernel multiplies a product's weight (KERNEL_MKL: the dtype's BLAS function) */
enum { KERNEL_MKL = 0, KERNEL_AMX = 1, KERNEL_DPBF16 = 2, KERNEL_INT8 = 3, KERNEL_FMA32 = 4 };

/* out [rows][n] = in [rows][k] times weight^T: fp32 through fma32_gemm on the weight packed for it or
 * sgemm on the weight held transposed ([k][n]); bf16 with fp32 sums rounded once to bf16, through amx_gemm or dpbf16_gemm on the weight
 * packed for it or MKL's bf16 GEMM on the weight as it is ([n][k]); approximated by int8_gemm on its
 * packed block (drafts only), its fp32 sums stored as the dtype; calls of fewer than min_rows rows
 * are padded with zero rows to min_rows, calls of more than max_rows split into pieces */
struct product {
    const void *weight; /* NULL: no such product (a projection without a draft adapter) */
    int64_t n, k, min_rows, max_rows, kernel;
};

struct layer {
    const void *input_norm, *post_norm;                /* [hidden] */
    struct product qkv, o, gate_up, down;              /* base weights */
    struct product qkv_draft, o_draft, gate_up_draft, down_draft; /* draft rows' own products, where they have them */
};

struct model {
    int64_t layers, hidden, hq, hkv, d, intermediate;
    float eps, scale;
    int dtype;
    sgemm_fn sgemm;
    gemm_bf16_fn gemm_bf16;
    int64_t threads; /* the packed products' and the attention's (the BLAS functions follow their own settings) */
    const struct layer *layer;
    const void *final_norm; /* [hidden] */
};

struct step {
    void *x; /* [rows][hidden], the embedded rows in, the last layer's output out */
    int64_t rows;
    const void *cos, *sin, *qscale; /* [rows][d], [rows][d], [rows] or NULL */
    int64_t writes;
    const int64_t *write_rows, *write_slots;
    int64_t segments;
    const int64_t *segment_table; /* per segment: q_start, q_len, prefix_len, causal */
    const int64_t *prefix_slots;
    int64_t slot_stride;
    int64_t drafts; /* rows that take the draft adapter, ascending */
    const int64_t *draft_rows;
    void *k_cache, *v_cache; /* [layers][slots][hkv][d] */
    int64_t cache_slots;
    int64_t reads, kept; /* rows whose final hidden states the step reads: now, and later (deferred) */
    const int64_t *read_rows, *kept_rows;
    void *read_out, *kept_out; /* [reads][hidden], [kept][hidden]: those rows through the final norm */
};

/* scratch of one forward's products: pad_in, pad_out for a padded call, wide for bf16's fp32 sums, quantized
 * for an int8 call's quantized rows */
struct product_scratch {
    char *pad_in;
    float *pad_out, *wide;
    uint8_t *quantized;
};

static size_t element(int dtype) { return dtype == DTYPE_F32 ? sizeof(float) : sizeof(uint16_t); }

/* count fp32 sums -> out in the dtype (bf16: rounded as torch rounds; exported so that a test checks
 * the rounding the native kernels share against torch's on values no product gives, such as denormals) */
void store_rows(const float *sums, int64_t count, void *out, int dtype) {
    if (dtype == DTYPE_F32) {
        memcpy(out, sums, (size_t)count * sizeof(float));
        return;
    }
    int64_t i = 0;
    for (; i + LANES <= count; i += LANES) store_lanes(out, i, load_lanes(sums, i, DTYPE_F32), dtype);
    for (; i < count; i++) store_one(out, i, sums[i], dtype);
}

/* the product's kernel on exactly `rows` rows, its fp32 sums into out */
static void gemm(const struct model *m, const struct product *p, const void *in, int64_t rows, float *out,
                 const struct product_scratch *scratch) {
    const int n = (int)p->n, k = (int)p->k, r = (int)rows;
    if (p->kernel == KERNEL_INT8) {
        int8_gemm(in, m->dtype, rows, p->weight, p->n, p->k, out, m->threads, scratch->quantized);
    } else if (p->kernel == KERNEL_FMA32) {
        fma32_gemm(in, rows, p->weight, p->n, p->k, out, m->threads);
    } else if (m->dtype == DTYPE_F32) {
        const float one = 1.0f, zero = 0.0f;
        m->sgemm("N", "N", &n, &r, &k, &one, p->weight, &n, in, &k, &zero, out, &n);
    } else if (p->kernel == KERNEL_AMX) {
        amx_gemm(in, rows, p->weight, p->n, p->k, out, m->threads);
    } else if (p->kernel == KERNEL_DPBF16) {
        dpbf16_gemm(in, rows, p->weight, p->n, p->k, out, m->threads);
    } else {
        m->gemm_bf16(101 /* row major */, 111 /* no transpose */, 112 /* transpose */, r, n, k, 1.0f, in, k,
                     p->weight, k, 0.0f, out, n);
    }
}

static void product(const struct model *m, const struct product *p, const void *in, int64_t rows, void *out,
                    const struct product_scratch *scratch) {
    const size_t es = element(m->dtype);
    for (int64_t start = 0; start < rows; start += p->max_rows) {
        const int64_t piece = rows - start < p->max_rows ? rows - start : p->max_rows;
        const char *src = (const char *)in + (size_t)(start * p->k) * es;
        char *dst = (char *)out + (size_t)(start * p->n) * es;
        if (piece >= p->min_rows) {
            float *sums = m->dtype == DTYPE_F32 ? (float *)dst : scratch->wide;
            gemm(m, p, src, piece, sums, scratch);
            if (sums != (float *)dst) store_rows(sums, piece * p->n, dst, m->dtype);
            continue;
        }
        memcpy(scratch->pad_in, src, (size_t)(piece * p->k) * es);
        memset(scratch->pad_in + (size_t)(piece * p->k) * es, 0, (size_t)((p->min_rows - piece) * p->k) * es);
        gemm(m, p, scratch->pad_in, p->min_rows, scratch->pad_out, scratch);
        store_rows(scratch->pad_out, piece * p->n, dst, m->dtype);
    }
}

/* scratch of adapted(): rows gathered (inputs, then outputs) and the numbers of a step's base rows */
struct row_scratch {
    char *gather;
    int64_t *base_rows;
};

/* `count` of the step's rows (`rows`, ascending) through p: in place where they are consecutive, else
 * gathered and scattered back */
static void product_of_rows(const struct model *m, const struct product *p, const int64_t *rows, int64_t count,
                            const void *in, void *out, const struct product_scratch *scratch, char *gather) {
    const size_t es = element(m->dtype), in_row = (size_t)p->k * es, out_row = (size_t)p->n * es;
    if (rows[count - 1] - rows[0] + 1 == count) {
        product(m, p, (const char *)in + rows[0] * in_row, count, (char *)out + rows[0] * out_row, scratch);
        return;
    }
    char *g_out = gather + (size_t)count * in_row;
    for (int64_t i = 0; i < count; i++) memcpy(gather + i * in_row, (const char *)in + rows[i] * in_row, in_row);
    product(m, p, gather, count, g_out, scratch);
    for (int64_t i = 0; i < count; i++) memcpy((char *)out + rows[i] * out_row, g_out + i * out_row, out_row);
}

/* the draft rows through their own product (adapter-merged, as models.layers.adapted_linear merges
 * drafts, or int8), the other rows through the base product: each row computed once, by its product */
static void adapted(const struct model *m, const struct step *s, const struct product *base,
                    const struct product *draft, const void *in, void *out, const struct product_scratch *scratch,
                    const struct row_scratch *rows) {
    if (!draft->weight || !s->drafts) {
        product(m, base, in, s->rows, out, scratch);
        return;
    }
    if (s->drafts == s->rows) {
        product(m, draft, in, s->rows, out, scratch);
        return;
    }
    int64_t count = 0;
    for (int64_t r = 0, d = 0; r < s->rows; r++) {
        if (d < s->drafts && s->draft_rows[d] == r)
            d++;
        else
            rows->base_rows[count++] = r;
    }
    product_of_rows(m, base, rows->base_rows, count, in, out, scratch, rows->gather);
    product_of_rows(m, draft, s->draft_rows, s->drafts, in, out, scratch, rows->gather);
}

/* x += y, rounded to the dtype as a tensor addition rounds */
static void residual(void *x, const void *y, int64_t count, int dtype) {
    int64_t i = 0;
    for (; i + LANES <= count; i += LANES)
        store_lanes(x, i, load_lanes(x, i, dtype) + load_lanes(y, i, dtype), dtype);
    for (; i < count; i++) store_one(x, i, load_one(x, i, dtype) + load_one(y, i, dtype), dtype);
}

/* act [rows][inter] = silu(gate) * up from gate_up [rows][2 * inter], in the dtype: silu's result and
 * the product each rounded to it, as torch rounds F.silu(gate) * up. silu(g) = g / (1 + exp(-g)),
 * written through e = exp(-|g|) <= 1 so that no exponential overflows: g / (1 + e) for g >= 0,
 * g * e / (1 + e) below (torch's own exponential rounds otherwise, so this agrees with F.silu to
 * float rounding, not bit for bit). */
static inline vf silu_lanes(vf g) {
    const vf zero = {0};
    const vi negative = g < zero;
    const vf ex = exp_nonpositive(select_lanes(negative, g, zero - g));
    return select_lanes(negative, g * ex, g) / (1.0f + ex);
}

static void silu_times_up(const void *gate_up, void *act, int64_t rows, int64_t inter, int dtype) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g0 = r * 2 * inter, u0 = g0 + inter, out0 = r * inter;
        int64_t e = 0;
        for (; e + LANES <= inter; e += LANES) {
            const vf silu = as_dtype_lanes(silu_lanes(load_lanes(gate_up, g0 + e, dtype)), dtype);
            store_lanes(act, out0 + e, silu * load_lanes(gate_up, u0 + e, dtype), dtype);
        }
        for (; e < inter; e++) { /* a width LANES does not divide: the last values one by one */
            vf g = {0};
            g[0] = load_one(gate_up, g0 + e, dtype);
            store_one(act, out0 + e, as_dtype(silu_lanes(g)[0], dtype) * load_one(gate_up, u0 + e, dtype), dtype);
        }
    }
}

static int64_t larger(int64_t a, int64_t b) { return a > b ? a : b; }

/* The last layer past its attention needs only the rows the step reads, now or deferred: the other
 * rows' keys and values have served the attention, and their outputs would be dropped. Moves those
 * rows' hidden states (x) and attention outputs (attn) to the front, in order, and makes `sub` the
 * step over them (draft, read and deferred rows renumbered into `numbers`: the step's rows + drafts +
 * reads + kept int64s). Each row's products and norms are its own, so the rows kept compute exactly
 * what they would beside the others. Returns the number of rows kept. */
static int64_t keep_read_rows(const struct step *s, char *x, size_t x_row, char *attn, size_t attn_row,
                              struct step *sub, int64_t *numbers) {
    int64_t *index = numbers, *drafts = numbers + s->rows, *reads = drafts + s->drafts, *kept = reads + s->reads;
    for (int64_t r = 0; r < s->rows; r++) index[r] = -1;
    for (int64_t i = 0; i < s->reads; i++) index[s->read_rows[i]] = 0;
    for (int64_t i = 0; i < s->kept; i++) index[s->kept_rows[i]] = 0;
    int64_t rows = 0;
    for (int64_t r = 0; r < s->rows; r++) {
        if (index[r] < 0) continue;
        index[r] = rows;
        if (rows != r) { /* rows only move forward: what is overwritten was moved already or is not kept */
            memmove(x + (size_t)rows * x_row, x + (size_t)r * x_row, x_row);
            memmove(attn + (size_t)rows * attn_row, attn + (size_t)r * attn_row, attn_row);
        }
        rows++;
    }
    *sub = *s;
    sub->rows = rows;
    sub->drafts = 0;
    for (int64_t i = 0; i < s->drafts; i++)
        if (index[s->draft_rows[i]] >= 0) drafts[sub->drafts++] = index[s->draft_rows[i]];
    for (int64_t i = 0; i < s->reads; i++) reads[i] = index[s->read_rows[i]];
    for (int64_t i = 0; i < s->kept; i++) kept[i] = index[s->kept_rows[i]];
    sub->draft_rows = drafts, sub->read_rows = reads, sub->kept_rows = kept;
    return rows;
}

/* Runs every layer on s->x in place, in the model's dtype (fp32 or bf16), then the final norm on the
 * rows the step reads (after the last layer's attention, only those rows go on: keep_read_rows; s->x
 * holds them at its front when this returns). Returns 0; -1 when out of memory, or the attention's
 * status. */
int decoder_forward(const struct model *m, const struct step *s) {
    const int64_t hidden = m->hidden, inter = m->intermediate, d = m->d, kv_width = m->hkv * d;
    const int64_t heads = m->hq + m->hkv, qkv_width = (m->hq + 2 * m->hkv) * d, q_width = m->hq * d;
    const size_t es = element(m->dtype);
    int64_t t = s->rows, pad_in = 0, pad_out = 0, wide = 0, quantized = 0;
    for (int64_t i = 0; i < m->layers; i++) {
        const struct layer *l = &m->layer[i];
        const struct product *all[] = {&l->qkv, &l->o, &l->gate_up, &l->down, &l->qkv_draft, &l->o_draft,
                                       &l->gate_up_draft, &l->down_draft};
        for (size_t j = 0; j < sizeof all / sizeof *all; j++) {
            const struct product *p = all[j];
            if (!p->weight) continue;
            pad_in = larger(pad_in, p->min_rows * p->k);
            pad_out = larger(pad_out, p->min_rows * p->n);
            const int64_t call = t < p->max_rows ? t : p->max_rows; /* rows of the largest call */
            if (m->dtype != DTYPE_F32) wide = larger(wide, call * p->n);
            if (p->kernel == KERNEL_INT8) quantized = larger(quantized, int8_work_bytes(call, p->k));
        }
    }
    /* a gathered row's widest input and widest output (adapted() gathers base or draft rows) */
    const int64_t widest = larger(hidden, inter) + larger(larger(qkv_width, 2 * inter), hidden);
    const int64_t gather = s->drafts ? t * widest : 0; /* the base rows or the draft rows, gathered */
    const int64_t activations = t * (hidden + qkv_width + heads * d + q_width + hidden + 2 * inter + inter);
    /* elements of the dtype first, then fp32 scratch, int64 row numbers and int8 quantized rows; 64-byte
     * aligned pieces */
    const size_t typed = ((size_t)(activations + gather + pad_in) * es + 63) / 64 * 64;
    const size_t wide_bytes = ((size_t)(pad_out + wide) * sizeof(float) + 63) / 64 * 64;
    const size_t number_bytes = ((size_t)(2 * t + s->drafts + s->reads + s->kept) * 8 + 63) / 64 * 64;
    char *scratch = aligned_alloc(64, typed + wide_bytes + number_bytes + ((size_t)quantized + 63) / 64 * 64);
    if (!scratch) return -1;
    int64_t *numbers = (int64_t *)(scratch + typed + wide_bytes);
    struct step last;
#define NEXT(ptr, count) ptr = cursor, cursor += (size_t)(count) * es
    char *cursor = scratch, *h, *qkv, *roped, *attn, *proj, *gate_up, *act, *gathered;
    NEXT(h, t * hidden); NEXT(qkv, t * qkv_width); NEXT(roped, t * heads * d); NEXT(attn, t * q_width);
    NEXT(proj, t * hidden); NEXT(gate_up, t * 2 * inter); NEXT(act, t * inter); NEXT(gathered, gather);
#undef NEXT
    const struct product_scratch pads = {cursor, (float *)(scratch + typed), (float *)(scratch + typed) + pad_out,
                                         (uint8_t *)scratch + typed + wide_bytes + number_bytes};
    const struct row_scratch rows = {gathered, numbers + t + s->drafts + s->reads + s->kept};
    char *x = s->x;
    int status = 0;
    for (int64_t i = 0; i < m->layers && !status; i++) {
        const struct layer *l = &m->layer[i];
        if ((status = rms_norm(x, hidden, l->input_norm, h, t, hidden, m->eps, m->dtype))) break;
        adapted(m, s, &l->qkv, &l->qkv_draft, h, qkv, &pads, &rows);
        rope(qkv, qkv_width, qkv + q_width * es, qkv_width, s->cos, s->sin, s->qscale, roped, t, m->hq, m->hkv, d,
             m->dtype);
        const char *keys = roped + q_width * es, *values = qkv + (q_width + kv_width) * es;
        const size_t layer_bytes = (size_t)(s->cache_slots * kv_width) * es, row = (size_t)kv_width * es;
        char *k_cache = (char *)s->k_cache + i * layer_bytes, *v_cache = (char *)s->v_cache + i * layer_bytes;
        for (int64_t w = 0; w < s->writes; w++) {
            const int64_t at = s->write_rows[w], slot = s->write_slots[w];
            memcpy(k_cache + slot * row, keys + at * heads * d * es, row);
            memcpy(v_cache + slot * row, values + at * qkv_width * es, row);
        }
        status = segment_attention(roped, heads * d, keys, heads * d, values, qkv_width, k_cache, v_cache, attn,
                                   m->hq, m->hkv, d, s->segments, s->segment_table, s->prefix_slots, s->slot_stride,
                                   m->scale, m->dtype, m->threads);
        if (status) break;
        if (i == m->layers - 1 && s->reads + s->kept < t) {
            t = keep_read_rows(s, x, (size_t)hidden * es, attn, (size_t)q_width * es, &last, numbers);
            s = &last;
        }
        adapted(m, s, &l->o, &l->o_draft, attn, proj, &pads, &rows);
        residual(x, proj, t * hidden, m->dtype);
        if ((status = rms_norm(x, hidden, l->post_norm, h, t, hidden, m->eps, m->dtype))) break;
        adapted(m, s, &l->gate_up, &l->gate_up_draft, h, gate_up, &pads, &rows);
        silu_times_up(gate_up, act, t, inter, m->dtype);
        adapted(m, s, &l->down, &l->down_draft, act, proj, &pads, &rows);
        residual(x, proj, t * hidden, m->dtype);
    }
    /* the final norm of the rows the step reads, each on its own as the layers' norms run */
    for (int64_t i = 0; i < s->reads && !status; i++)
        status = rms_norm(x + s->read_rows[i] * hidden * es, hidden, m->final_norm,
                          (char *)s->read_out + i * hidden * es, 1, hidden, m->eps, m->dtype);
    for (int64_t i = 0; i < s->kept && !status; i++)
        status = rms_norm(x + s->kept_rows[i] * hidden * es, hidden, m->final_norm,
                          (char *)s->kept_out + i * hidden * es, 1, hidden, m->eps, m->dtype);
    free(scratch);
    return status;
}
