/* The quantized products' inner loops with the dot-product instructions (sdot: 16 int8
 * products summed into 4 int32 lanes by one instruction), for CPUs that have them (the Pi 5's
 * Cortex-A76; not the Pi 4's Cortex-A72). Compiled with -march=armv8.2-a+dotprod as its own unit
 * (worker/kernels/native.py); matmul.c calls these only where getauxval(AT_HWCAP) has HWCAP_ASIMDDP. */
#include <arm_neon.h>
#include <stdint.h>
#include <string.h>

#include "quant.h"

#define ROWS4(name) name##_dotprod

static inline int32x4_t block_int8(const int8_t *w, int8x16_t x0, int8x16_t x1) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), vld1q_s8(w), x0), vld1q_s8(w + 16), x1);
}

/* 16 * (q - 8) of the low nibbles (weights 0..15) and of the high ones (16..31): with each
 * nibble's top bit flipped (q ^ 8), a nibble read as a signed 4-bit number is q - 8; shifted into
 * (or masked in) the top of a byte, that byte read as int8 is 16 * (q - 8). */
static inline int32x4_t block_int4(const uint8_t *w, int8x16_t x0, int8x16_t x1) {
    const uint8x16_t t = veorq_u8(vld1q_u8(w), vdupq_n_u8(0x88));
    const int8x16_t lo = vreinterpretq_s8_u8(vshlq_n_u8(t, 4)), hi = vreinterpretq_s8_u8(vandq_u8(t, vdupq_n_u8(0xf0)));
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, x0), hi, x1);
}

#include "rows4.h"
