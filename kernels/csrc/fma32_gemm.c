/* fp32 products with AVX-512 FMA on weights packed once (models/matmul.py's "fma32" backend).
 *
 * out [rows][n] (fp32) = in [rows][k] times weight [n][k]^T. On a Zen 4 EPYC, MKL's sgemm runs its
 * generic code path and repacks the weight on every call: an AR step of the fixture (fp32) spent
 * about a fifth of its time in MKL's copy routine. Here the weight is packed once, 16 columns side by
 * side for every k. Each output is one fp32 lane that starts at zero and takes k = 0, 1, ... in order,
 * one FMA each; blocking rows and columns only chooses which registers hold which lanes, so a row's
 * sums do not depend on the rows that share the call, nor on the thread count.
 *
 * Shapes: n a multiple of 64 (four vectors of 16 columns per pass). Built for any x86-64 CPU (the
 * functions carry their own target attribute); callers check fma32_ready() first.
 */
#include "common.h"

/* weight [n][k] -> packed [n / 16][k][16]: per vector of 16 columns, each k's 16 values side by side */
void fma32_pack(const float *weight, int64_t n, int64_t k, float *packed) {
    for (int64_t v = 0; v < n / 16; v++)
        for (int64_t i = 0; i < k; i++)
            for (int64_t col = 0; col < 16; col++) packed[(v * k + i) * 16 + col] = weight[(v * 16 + col) * k + i];
}

#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11
#include <immintrin.h>

#define FMA_TARGET __attribute__((target("avx512f")))
#define ROWS 4    /* rows per block: ROWS x COLUMNS sums, COLUMNS weight vectors and one input in registers */
#define COLUMNS 4 /* vectors of 16 columns per pass */

/* 1 when the kernel may run: the CPU has AVX512-F and the OS saves the zmm state */
int fma32_ready(void) { return avx512_usable(); }

/* `rows` (1..ROWS) rows against the COLUMNS vectors of one pass (`b`: the first vector's packed
 * weight, `stride` floats between vectors); always inlined with a constant `rows`, so that the sums
 * stay in registers */
FMA_TARGET static inline __attribute__((always_inline)) void block(const float *a, int64_t k, const float *b,
                                                                   int64_t stride, float *out, int64_t n,
                                                                   const int rows) {
    __m512 sums[ROWS][COLUMNS];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < COLUMNS; c++) sums[r][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        __m512 w[COLUMNS];
        for (int c = 0; c < COLUMNS; c++) w[c] = _mm512_loadu_ps(b + c * stride + i * 16);
        for (int r = 0; r < rows; r++) {
            const __m512 x = _mm512_set1_ps(a[r * k + i]);
            for (int c = 0; c < COLUMNS; c++) sums[r][c] = _mm512_fmadd_ps(x, w[c], sums[r][c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < COLUMNS; c++) _mm512_storeu_ps(out + r * n + c * 16, sums[r][c]);
}

FOUR_ROW_PASSES(columns, FMA_TARGET, float)

/* every row through the passes, shared out among threads as run_passes does */
void fma32_gemm(const float *in, int64_t rows, const float *packed, int64_t n, int64_t k, float *out,
                int64_t threads) {
    run_passes(columns, in, rows, packed, n, k, out, n / (COLUMNS * 16), threads);
}

#else
int fma32_ready(void) { return 0; }
void fma32_gemm(const float *in, int64_t rows, const float *packed, int64_t n, int64_t k, float *out,
                int64_t threads) {
    (void)in, (void)rows, (void)packed, (void)n, (void)k, (void)out, (void)threads;
}
#endif
