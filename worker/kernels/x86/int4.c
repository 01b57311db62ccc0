/* int4 products (int4_gemm): y (m, n) = x (m, k) @ dequant(w).T, reading the edgellm int4 format
 * as it lies in a shard's buffer (worker/kernels/quant.py defines it):
 *   w   uint8 (n, k/2), per row k/32 blocks of 16 bytes; byte i of block b holds input 32b+i in
 *       its low nibble and input 32b+16+i in its high nibble (ggml Q4_0's order);
 *   sz  bfloat16 (n, k/g, 2): (scale, zero) of row r, group j; w[r, c] = (q - 8) * scale + zero.
 * x and y are float32, row-major. k is a multiple of g, and g of 32.
 *
 * Activations are quantized to int8 per 32-input block first (Q8_0 / distributed-llama's Q80:
 * xq = round(x / d), d = max|x| / 127), and each block of 32 weights is one integer dot product
 * (vpmaddubsw: unsigned nibble times signed int8, vpmaddwd: pairs to int32), converted to float
 * and scaled by d once. In floats per group j of row r:
 *   sum_c x[c] w[r, c] = scale_j * sum_b d_b * isum_b + (zero_j - 8 scale_j) * X_j
 * where isum_b = sum q * xq over block b of the group and X_j = sum_b d_b * sum(xq over b), the
 * group's sum of the quantized x (computed once per row of x). The activations' rounding (half a
 * step, d/2, per input) is the one error beside fp32 summation; tests bound it.
 *
 * Built with matmul.c by worker/kernels/native.py (x86-64 with AVX2 and FMA). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "../common.h"
#include "avx2.h"

#define Q4_PREFETCH 4096            /* bytes ahead on a block's weight rows */

/* 16 bytes of a weight block as 32 nibbles in input order: low nibbles (inputs 0-15) in the low
 * lane, high nibbles (16-31) in the high lane. */
