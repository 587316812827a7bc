/* What the native CPU kernels share: bf16 widening and rounding, and the vector types. */
#ifndef TRISERVE_COMMON_H
#define TRISERVE_COMMON_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(LANES * sizeof(uint16_t))));

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

static inline float widen_bf16(uint16_t half) {
    uint32_t bits = (uint32_t)half << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* fp32 -> the nearest bf16, widened back (ties to even, as torch rounds; a NaN stays a quiet NaN),
 * written without branches so that loops over it vectorize */
static inline float through_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    const uint32_t quiet = (bits | 0x00400000u) & 0xffff0000u;
    bits = (bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* fp32 -> bf16 bits, rounded as through_bf16 rounds */
static inline uint16_t round_bf16(float value) {
    uint32_t bits;
    value = through_bf16(value);
    memcpy(&bits, &value, sizeof bits);
    return (uint16_t)(bits >> 16);
}

/* a value as the dtype stores it: rounded to bf16 and widened back, or left as it is */
static inline float as_dtype(float value, int dtype) {
    return dtype == DTYPE_BF16 ? through_bf16(value) : value;
}

static inline float load_one(const void *base, int64_t index, int dtype) {
    if (dtype == DTYPE_F32) return ((const float *)base)[index];
    return widen_bf16(((const uint16_t *)base)[index]);
}

static inline void store_one(void *base, int64_t index, float value, int dtype) {
    if (dtype == DTYPE_F32)
        ((float *)base)[index] = value;
    else
        ((uint16_t *)base)[index] = round_bf16(value);
}

/* through_bf16 of every lane, the same bit operations on vectors */
static inline vu through_bf16_bits(vf value) {
    vu bits;
    memcpy(&bits, &value, sizeof bits);
    const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    const vu quiet = (bits | 0x00400000u) & 0xffff0000u;
    const vu nan = (vu)((bits & 0x7fffffffu) > 0x7f800000u);
    return (quiet & nan) | (rounded & ~nan);
}

/* the bf16 bits of every lane, rounded as through_bf16 rounds. Where the CPU has AVX512-BF16, one
 * VCVTNEPS2BF16 instead of the bit operations: it rounds and quiets NaNs the same way (an exhaustive
 * check over all 2^32 inputs found no other difference) but flushes fp32 denormals to zero, so a
 * vector holding one (rare) takes the bit operations. */
static inline vh round_bf16_lanes(vf value) {
#ifdef __AVX512BF16__
    __m512 v;
    memcpy(&v, &value, sizeof v);
    const __m512i bits = _mm512_castps_si512(v);
    const __mmask16 denormal = _mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7f800000)) &
                               _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x7fffffff));
    if (!denormal) {
        const __m256bh half = _mm512_cvtneps_pbh(v);
        vh out;
        memcpy(&out, &half, sizeof out);
        return out;
    }
#endif
    return __builtin_convertvector(through_bf16_bits(value) >> 16, vh);
}

/* bf16 bits -> fp32 values, exactly */
static inline vf widen_lanes(vh half) {
    vf value;
#ifdef __AVX512F__ /* one instruction and a shift (the vector extension's conversion compiles to four) */
    __m256i packed;
    memcpy(&packed, &half, sizeof packed);
    const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16);
#else
    const vu bits = __builtin_convertvector(half, vu) << 16;
#endif
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline vf as_dtype_lanes(vf value, int dtype) {
    return dtype == DTYPE_F32 ? value : widen_lanes(round_bf16_lanes(value));
}

/* LANES values from base[index], widened to fp32 */
static inline vf load_lanes(const void *base, int64_t index, int dtype) {
    vf value;
    if (dtype == DTYPE_F32) {
        memcpy(&value, (const float *)base + index, sizeof value);
        return value;
    }
    vh half;
    memcpy(&half, (const uint16_t *)base + index, sizeof half);
    return widen_lanes(half);
}

/* LANES values to base[index], rounded to the dtype as store_one rounds */
static inline void store_lanes(void *base, int64_t index, vf value, int dtype) {
    if (dtype == DTYPE_F32) {
        memcpy((float *)base + index, &value, sizeof value);
        return;
    }
    const vh half = round_bf16_lanes(value);
    memcpy((uint16_t *)base + index, &half, sizeof half);
}

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

#if defined(__x86_64__) && defined(__GNUC__)
/* 1 when the CPU has AVX512-F and the OS saves the zmm state (OSXSAVE; SSE, AVX, opmask and ZMM state in
 * XCR0): what the AVX-512 kernels check before their own instructions */
