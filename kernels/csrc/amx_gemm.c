/* bf16 products on AMX tiles with weights packed once (see models/matmul.py's "amx" backend).
 *
 * out [rows][n] (fp32 sums) = in [rows][k] times weight [n][k]^T. MKL's bf16 GEMM repacks the weight
 * on every call, a quarter of an AR step's time on an AMX Xeon; here the weight is packed once into
 * the tile layout TDPBF16PS reads. Each output is summed in one fixed order whatever the row count:
 * a tile of 16 columns starts at zero and takes the k dimension 32 values at a time, in order, each
 * TDPBF16PS adding one row's 32 products to one column's sum. Rows never meet, so a row's sums do
 * not depend on the rows that share the call (AMX treats bf16 denormals as zero, the same for all).
 *
 * Shapes: n a multiple of 64 (four tiles of 16 columns per pass), k a multiple of 32. Built for any
 * x86-64 CPU (the tile functions carry their own target attribute); callers check amx_ready() first.
 */
#include "common.h"

/* weight [n][k] -> packed [n / 64][k / 32][4][16][32]: per pass of 64 columns and step of 32 k values,
 * four tiles of 16 rows (pairs of k) by 16 columns, each pair's two values side by side */
void amx_pack(const uint16_t *weight, int64_t n, int64_t k, uint16_t *packed) {
    const int64_t steps = k / 32;
    for (int64_t g = 0; g < n / 64; g++)
        for (int64_t s = 0; s < steps; s++)
            for (int64_t t = 0; t < 4; t++) {
                uint16_t *tile = packed + ((g * steps + s) * 4 + t) * 512;
                for (int64_t pair = 0; pair < 16; pair++)
                    for (int64_t col = 0; col < 16; col++) {
                        const uint16_t *w = weight + (g * 64 + t * 16 + col) * k + s * 32 + 2 * pair;
                        tile[pair * 32 + col * 2] = w[0];
                        tile[pair * 32 + col * 2 + 1] = w[1];
                    }
            }
}

#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

/* The tile configuration LDTILECFG reads: per tile its rows and bytes per row. */
struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* 1 when the kernel may run: the CPU has AMX-BF16 and the kernel grants this process the tile state */
int amx_ready(void) {
    unsigned eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return 0; /* AMX-BF16, AMX-TILE */
    /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: Linux enables the tile registers on request */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

/* one block of up to 16 rows (rows0) against four tiles of columns: sums in tiles 0-3, the input in
 * 4, the weight in 5-7; or (rows1 > 0) two blocks against two tiles of columns, each weight tile read
 * once for both: sums in 0-1 (first block) and 2-3 (second), inputs in 4-5, the weight in 6-7 */
AMX_TARGET static void configure(int rows0, int rows1) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    const int second = rows1 ? rows1 : rows0; /* tiles 2-3: the second block's sums, or more of the first's */
    const int rows[8] = {rows0, rows0, second, second, rows0, rows1 ? rows1 : 16, 16, 16};
    for (int t = 0; t < 8; t++) cfg.bytes_per_row[t] = 64, cfg.rows[t] = (uint8_t)rows[t];
    _tile_loadconfig(&cfg);
}

AMX_TARGET static inline void zero_sums(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

/* up to 16 rows in one block, over the passes of 64 columns g0..g1-1: four tiles of 16 columns each */
AMX_TARGET static void one_block(const uint16_t *a, const uint16_t *packed, int64_t n, int64_t k, float *out,
                                 int64_t g0, int64_t g1) {
    const int64_t steps = k / 32;
    for (int64_t g = g0; g < g1; g++) {
        const uint16_t *b = packed + g * steps * 2048;
        zero_sums();
        for (int64_t s = 0; s < steps; s++, b += 2048) {
            _tile_loadd(4, a + s * 32, k * 2);
            _tile_loadd(5, b, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, b + 512, 64);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(7, b + 1024, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, b + 1536, 64);
            _tile_dpbf16ps(3, 4, 5);
        }
        float *c = out + g * 64;
        _tile_stored(0, c, n * 4);
        _tile_stored(1, c + 16, n * 4);
        _tile_stored(2, c + 32, n * 4);
        _tile_stored(3, c + 48, n * 4);
    }
}

/* 16 rows and up to 16 more (the next block, 16 rows below), over the same columns: two tiles of 16
 * columns per pass, each weight tile multiplied into both blocks' sums (the same operations per row
 * as one_block) */
AMX_TARGET static void two_blocks(const uint16_t *a, const uint16_t *packed, int64_t n, int64_t k, float *out,
                                  int64_t g0, int64_t g1) {
    const int64_t steps = k / 32;
    for (int64_t g = 2 * g0; g < 2 * g1; g++) {
        const uint16_t *b = packed + (g / 2) * steps * 2048 + (g % 2) * 1024;
        zero_sums();
        for (int64_t s = 0; s < steps; s++, b += 2048) {
            _tile_loadd(4, a + s * 32, k * 2);
            _tile_loadd(5, a + 16 * k + s * 32, k * 2);
            _tile_loadd(6, b, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            _tile_loadd(7, b + 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
        float *c = out + g * 32;
        _tile_stored(0, c, n * 4);
        _tile_stored(1, c + 16, n * 4);
        _tile_stored(2, c + 16 * n, n * 4);
        _tile_stored(3, c + 16 * n + 16, n * 4);
    }
}

/* every row over the passes of 64 columns g0..g1-1, on this thread's tiles */
AMX_TARGET static void columns(const void *input, int64_t rows, const void *weight, int64_t n, int64_t k, float *out,
                               int64_t g0, int64_t g1) {
    const uint16_t *in = input, *packed = weight;
    int64_t r = 0;
    for (; rows - r > 16; r += 32) {
        const int second = rows - r - 16 < 16 ? (int)(rows - r - 16) : 16;
        configure(16, second);
        two_blocks(in + r * k, packed, n, k, out + r * n, g0, g1);
    }
    if (r < rows) {
        configure((int)(rows - r), 0);
        one_block(in + r * k, packed, n, k, out + r * n, g0, g1);
    }
    _tile_release();
}

/* every row through the passes of 64 columns, shared out among threads as run_passes does */
void amx_gemm(const uint16_t *in, int64_t rows, const uint16_t *packed, int64_t n, int64_t k, float *out,
              int64_t threads) {
    run_passes(columns, in, rows, packed, n, k, out, n / 64, threads);
}

#else
int amx_ready(void) { return 0; }
void amx_gemm(const uint16_t *in, int64_t rows, const uint16_t *packed, int64_t n, int64_t k, float *out,
              int64_t threads) {
    (void)in, (void)rows, (void)packed, (void)n, (void)k, (void)out, (void)threads;
}
#endif