static inline __m256i q4_nibbles(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

/* ROWS weight rows (row stride k/2 bytes) against one quantized row of x: out[r] = sum_c x w.
 * Inlined with a constant ROWS (1 or 4) so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void q4_rows(const uint8_t *w, const uint16_t *sz, int k, int g,
                                                          const int8_t *xq, const float *d, const float *xg,
                                                          int rows, int prefetch, float *out) {
    const int half = k / 2, groups = k / g, per_group = g / QBLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    float c[4];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps(), c[r] = 0.0f;
    for (int j = 0; j < groups; j++) {
        __m256 accg[4];
        for (int r = 0; r < rows; r++) accg[r] = _mm256_setzero_ps();
        for (int t = 0; t < per_group; t++) {
            const int b = j * per_group + t;
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + QBLOCK * b));
            const __m256 db = _mm256_set1_ps(d[b]);
            for (int r = 0; r < rows; r++) {
                const uint8_t *p = w + (int64_t)r * half + 16 * b;
                if (prefetch && (b & 3) == 0) _mm_prefetch((const char *)p + Q4_PREFETCH, _MM_HINT_T0);
                const __m256i prod = _mm256_madd_epi16(_mm256_maddubs_epi16(q4_nibbles(p), xv), ones);
                accg[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), db, accg[r]);
            }
        }
        for (int r = 0; r < rows; r++) {
            const float scale = bf16_to_float(sz[((int64_t)r * groups + j) * 2]);
            const float zero = bf16_to_float(sz[((int64_t)r * groups + j) * 2 + 1]);
            acc[r] = _mm256_fmadd_ps(accg[r], _mm256_set1_ps(scale), acc[r]);
            c[r] += (zero - 8.0f * scale) * xg[j];
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum8(acc[r]) + c[r];
}

/* Two weight rows against two quantized rows of x (i0, i1): each block's nibbles are unpacked
 * once for both rows of x. Two by two so that the 4 group and 4 row accumulators, both x
 * blocks and the constants fit AVX2's 16 registers. out[i][r]. Against rows of x one at a time
 * through q4_rows (same bits), 1 thread, ms per matrix, shared and loaded machine (min of 9):
 * 3072x512 2 rows 0.137 / 0.168, 8 rows 1.78 / 2.36; 2048x5632 2 rows 4.05 / 4.23, 8 rows
 * 18.2 / 23.9. */
static void q4_two_by_two(const uint8_t *w, const uint16_t *sz, int k, int g, const int8_t *xq0,
                          const int8_t *xq1, const float *d0, const float *d1, const float *xg0,
                          const float *xg1, float out[2][2]) {
    const int half = k / 2, groups = k / g, per_group = g / QBLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc00 = _mm256_setzero_ps(), acc01 = acc00, acc10 = acc00, acc11 = acc00;
    float c[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    for (int j = 0; j < groups; j++) {
        __m256 g00 = _mm256_setzero_ps(), g01 = g00, g10 = g00, g11 = g00;
        for (int t = 0; t < per_group; t++) {
            const int b = j * per_group + t;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq0 + QBLOCK * b));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq1 + QBLOCK * b));
            const __m256 e0 = _mm256_set1_ps(d0[b]), e1 = _mm256_set1_ps(d1[b]);
            const __m256i q0 = q4_nibbles(w + 16 * b), q1 = q4_nibbles(w + half + 16 * b);
            g00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q0, x0), ones)), e0, g00);
            g01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q1, x0), ones)), e0, g01);
            g10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q0, x1), ones)), e1, g10);
            g11 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q1, x1), ones)), e1, g11);
        }
        const float s0 = bf16_to_float(sz[2 * j]), z0 = bf16_to_float(sz[2 * j + 1]);
        const float s1 = bf16_to_float(sz[2 * (groups + j)]), z1 = bf16_to_float(sz[2 * (groups + j) + 1]);
        const __m256 v0 = _mm256_set1_ps(s0), v1 = _mm256_set1_ps(s1);
        acc00 = _mm256_fmadd_ps(g00, v0, acc00), acc01 = _mm256_fmadd_ps(g01, v1, acc01);
        acc10 = _mm256_fmadd_ps(g10, v0, acc10), acc11 = _mm256_fmadd_ps(g11, v1, acc11);
        c[0][0] += (z0 - 8.0f * s0) * xg0[j], c[0][1] += (z1 - 8.0f * s1) * xg0[j];
        c[1][0] += (z0 - 8.0f * s0) * xg1[j], c[1][1] += (z1 - 8.0f * s1) * xg1[j];
    }
    out[0][0] = hsum8(acc00) + c[0][0], out[0][1] = hsum8(acc01) + c[0][1];
    out[1][0] = hsum8(acc10) + c[1][0], out[1][1] = hsum8(acc11) + c[1][1];
}

/* y (m, n) = x (m, k) @ dequant(w).T (the header says how). x is quantized once, then every
 * 4-row block of w is read from memory once for all m rows of x (the first row or pair streams
 * it, the others find it in L1/L2), the blocks split across threads. */
void int4_gemm(const uint8_t *w, const uint16_t *sz, const float *x, float *y, int m, int n, int k, int g,
               int threads) {
    const int nb = k / QBLOCK, groups = k / g;
    int8_t *xq = malloc((size_t)m * k);
    float *d = malloc(sizeof(float) * (size_t)m * nb), *xg = malloc(sizeof(float) * (size_t)m * groups);
    for (int i = 0; i < m; i++)
        quantize_row_q8(x + (int64_t)i * k, k, g, xq + (int64_t)i * k, d + (int64_t)i * nb, xg + (int64_t)i * groups);
    const int blocks = n / 4;
    if (threads > 1 && blocks < MIN_BLOCKS_PER_THREAD * threads) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
        const uint8_t *w0 = w + (int64_t)4 * blk * (k / 2);
        const uint16_t *s0 = sz + (int64_t)4 * blk * groups * 2;
        int i = 0;
        if (m % 2) { /* an odd row first: it streams the block in with a software prefetch */
            float out[4];
            q4_rows(w0, s0, k, g, xq, d, xg, 4, 1, out);
            for (int r = 0; r < 4; r++) y[4 * blk + r] = out[r];
            i = 1;
        }
        for (; i < m; i += 2) /* pairs of rows of x against the block's two pairs of rows */
            for (int h = 0; h < 4; h += 2) {
                float out[2][2];
                q4_two_by_two(w0 + (int64_t)h * (k / 2), s0 + (int64_t)h * groups * 2, k, g, xq + (int64_t)i * k,
                              xq + (int64_t)(i + 1) * k, d + (int64_t)i * nb, d + (int64_t)(i + 1) * nb,
                              xg + (int64_t)i * groups, xg + (int64_t)(i + 1) * groups, out);
                for (int a = 0; a < 2; a++)
                    for (int r = 0; r < 2; r++) y[(int64_t)(i + a) * n + 4 * blk + h + r] = out[a][r];
            }
    }
    for (int r = 4 * blocks; r < n; r++)
        for (int i = 0; i < m; i++)
            q4_rows(w + (int64_t)r * (k / 2), sz + (int64_t)r * groups * 2, k, g, xq + (int64_t)i * k,
                    d + (int64_t)i * nb, xg + (int64_t)i * groups, 1, 0, y + (int64_t)i * n + r);
    free(xq);
    free(d);
    free(xg);
}

