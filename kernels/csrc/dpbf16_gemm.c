/* bf16 products with AVX512-BF16 dot products (VDPBF16PS) on weights packed once, for CPUs that
 * compute bf16 in hardware without AMX tiles (AMD Zen 4 and later, Intel Cooper Lake; see
 * models/matmul.py's "dpbf16" backend).
 *
 * out [rows][n] (fp32 sums) = in [rows][k] times weight [n][k]^T. On a Zen 4 EPYC (one thread, the
 * bundled model's shapes) MKL's bf16 GEMM takes 30-1100 us a call and oneDNN's packed product 15-320:
 * MKL repacks the weight on every call and is not tuned for the CPU, oneDNN spends about 15 us on any
 * call. Here the weight is packed once into the layout VDPBF16PS reads: 16 columns side by side, each
 * with a pair of consecutive k values. Each output is one fp32 lane that starts at zero and takes the
 * k pairs in order, one VDPBF16PS each; blocking rows and columns only chooses which registers hold
 * which lanes, so a row's sums do not depend on the rows that share the call, nor on the thread count.
 *
 * Shapes: n a multiple of 64 (four vectors of 16 columns per pass), k even. Built for any x86-64 CPU
 * (the functions carry their own target attribute); callers check dpbf16_ready() first.
 */
#include "common.h"

/* weight [n][k] -> packed [n / 16][k / 2][16][2]: per vector of 16 columns and pair of k values, each
 * column's two values side by side (one 64-byte load per pair) */
void dpbf16_pack(const uint16_t *weight, int64_t n, int64_t k, uint16_t *packed) {
    for (int64_t v = 0; v < n / 16; v++)
        for (int64_t pair = 0; pair < k / 2; pair++)
            for (int64_t col = 0; col < 16; col++) {
                const uint16_t *w = weight + (v * 16 + col) * k + 2 * pair;
                uint16_t *dst = packed + ((v * (k / 2) + pair) * 16 + col) * 2;
                dst[0] = w[0];
                dst[1] = w[1];
            }
}

#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11
#include <immintrin.h>

#define DP_TARGET __attribute__((target("avx512f,avx512bf16")))
#define ROWS 4    /* rows per block: ROWS x COLUMNS sums, COLUMNS weight vectors and one input in registers */
#define COLUMNS 4 /* vectors of 16 columns per pass */

/* 1 when the kernel may run: the CPU has AVX512-F and AVX512-BF16 and the OS saves the zmm state */
int dpbf16_ready(void) {
    if (!avx512_usable()) return 0;
    unsigned eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    if (eax < 1) return 0; /* sub-leaf 1 exists */
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(1));
    return (eax >> 5) & 1u; /* AVX512-BF16 */
}

/* `rows` (1..ROWS) rows against the COLUMNS vectors of one pass (`b`: the first vector's packed
 * weight, `stride` elements between vectors); always inlined with a constant `rows`, so that the sums
 * stay in registers */
DP_TARGET static inline __attribute__((always_inline)) void block(const uint16_t *a, int64_t k, const uint16_t *b,
                                                                  int64_t stride, float *out, int64_t n,
                                                                  const int rows) {
    __m512 sums[ROWS][COLUMNS];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < COLUMNS; c++) sums[r][c] = _mm512_setzero_ps();
    for (int64_t pair = 0; pair < k / 2; pair++) {
        __m512bh w[COLUMNS];
        for (int c = 0; c < COLUMNS; c++) w[c] = (__m512bh)_mm512_loadu_si512(b + c * stride + pair * 32);
        for (int r = 0; r < rows; r++) {
            int32_t two;
            memcpy(&two, a + r * k + 2 * pair, sizeof two);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(two);
            for (int c = 0; c < COLUMNS; c++) sums[r][c] = _mm512_dpbf16_ps(sums[r][c], x, w[c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < COLUMNS; c++) _mm512_storeu_ps(out + r * n + c * 16, sums[r][c]);
}

FOUR_ROW_PASSES(columns, DP_TARGET, uint16_t)

/* every row through the passes, shared out among threads as run_passes does */
void dpbf16_gemm(const uint16_t *in, int64_t rows, const uint16_t *packed, int64_t n, int64_t k, float *out,
                 int64_t threads) {
    run_passes(columns, in, rows, packed, n, k, out, n / (COLUMNS * 16), threads);
}

#else
int dpbf16_ready(void) { return 0; }
void dpbf16_gemm(const uint16_t *in, int64_t rows, const uint16_t *packed, int64_t n, int64_t k, float *out,
                 int64_t threads) {
    (void)in, (void)rows, (void)packed, (void)n, (void)k, (void)out, (void)threads;
}
#endif
