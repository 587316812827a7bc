/* The decoder layers of one CPU serving forward in a single call (see models/native_forward.py).
 *
 * Each layer chains what the fast path's Python forward runs as two dozen tensor operations, each
 * a few microseconds of dispatch: RMSNorm, the fused q/k/v product, RoPE, the KV cache write, the
 * attention, the output product and residual, RMSNorm, the fused gate/up product, SiLU times up,
 * the down product and residual. The norms, RoPE and attention are the kernels of the other files;
 * products call the BLAS sgemm that torch.mm calls (its function pointer comes from Python), on the
 * same transposed weights, padded and split into pieces as models.matmul's probes decided, so a row's
 * product is the Python fast path's bit for bit and depends only on the row. Every other step works
 * row by row. A row's result therefore never depends on what shares the forward.
 */
#include <stdlib.h>

#include "common.h"

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);

/* out [rows][n] = in [rows][k] times weight^T, the weight held transposed ([k][n]); calls of fewer than
 * min_rows rows are padded with zero rows to min_rows, calls of more than max_rows split into pieces */
struct product {
    const float *transposed; /* NULL: no such product (a projection without a draft adapter) */
    int64_t n, k, min_rows, max_rows;
};

struct layer {
    const void *input_norm, *post_norm;           /* [hidden] */
    struct product qkv, o, gate_up, down;          /* base weights */
    struct product o_draft, gate_up_draft, down_draft; /* draft rows' merged weights, where adapted */
};

struct model {
    int64_t layers, hidden, hq, hkv, d, intermediate;
    float eps, scale;
    int dtype;
    sgemm_fn sgemm;
    const struct layer *layer;
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
    float *k_cache, *v_cache; /* [layers][slots][hkv][d] */
    int64_t cache_slots;
};

static void gemm(const struct model *m, const struct product *p, const float *in, int64_t rows, float *out) {
    const int n = (int)p->n, k = (int)p->k, r = (int)rows;
    const float one = 1.0f, zero = 0.0f;
    m->sgemm("N", "N", &n, &r, &k, &one, p->transposed, &n, in, &k, &zero, out, &n);
}

/* pad: scratch for min_rows rows of input and of output */
static void product(const struct model *m, const struct product *p, const float *in, int64_t rows, float *out,
                    float *pad) {
    for (int64_t start = 0; start < rows; start += p->max_rows) {
        const int64_t piece = rows - start < p->max_rows ? rows - start : p->max_rows;
        const float *src = in + start * p->k;
        float *dst = out + start * p->n;
        if (piece >= p->min_rows) {
            gemm(m, p, src, piece, dst);
            continue;
        }
        float *pad_in = pad, *pad_out = pad + p->min_rows * p->k;
        memcpy(pad_in, src, (size_t)(piece * p->k) * sizeof(float));
        memset(pad_in + piece * p->k, 0, (size_t)((p->min_rows - piece) * p->k) * sizeof(float));
        gemm(m, p, pad_in, p->min_rows, pad_out);
        memcpy(dst, pad_out, (size_t)(piece * p->n) * sizeof(float));
    }
}

/* the base product on every row, then the draft rows' merged product over theirs (as
 * models.layers.adapted_linear merges drafts); gather: scratch for the draft rows' input and output */
static void adapted(const struct model *m, const struct step *s, const struct product *base,
                    const struct product *draft, const float *in, float *out, float *pad, float *gather) {
    if (!draft->transposed || !s->drafts) {
        product(m, base, in, s->rows, out, pad);
        return;
    }
    if (s->drafts == s->rows) {
        product(m, draft, in, s->rows, out, pad);
        return;
    }
    product(m, base, in, s->rows, out, pad);
    float *g_out = gather + s->drafts * draft->k;
    for (int64_t i = 0; i < s->drafts; i++)
        memcpy(gather + i * draft->k, in + s->draft_rows[i] * draft->k, (size_t)draft->k * sizeof(float));
    product(m, draft, gather, s->drafts, g_out, pad);
    for (int64_t i = 0; i < s->drafts; i++)
        memcpy(out + s->draft_rows[i] * draft->n, g_out + i * draft->n, (size_t)draft->n * sizeof(float));
}

static void residual(float *restrict x, const float *restrict y, int64_t count) {
    for (int64_t i = 0; i < count; i++) x[i] = x[i] + y[i];
}

/* act [rows][inter] = silu(gate) * up from gate_up [rows][2 * inter]. silu(g) = g / (1 + exp(-g)),
 * written through e = exp(-|g|) <= 1 so that no exponential overflows: g / (1 + e) for g >= 0,
 * g * e / (1 + e) below (torch's own exponential rounds otherwise, so this agrees with F.silu to
 * float rounding, not bit for bit). */
