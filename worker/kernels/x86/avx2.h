/* What the AVX2 kernels of this directory share: a horizontal sum, and the quantization of
 * activations to int8 per 32-input block (Q8_0 / distributed-llama's Q80) that the int8 and int4
 * products (int8.c, int4.c) run their integer dot products on. */
#ifndef EDGELLM_X86_AVX2_H
#define EDGELLM_X86_AVX2_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define QBLOCK 32                /* activations per quantization block */
#define MIN_BLOCKS_PER_THREAD 16 /* 4-row weight blocks below which a second thread costs more than it saves */

/* The sum of the 8 floats of v. */
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* One block of 32 floats xb as int8 q (32): d = max|x| / 127, q = round-half-even(x * (127 /
 * max|x|)) (0 for an all-zero block). Returns d; *isum is the sum of q. */
static inline float quantize_block_q8(const float *xb, int8_t *q, int *isum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], m = _mm256_setzero_ps();
    for (int t = 0; t < 4; t++) {
        v[t] = _mm256_loadu_ps(xb + 8 * t);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[t]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float mx = _mm_cvtss_f32(h);
    const float db = mx / 127.0f;
    const __m256 inv = _mm256_set1_ps(db > 0.0f ? 127.0f / mx : 0.0f);
    __m256i ints[4];
    for (int t = 0; t < 4; t++)
        ints[t] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[t], inv),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    /* int32 x 32 -> int8 x 32 in order (packs interleave 128-bit lanes; the permute undoes it) */
    const __m256i s01 = _mm256_packs_epi32(ints[0], ints[1]), s23 = _mm256_packs_epi32(ints[2], ints[3]);
    const __m256i s = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(s01, s23),
                                                  _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, s);
    const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *isum = _mm_cvtsi128_si32(s4);
    return db;
}

/* Row x (k floats) as int8 blocks: xq (ceil(k/32) * 32 bytes) and d (ceil(k/32)); a last block
 * of fewer than 32 inputs is quantized as if padded with zeros (its d is the max of the inputs it
 * has). With xg (int4: k a multiple of g, g of 32), per group of g also X (k/g) = sum d * xq. */
static inline void quantize_row_q8(const float *x, int k, int g, int8_t *xq, float *d, float *xg) {
    const int blocks = (k + QBLOCK - 1) / QBLOCK;
    for (int b = 0; b < blocks; b++) {
        float pad[QBLOCK];
        const float *xb = x + QBLOCK * b;
        if (QBLOCK * (b + 1) > k) { /* the partial last block */
            memset(pad, 0, sizeof pad);
            memcpy(pad, xb, sizeof(float) * (size_t)(k - QBLOCK * b));
            xb = pad;
        }
        int isum;
        d[b] = quantize_block_q8(xb, xq + QBLOCK * b, &isum);
        if (xg == NULL) continue;
        const int j = QBLOCK * b / g;
        if (QBLOCK * b % g == 0) xg[j] = 0.0f;
        xg[j] += d[b] * (float)isum;
    }
}

#endif
