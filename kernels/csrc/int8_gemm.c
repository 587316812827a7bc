/* Approximate products for speculative drafts: int8 weights and rows through AVX512-VNNI (VPDPBUSD).
 *
 * Why: a draft only proposes tokens, which the verify pass (in the model's own dtype) accepts or
 * rejects, so its arithmetic may be cheaper without changing what a request emits. On a Zen 4 EPYC the
 * bf16 products run at VDPBF16PS's peak (32 multiply-adds a cycle); VPDPBUSD does 64. See
 * models/matmul.py's Int8 and models/native_forward.py.
 *
 * Weights: each output column quantized once, symmetrically, to int8 with its own scale (max |w| / 127).
 * Rows: each quantized when multiplied, to unsigned 8 bits with its own scale (max |x| / 127) and an
 * offset of 128 (VPDPBUSD multiplies unsigned by signed bytes): q = x * (1 / s) rounded to the nearest
 * integer (ties to even), + 128. The int32 sums are exact (no saturation: four products of at most
 * 255 x 127 a step, k up to 2^14), so a row's result depends on the row alone, whatever the call's row
 * or thread count. Per column c: out = (sum(q w_c) - 128 sum(w_c)) * scale_c * s.
 *
 * Packed block of a [n][k] weight (n a multiple of 32, k of 16): int8 [n / 16][k / 4][16][4] (per
 * vector of 16 columns and quad of k values, each column's four values side by side), then float
 * scale[n], then int32 column sums[n]: n * k + 8n bytes.
 */
#include <math.h>

#include "common.h"

int64_t int8_packed_bytes(int64_t n, int64_t k) { return n * k + 8 * n; }

/* the scratch int8_gemm takes for `rows` rows of k values */
int64_t int8_work_bytes(int64_t rows, int64_t k) { return rows * k + rows * (int64_t)sizeof(float); }

/* weight [n][k] fp32 -> the packed block */
void int8_pack(const float *weight, int64_t n, int64_t k, int8_t *packed) {
    float *scale = (float *)(packed + n * k);
    int32_t *sums = (int32_t *)(scale + n);
    for (int64_t c = 0; c < n; c++) {
        float top = 0.0f;
        for (int64_t i = 0; i < k; i++) top = fmaxf(top, fabsf(weight[c * k + i]));
        scale[c] = top > 0.0f ? top / 127.0f : 1.0f;
        int32_t sum = 0;
        for (int64_t i = 0; i < k; i++) {
            const int8_t q = (int8_t)lrintf(weight[c * k + i] / scale[c]);
            packed[((c / 16 * (k / 4) + i / 4) * 16 + c % 16) * 4 + i % 4] = q;
            sum += q;
        }
        sums[c] = sum;
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11
#include <immintrin.h>

#define Q_TARGET __attribute__((target("avx512f,avx512vnni")))
#define ROWS 8    /* rows per block: ROWS x COLUMNS sums, COLUMNS weight vectors and one input in registers */
#define COLUMNS 2 /* vectors of 16 columns per pass (8 x 2 measured fastest on a Zen 4: 1.6-1.8x
                     dpbf16's products at 8-32 rows; 4 x 4 gained 10-30%) */

/* 1 when the kernel may run: the CPU has AVX512-F and AVX512-VNNI and the OS saves the zmm state */
int int8_ready(void) {
    if (!avx512_usable()) return 0;
    unsigned eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    return (ecx >> 11) & 1u; /* AVX512-VNNI */
}

/* `rows` (1..ROWS) quantized rows against the COLUMNS vectors of one pass: int32 sums, then each
 * column's offset correction and scale (the row's scale is applied by int8_gemm) */
Q_TARGET static inline __attribute__((always_inline)) void block(const uint8_t *a, int64_t k, const int8_t *b,
                                                                 int64_t stride, const float *scale,
                                                                 const int32_t *sums, float *out, int64_t n,
                                                                 const int rows) {
    __m512i acc[ROWS][COLUMNS];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < COLUMNS; c++) acc[r][c] = _mm512_setzero_si512();
    for (int64_t quad = 0; quad < k / 4; quad++) {
        __m512i w[COLUMNS];
        for (int c = 0; c < COLUMNS; c++) w[c] = _mm512_loadu_si512(b + c * stride + quad * 64);
        for (int r = 0; r < rows; r++) {
            int32_t four;
            memcpy(&four, a + r * k + 4 * quad, sizeof four);
            const __m512i x = _mm512_set1_epi32(four);
            for (int c = 0; c < COLUMNS; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], x, w[c]);
        }
    }
    for (int c = 0; c < COLUMNS; c++) {
        const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(sums + c * 16), 7);
        const __m512 s = _mm512_loadu_ps(scale + c * 16);
        for (int r = 0; r < rows; r++) {
            const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], offset));
            _mm512_storeu_ps(out + r * n + c * 16, _mm512_mul_ps(exact, s));
        }
    }
}

