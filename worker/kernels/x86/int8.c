/* int8 products (int8_gemm): y[i, n] = scale[n] * sum_k x[i, k] * w[n, k], int8 weights (N, K)
 * row-major as they lie in a shard's buffer, bf16 per-row scales, float32 x (M, K) and y (M, N).
 *
 * Fewer than Q8_MAX_ROWS rows of x (decode, batches): the activations are quantized to int8 per
 * 32-input block first (avx2.h's quantize_row_q8: Q8_0 / distributed-llama's Q80, as int4.c
 * and the aarch64 kernels do), and each block of 32 weights is one integer dot product, signed
 * times signed through vpmaddubsw's unsigned x signed with the usual sign trick:
 * maddubs(|w|, sign(xq, w)) (|w| <= 128, |xq| <= 127: a pair's sum fits int16), vpmaddwd to
 * int32, converted to float and scaled by the block's d once. The one error beside fp32
 * summation is the activations' rounding, at most d/2 per input (d = max|x| / 127 of its block);
 * tests/test_native.py bounds it. Why: matmul.c's fp32 path converts every weight to float
 * (sign-extend, convert, FMA: 3 µops per 8 weights) and ran 15-20 GB/s a thread with the weights
 * in cache; this spends about 7 µops per 32. Measured on a shared 2-core AMD EPYC VM, GB/s of
 * weights, one matrix hot in cache, best of 5 x 200 calls, this / fp32 path: 1 row, 1 thread
 * 1024x512 22.4 / 17.6, 512x1536 27.2 / 19.9, 2048x2048 34.7 / 23.4 (1.27-1.48x); 2 threads
 * 35.7 / 28.8 to 63.9 / 44.8 (1.24-1.43x); 2-8 rows 1.09-1.17x. Cold (bench/int4_kernels.py,
 * every matrix read from L3/DRAM) 1 row gains 0-5%: memory bounds it there. End to end
 * (bench/native_step.py, small int8 model, 6 interleaved pairs) 1.28x (1 rank) and 1.25x (2
 * ranks) median of the pairs' ratios, on a machine loaded by other work.
 *
 * From Q8_MAX_ROWS rows on (prompts): int8_gemm_f32 (matmul.c: fp32 activations, each block
 * converted to floats once for all rows, FMA-bound). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "../common.h"
#include "avx2.h"

#define Q8_MAX_ROWS 12
#define Q8_PREFETCH 8192 /* bytes ahead on the 4-row block stream (matmul.c measured 3-16 KB alike) */

void int8_gemm_f32(const int8_t *w, const uint16_t *scales, const float *x, float *y, int m, int n, int k,
                   int threads);

/* ROWS weight rows (row stride k) against one quantized row of x over its `full` whole blocks:
 * out[r] = sum_b d[b] * sum_{i<32} w[r, 32b + i] * xq[32b + i]. Inlined with a constant ROWS (1
 * or 4) so that the accumulators stay in registers. prefetch: read the block stream (ROWS
 * consecutive rows: 4k contiguous bytes) ahead in software. */
static inline __attribute__((always_inline)) void q8_rows(const int8_t *w, int64_t k, const int8_t *xq,
                                                          const float *d, int full, int rows, int prefetch,
                                                          float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < full; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + QBLOCK * b));
        const __m256 db = _mm256_set1_ps(d[b]);
        if (prefetch) { /* 4 rows x 32 bytes consumed a step: two lines of the block stream */
            _mm_prefetch((const char *)(w + 4 * QBLOCK * b) + Q8_PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(w + 4 * QBLOCK * b) + Q8_PREFETCH + 64, _MM_HINT_T0);
        }
        for (int r = 0; r < rows; r++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * k + QBLOCK * b));
            const __m256i prod = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), db, acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum8(acc[r]);
}

/* Row r of w (stride k) against quantized x over the columns [32 full, k) a partial last block
 * holds: d of that block times the exact integer sum. */
static inline float q8_tail(const int8_t *row, int k, const int8_t *xq, const float *d, int full) {
    int32_t sum = 0;
    for (int c = QBLOCK * full; c < k; c++) sum += row[c] * xq[c];
    return QBLOCK * full < k ? d[full] * (float)sum : 0.0f;
}

/* y (m, n) = x (m, k) @ (w * scales[:, None]).T (the header says how). x is quantized once, then
 * every 4-row block of w is read from memory once for all m rows of x (the first row streams it
 * with prefetch, the others find it in L1/L2), the blocks split across threads, each output
 * summed by one thread (the same bits at any thread count). */
void int8_gemm(const int8_t *w, const uint16_t *scales, const float *x, float *y, int m, int n, int k,
               int threads) {
    if (m >= Q8_MAX_ROWS) {
        int8_gemm_f32(w, scales, x, y, m, n, k, threads);
        return;
    }
    const int nb = (k + QBLOCK - 1) / QBLOCK, full = k / QBLOCK;
    int8_t *xq = malloc((size_t)m * nb * QBLOCK);
    float *d = malloc(sizeof(float) * (size_t)m * nb);
    if (xq == NULL || d == NULL) abort();
    for (int i = 0; i < m; i++)
        quantize_row_q8(x + (int64_t)i * k, k, QBLOCK, xq + (int64_t)i * nb * QBLOCK, d + (int64_t)i * nb, NULL);
    const int blocks = n / 4;
    if (threads > 1 && blocks < MIN_BLOCKS_PER_THREAD * threads) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int8_t *r0 = w + (int64_t)4 * b * k;
        for (int i = 0; i < m; i++) {
            const int8_t *xqi = xq + (int64_t)i * nb * QBLOCK;
            const float *di = d + (int64_t)i * nb;
            float out[4];
            q8_rows(r0, k, xqi, di, full, 4, i == 0, out);
            for (int r = 0; r < 4; r++)
                y[(int64_t)i * n + 4 * b + r] =
                    (out[r] + q8_tail(r0 + (int64_t)r * k, k, xqi, di, full)) * bf16_to_float(scales[4 * b + r]);
        }
    }
    for (int r = 4 * blocks; r < n; r++)
        for (int i = 0; i < m; i++) {
            const int8_t *xqi = xq + (int64_t)i * nb * QBLOCK;
            const float *di = d + (int64_t)i * nb;
            float out;
            q8_rows(w + (int64_t)r * k, k, xqi, di, full, 1, 0, &out);
            y[(int64_t)i * n + r] = (out + q8_tail(w + (int64_t)r * k, k, xqi, di, full)) * bf16_to_float(scales[r]);
        }
    free(xq);
    free(d);
}