static inline int avx512_usable(void) {
    unsigned eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
    if (!(ecx & (1u << 27))) return 0;
    unsigned xcr0_low, xcr0_high;
    __asm__("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    if ((xcr0_low & 0xe6u) != 0xe6u) return 0;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    return (ebx >> 16) & 1u;
}
#endif

/* The kernels one call chains (forward.c): see each file. */
int rms_norm(const void *x, int64_t x_stride, const void *weight, void *out, int64_t rows, int64_t width, float eps,
             int dtype);
void rope(const void *q, int64_t q_stride, const void *k, int64_t k_stride, const void *cos, const void *sin,
          const void *scale, void *out, int64_t rows, int64_t hq, int64_t hkv, int64_t d, int dtype);
/* amx_gemm.c */
int amx_ready(void);
void amx_pack(const uint16_t *weight, int64_t n, int64_t k, uint16_t *packed);
void amx_gemm(const uint16_t *in, int64_t rows, const uint16_t *packed, int64_t n, int64_t k, float *out,
              int64_t threads);
/* The column passes of a packed product (amx_gemm.c, dpbf16_gemm.c: bf16 rows; fma32_gemm.c: fp32 rows;
 * int8_gemm.c: quantized rows):
 * every row against the passes g0..g1-1 of the packed weight's columns */
typedef void (*column_passes)(const void *in, int64_t rows, const void *packed, int64_t n, int64_t k, float *out,
                              int64_t g0, int64_t g1);
/* forward.c: `passes` shared out among up to `threads` threads (four passes at least each for fewer than
 * four rows, one from four rows) */
void run_passes(column_passes columns, const void *in, int64_t rows, const void *packed, int64_t n, int64_t k,
                float *out, int64_t passes, int64_t threads);
/* Defines `name`, the column_passes of a packed kernel (dpbf16_gemm.c, fma32_gemm.c) whose inlined
 * block(a, k, b, stride, out, n, rows) multiplies 1..ROWS rows of elem_t (ROWS 4) against the COLUMNS
 * vectors of 16 columns of one pass (b: the first vector's packed weight, stride = k * 16 elements
 * between vectors): every row over the passes g0..g1-1, whole blocks of rows and then the rest, each
 * block called with a constant row count so that its sums stay in registers. A pass's weights stay
 * in cache while every block of rows takes them. */
#define FOUR_ROW_PASSES(name, target, elem_t)                                                                \
    _Static_assert(ROWS == 4, "the row blocks below are written for four rows");                            \
    target static void name(const void *input, int64_t rows, const void *weight, int64_t n, int64_t k,      \
                            float *out, int64_t g0, int64_t g1) {                                           \
        const elem_t *in = input, *packed = weight;                                                         \
        const int64_t stride = k * 16;                                                                      \
        for (int64_t g = g0; g < g1; g++) {                                                                 \
            const elem_t *b = packed + g * COLUMNS * stride;                                                \
            float *c = out + g * COLUMNS * 16;                                                              \
            int64_t r = 0;                                                                                  \
            for (; r + ROWS <= rows; r += ROWS) block(in + r * k, k, b, stride, c + r * n, n, ROWS);        \
            switch (rows - r) {                                                                             \
            case 3: block(in + r * k, k, b, stride, c + r * n, n, 3); break;                                \
            case 2: block(in + r * k, k, b, stride, c + r * n, n, 2); break;                                \
            case 1: block(in + r * k, k, b, stride, c + r * n, n, 1); break;                                \
            default: break;                                                                                 \
            }                                                                                               \
        }                                                                                                   \
    }
/* dpbf16_gemm.c: the same contract on AVX512-BF16 dot products, for CPUs without AMX */
int dpbf16_ready(void);
void dpbf16_pack(const uint16_t *weight, int64_t n, int64_t k, uint16_t *packed);
void dpbf16_gemm(const uint16_t *in, int64_t rows, const uint16_t *packed, int64_t n, int64_t k, float *out,
                 int64_t threads);
/* fma32_gemm.c: the same contract for fp32 rows and weights, on AVX-512 FMA */
int fma32_ready(void);
void fma32_pack(const float *weight, int64_t n, int64_t k, float *packed);
void fma32_gemm(const float *in, int64_t rows, const float *packed, int64_t n, int64_t k, float *out,
                int64_t threads);
/* int8_gemm.c: approximate int8 products for speculative drafts, on AVX512-VNNI */
int int8_ready(void);
int64_t int8_packed_bytes(int64_t n, int64_t k);
int64_t int8_work_bytes(int64_t rows, int64_t k);
void int8_pack(const float *weight, int64_t n, int64_t k, int8_t *packed);
void int8_gemm(const void *in, int dtype, int64_t rows, const int8_t *packed, int64_t n, int64_t k, float *out,
               int64_t threads, uint8_t *work);
int segment_attention(const void *q, int64_t q_stride, const void *k, int64_t k_stride, const void *v,
                      int64_t v_stride, const void *k_cache, const void *v_cache, void *out, int64_t hq, int64_t hkv,
                      int64_t d, int64_t n_segments, const int64_t *segments, const int64_t *slots,
                      int64_t slot_stride, float scale, int dtype, int64_t threads);

#endif
