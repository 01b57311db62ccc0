/* Scalar helpers that every ISA's kernels share (x86/ and arm/ include this): bfloat16
 * conversions, the float dot product of the leftover rows and columns, and RoPE of one head. */
#ifndef EDGELLM_KERNELS_COMMON_H
#define EDGELLM_KERNELS_COMMON_H

#include <stdint.h>

/* A bfloat16 as a float (a bf16 is the top half of a float32). */
static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* A float rounded to the nearest bfloat16, ties to even (what torch's .bfloat16() does; NaN
 * stays NaN). */
static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* One float row against x over k columns: the weight rows and columns a vector block leaves over. */
static inline float dot_floats(const float *row, const float *x, int64_t k) {
    float sum = 0.0f;
    for (int64_t c = 0; c < k; c++) sum += row[c] * x[c];
    return sum;
}

/* Rotate-half RoPE of one head x (hd,) at a position whose cos and signed sin rows (-sin on the
 * first half, as worker/models/llama.py's rope_table builds them) are given: out = x * cos +
 * roll(x, hd / 2) * signed_sin. */
static inline void rope_head(const float *x, const float *cos, const float *signed_sin, int hd, float *out) {
    const int half = hd / 2;
    for (int j = 0; j < hd; j++) out[j] = x[j] * cos[j] + x[j < half ? j + half : j - half] * signed_sin[j];
}

#endif
