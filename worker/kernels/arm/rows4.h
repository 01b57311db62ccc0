/* The 4-row inner loops of the quantized products, written once for both compile units:
 * matmul.c and dotprod.c each define, before including this file,
 *   ROWS4(name)      the function name with its suffix (name##_neon, name##_dotprod)
 *   block_int8(w, x0, x1)  int32x4_t whose lanes sum to the 32 products of int8 weights w[0..31]
 *                          with activations x0 (0..15) and x1 (16..31)
 *   block_int4(w, x0, x1)  the same for the 16 bytes of an edgellm int4 block, each weight
 *                          taken as 16 * (q - 8)
 * quant.h says what the loops compute. */

/* Lane r: the sum of the 4 lanes of a<r> (the 4 rows' block sums side by side). */
static inline int32x4_t reduce4(int32x4_t a0, int32x4_t a1, int32x4_t a2, int32x4_t a3) {
    return vpaddq_s32(vpaddq_s32(a0, a1), vpaddq_s32(a2, a3));
}

void ROWS4(int8_rows4)(const int8_t *const rows[4], const int8_t *xq, const float *xd, int64_t blocks,
                       float out[4]) {
    const int8_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
    float32x4_t acc = vdupq_n_f32(0.0f); /* lane r: row r */
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t o = b * QBLOCK;
        const int8x16_t x0 = vld1q_s8(xq + o), x1 = vld1q_s8(xq + o + 16);
        const int32x4_t sums = reduce4(block_int8(r0 + o, x0, x1), block_int8(r1 + o, x0, x1),
                                       block_int8(r2 + o, x0, x1), block_int8(r3 + o, x0, x1));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(sums), xd[b]);
    }
    vst1q_f32(out, acc);
}

void ROWS4(int4_rows4)(const uint8_t *const rows[4], const uint16_t *const sz[4], const int8_t *xq,
                       const float *xd, const float *xsum, int64_t groups, int64_t blocks_per_group, float out[4]) {
    const uint8_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
    float32x4_t acc = vdupq_n_f32(0.0f); /* lane r: row r */
    int64_t b = 0;
    for (int64_t j = 0; j < groups; j++) {
        /* the 4 rows' (scale, zero) bf16 pairs as 32-bit lanes: scale in the low half, zero in the high */
        uint32_t pairs[4];
        for (int r = 0; r < 4; r++) memcpy(&pairs[r], sz[r] + 2 * j, sizeof(uint32_t));
        const uint32x4_t p = vld1q_u32(pairs);
        const float32x4_t scale = vreinterpretq_f32_u32(vshlq_n_u32(p, 16));
        const float32x4_t zero = vreinterpretq_f32_u32(vandq_u32(p, vdupq_n_u32(0xffff0000u)));
        acc = vfmaq_n_f32(acc, zero, xsum[j]);
        for (const int64_t end = b + blocks_per_group; b < end; b++) {
            const int8x16_t x0 = vld1q_s8(xq + b * QBLOCK), x1 = vld1q_s8(xq + b * QBLOCK + 16);
            const int64_t o = b * (QBLOCK / 2);
            const int32x4_t sums = reduce4(block_int4(r0 + o, x0, x1), block_int4(r1 + o, x0, x1),
                                           block_int4(r2 + o, x0, x1), block_int4(r3 + o, x0, x1));
            /* sums are of 16 * (q - 8) * xq: converted as fixed point with 4 fraction bits, exactly */
            acc = vfmaq_f32(acc, vcvtq_n_f32_s32(sums, 4), vmulq_n_f32(scale, xd[b]));
        }
    }
    vst1q_f32(out, acc);
}