/* The same product with fp32 activations throughout: each block of 32 weights is converted to
 * floats and multiplied by x with FMAs (no activation rounding; more work per weight). For
 * measuring against int4_gemm (bench/int4_kernels.py); X_j is then the exact group sum of x. */
static inline __attribute__((always_inline)) void q4f_rows(const uint8_t *w, const uint16_t *sz, int k, int g,
                                                           const float *x, const float *xg, int rows,
                                                           int prefetch, float *out) {
    const int half = k / 2, groups = k / g, per_group = g / QBLOCK;
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m256 acc[4];
    float c[4];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps(), c[r] = 0.0f;
    for (int j = 0; j < groups; j++) {
        __m256 accg[4];
        for (int r = 0; r < rows; r++) accg[r] = _mm256_setzero_ps();
        for (int t = 0; t < per_group; t++) {
            const int b = j * per_group + t;
            const float *xb = x + QBLOCK * b;
            const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
            const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
            for (int r = 0; r < rows; r++) {
                const uint8_t *p = w + (int64_t)r * half + 16 * b;
                if (prefetch && (b & 3) == 0) _mm_prefetch((const char *)p + Q4_PREFETCH, _MM_HINT_T0);
                const __m128i v = _mm_loadu_si128((const __m128i *)p);
                const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
                __m256 a = accg[r];
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), x0, a);
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), x1, a);
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), x2, a);
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), x3, a);
                accg[r] = a;
            }
        }
        for (int r = 0; r < rows; r++) {
            const float scale = bf16_to_float(sz[((int64_t)r * groups + j) * 2]);
            const float zero = bf16_to_float(sz[((int64_t)r * groups + j) * 2 + 1]);
            acc[r] = _mm256_fmadd_ps(accg[r], _mm256_set1_ps(scale), acc[r]);
            c[r] += (zero - 8.0f * scale) * xg[j];
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum8(acc[r]) + c[r];
}

void int4_gemm_f32(const uint8_t *w, const uint16_t *sz, const float *x, float *y, int m, int n, int k, int g,
                   int threads) {
    const int groups = k / g;
    float *xg = malloc(sizeof(float) * (size_t)m * groups);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < groups; j++) {
            float s = 0.0f;
            for (int c = 0; c < g; c++) s += x[(int64_t)i * k + j * g + c];
            xg[i * groups + j] = s;
        }
    const int blocks = n / 4;
    if (threads > 1 && blocks < MIN_BLOCKS_PER_THREAD * threads) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
        const uint8_t *w0 = w + (int64_t)4 * blk * (k / 2);
        const uint16_t *s0 = sz + (int64_t)4 * blk * groups * 2;
        for (int i = 0; i < m; i++) {
            float out[4];
            q4f_rows(w0, s0, k, g, x + (int64_t)i * k, xg + (int64_t)i * groups, 4, i == 0, out);
            for (int r = 0; r < 4; r++) y[(int64_t)i * n + 4 * blk + r] = out[r];
        }
    }
    for (int r = 4 * blocks; r < n; r++)
        for (int i = 0; i < m; i++)
            q4f_rows(w + (int64_t)r * (k / 2), sz + (int64_t)r * groups * 2, k, g, x + (int64_t)i * k,
                     xg + (int64_t)i * groups, 1, 0, y + (int64_t)i * n + r);
    free(xg);
}