/* every quantized row over the passes of 32 columns g0..g1-1 */
Q_TARGET static void columns(const void *in, int64_t rows, const void *packed, int64_t n, int64_t k, float *out,
                             int64_t g0, int64_t g1) {
    const int64_t stride = k * 16; /* bytes of one vector's packed weight */
    const int8_t *weights = packed;
    const float *scale = (const float *)(weights + n * k);
    const int32_t *sums = (const int32_t *)(scale + n);
    for (int64_t g = g0; g < g1; g++) {
        const int8_t *b = weights + g * COLUMNS * stride;
        const int64_t c0 = g * COLUMNS * 16;
        int64_t r = 0;
        const uint8_t *a = in;
        for (; r + ROWS <= rows; r += ROWS)
            block(a + r * k, k, b, stride, scale + c0, sums + c0, out + r * n + c0, n, ROWS);
        switch (rows - r) {
        case 7: block(a + r * k, k, b, stride, scale + c0, sums + c0, out + r * n + c0, n, 7); break;
        case 6: block(a + r * k, k, b, stride, scale + c0, sums + c0, out + r * n + c0, n, 6); break;
        case 5: block(a + r * k, k, b, stride, scale + c0, sums + c0, out + r * n + c0, n, 5); break;
        case 4: block(a + r * k, k, b, stride, scale + c0, sums + c0, out + r * n + c0, n, 4); break;
        case 3: block(a + r * k, k, b, stride, scale + c0, sums + c0, out + r * n + c0, n, 3); break;
        case 2: block(a + r * k, k, b, stride, scale + c0, sums + c0, out + r * n + c0, n, 2); break;
        case 1: block(a + r * k, k, b, stride, scale + c0, sums + c0, out + r * n + c0, n, 1); break;
        default: break;
        }
    }
}

/* a row of k values (dtype) as 16 fp32 lanes from `i` */
Q_TARGET static inline __m512 lanes(const void *row, int64_t i, int dtype) {
    if (dtype == DTYPE_F32) return _mm512_loadu_ps((const float *)row + i);
    const __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* a row -> k unsigned bytes round(x / s) + 128 (ties to even); returns s = max |x| / 127 (1 for a zero row) */
Q_TARGET static float quantize(const void *row, int64_t k, int dtype, uint8_t *q) {
    __m512 top = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(lanes(row, i, dtype)));
    const float most = _mm512_reduce_max_ps(top), s = most > 0.0f ? most / 127.0f : 1.0f;
    const __m512 inverse = _mm512_set1_ps(1.0f / s);
    const __m512i offset = _mm512_set1_epi32(128);
    for (int64_t i = 0; i < k; i += 16) {
        const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(lanes(row, i, dtype), inverse)), offset);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtusepi32_epi8(v));
    }
    return s;
}

/* out [rows][n] fp32 ~= in [rows][k] (dtype) times the packed weight^T (k a multiple of 16); work: scratch
 * of int8_work_bytes(rows, k) bytes (the quantized rows and their scales) */
Q_TARGET void int8_gemm(const void *in, int dtype, int64_t rows, const int8_t *packed, int64_t n, int64_t k,
                        float *out, int64_t threads, uint8_t *work) {
    uint8_t *q = work;
    float *row_scale = (float *)(q + rows * k); /* k is a multiple of 16: aligned */
    const size_t width = dtype == DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    for (int64_t r = 0; r < rows; r++) row_scale[r] = quantize((const char *)in + r * k * width, k, dtype, q + r * k);
    run_passes(columns, q, rows, packed, n, k, out, n / (COLUMNS * 16), threads);
    for (int64_t r = 0; r < rows; r++) {
        const __m512 s = _mm512_set1_ps(row_scale[r]);
        for (int64_t c = 0; c < n; c += 16)
            _mm512_storeu_ps(out + r * n + c, _mm512_mul_ps(_mm512_loadu_ps(out + r * n + c), s));
    }
}

#else
int int8_ready(void) { return 0; }
void int8_gemm(const void *in, int dtype, int64_t rows, const int8_t *packed, int64_t n, int64_t k, float *out,
               int64_t threads, uint8_t *work) {
    (void)in, (void)dtype, (void)rows, (void)packed, (void)n, (void)k, (void)out, (void)threads, (void)work;
}
#endif
