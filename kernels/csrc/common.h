/* What the native CPU kernels share: bf16 widening and rounding, and the vector types. */
#ifndef TRISERVE_COMMON_H
#define TRISERVE_COMMON_H

#include <stdint.h>
#include <string.h>

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

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

#endif