static void silu_times_up(const float *restrict gate_up, float *restrict act, int64_t rows, int64_t inter) {
    const vf zero = {0}, one = zero + 1.0f;
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * inter, *u = g + inter;
        float *out = act + r * inter;
        int64_t e = 0;
        for (; e + LANES <= inter; e += LANES) {
            vf gv, uv;
            memcpy(&gv, g + e, sizeof gv);
            memcpy(&uv, u + e, sizeof uv);
            const vi negative = gv < zero;
            const vf ex = exp_nonpositive(select_lanes(negative, gv, zero - gv));
            const vf silu = select_lanes(negative, gv * ex, gv) / (one + ex);
            const vf result = silu * uv;
            memcpy(out + e, &result, sizeof result);
        }
        for (; e < inter; e++) {
            vf gv = zero;
            gv[0] = g[e];
            const int negative = g[e] < 0.0f;
            const vf ex = exp_nonpositive(negative ? gv : zero - gv);
            const float silu = (negative ? g[e] * ex[0] : g[e]) / (1.0f + ex[0]);
            out[e] = silu * u[e];
        }
    }
}

static int64_t larger(int64_t a, int64_t b) { return a > b ? a : b; }

static int64_t pad_floats(const struct product *p) { return p->transposed ? p->min_rows * (p->k + p->n) : 0; }

/* Runs every layer on s->x in place. fp32 only: products through sgemm. Returns 0; -1 when out of
 * memory, -2 for another dtype, or the attention's status. */
int decoder_forward(const struct model *m, const struct step *s) {
    if (m->dtype != DTYPE_F32) return -2;
    const int64_t t = s->rows, hidden = m->hidden, inter = m->intermediate, d = m->d;
    const int64_t heads = m->hq + m->hkv, qkv_width = (m->hq + 2 * m->hkv) * d, q_width = m->hq * d;
    int64_t pad = 0, gather = 0;
    for (int64_t i = 0; i < m->layers; i++) {
        const struct layer *l = &m->layer[i];
        const struct product *all[] = {&l->qkv, &l->o, &l->gate_up, &l->down, &l->o_draft, &l->gate_up_draft,
                                       &l->down_draft};
        for (size_t j = 0; j < sizeof all / sizeof *all; j++) pad = larger(pad, pad_floats(all[j]));
    }
    if (s->drafts) gather = s->drafts * (hidden + 2 * inter + larger(hidden, inter));
    const int64_t floats = t * (hidden + qkv_width + heads * d + q_width + hidden + 2 * inter + inter) + pad + gather;
    float *scratch = aligned_alloc(64, (size_t)((floats * (int64_t)sizeof(float) + 63) / 64 * 64));
    if (!scratch) return -1;
    float *x = s->x, *h = scratch, *qkv = h + t * hidden, *roped = qkv + t * qkv_width, *attn = roped + t * heads * d;
    float *proj = attn + t * q_width, *gate_up = proj + t * hidden, *act = gate_up + t * 2 * inter;
    float *pads = act + t * inter, *gathered = pads + pad;
    int status = 0;
    for (int64_t i = 0; i < m->layers && !status; i++) {
        const struct layer *l = &m->layer[i];
        if ((status = rms_norm(x, hidden, l->input_norm, h, t, hidden, m->eps, m->dtype))) break;
        product(m, &l->qkv, h, t, qkv, pads);
        rope(qkv, qkv_width, qkv + q_width, qkv_width, s->cos, s->sin, s->qscale, roped, t, m->hq, m->hkv, d,
             m->dtype);
        const float *keys = roped + q_width, *values = qkv + q_width + m->hkv * d;
        const int64_t kv_width = m->hkv * d;
        float *k_cache = s->k_cache + i * s->cache_slots * kv_width, *v_cache = s->v_cache + i * s->cache_slots * kv_width;
        for (int64_t w = 0; w < s->writes; w++) {
            const int64_t row = s->write_rows[w], slot = s->write_slots[w];
            memcpy(k_cache + slot * kv_width, keys + row * heads * d, (size_t)kv_width * sizeof(float));
            memcpy(v_cache + slot * kv_width, values + row * qkv_width, (size_t)kv_width * sizeof(float));
        }
        status = segment_attention(roped, heads * d, keys, heads * d, values, qkv_width, k_cache, v_cache, attn,
                                   m->hq, m->hkv, d, s->segments, s->segment_table, s->prefix_slots, s->slot_stride,
                                   m->scale, m->dtype);
        if (status) break;
        adapted(m, s, &l->o, &l->o_draft, attn, proj, pads, gathered);
        residual(x, proj, t * hidden);
        if ((status = rms_norm(x, hidden, l->post_norm, h, t, hidden, m->eps, m->dtype))) break;
        adapted(m, s, &l->gate_up, &l->gate_up_draft, h, gate_up, pads, gathered);
        silu_times_up(gate_up, act, t, inter);
        adapted(m, s, &l->down, &l->down_draft, act, proj, pads, gathered);
        residual(x, proj, t * hidden);
    }
    free(scratch);
    return status;
}
