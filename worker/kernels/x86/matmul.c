/* Matrix products for decode: int8 weights with fp32 activations (int8_gemm_f32: y[i, n] =
 * scale[n] * sum_k x[i, k] * w[n, k]; int8.c's int8_gemm runs it from Q8_MAX_ROWS rows of x on and
 * int8-quantized activations below) and float32 weights for few rows (f32_gemm, at the end).
 *
 * Built and loaded by worker/kernels/native.py (x86-64 with AVX2 and FMA; see its docstring for why).
 * The weights are a shard's int8 matrix (N, K), row-major, as it lies in its buffer; scales are
 * the shard's bfloat16 per-row scales; x (M, K) and y (M, N) are float32. Products are summed in
 * fp32 with fp32 activations: no bf16 rounding of x, unlike torch's _weight_int8pack_mm.
 *
 * Why it is faster than _weight_int8pack_mm at decode: a step reads every weight once from
 * DRAM, and that kernel issues no prefetch, so a core waits on each 512-byte row. Here a block of
 * 4 rows (4K contiguous bytes) is read as one stream with a software prefetch PREFETCH bytes
 * ahead, which keeps enough cache-line fills in flight to roughly double the bandwidth; and each
 * block is read once for all M rows of x (a batch of decode rows, a prompt). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "../common.h"
#include "avx2.h"

/* Bytes ahead on the block stream. 2 threads, int8, 1 row, cold: the 512x8 shape's matrices read
 * 14-17 GB/s with anything from 3 to 16 KB (1 KB was slower); the 1.1B shape's (11264x2048 and
 * 2048x5632) 24 GB/s at 3 KB, 26-30 at 6-12 KB. */
#define PREFETCH 8192
/* Rows of x from which a block is converted to floats once (int8_gemm). Measured on the 512x8
 * shape's matrices, ms for 8 layers, scratch / pairs: 4 rows 5.6 / 3.3, 8 rows 7.8 / 6.4,
 * 12 rows 9.4-10.4 / 8.8-10.2, 16 rows 7.6-12.0 / 9.7-11.6, 32 rows 15.5-18.6 / 22.7-24.3,
 * 64 rows 37 / 49-51, 128 rows 71-75 / 100-104. */
#define SCRATCH_MIN_ROWS 12

/* 8 int8 weights at p, as the low 8 bytes of a vector. The sign extension that follows reads
 * them straight from memory (vpmovsxbd ymm, m64): one 16-byte load split with an unpack cost a
 * shuffle per 8 weights, and this loop is bound by its conversion µops (int8 in cache: 10-12
 * GB/s a thread that way, 15-20 this way). */
static inline __m128i load8(const int8_t *p) { return _mm_loadl_epi64((const __m128i *)p); }

/* 8 int8 weights (the low 8 bytes of v) times 8 floats of x, added to acc. */
static inline __m256 fma8(__m128i v, __m256 x, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), x, acc);
}

/* One row, for the N % 4 rows a 4-row block leaves over. */
static float dot_row(const int8_t *row, const float *x, int k_end) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= k_end; k += 8)
        acc = fma8(load8(row + k), _mm256_loadu_ps(x + k), acc);
    float sum = hsum8(acc);
    for (; k < k_end; k++) sum += row[k] * x[k];
    return sum;
}

/* Rows x0 and x1 of x against the 4-row block at r0 (row stride k), 16 columns a step: each
 * weight is converted to float once and used for both rows of x. */
static void block_two_rows(const int8_t *r0, int k, const float *x0, const float *x1, int prefetch,
                           float out[2][4]) {
    const int8_t *rows[4] = {r0, r0 + k, r0 + 2 * k, r0 + 3 * k};
    __m256 a[2][4];
    for (int r = 0; r < 4; r++) a[0][r] = a[1][r] = _mm256_setzero_ps();
    const int k16 = k - k % 16;
    for (int c = 0; c < k16; c += 16) {
        if (prefetch) _mm_prefetch((const char *)(r0 + 4 * c + PREFETCH), _MM_HINT_T0);
        const __m256 x0lo = _mm256_loadu_ps(x0 + c), x0hi = _mm256_loadu_ps(x0 + c + 8);
        const __m256 x1lo = _mm256_loadu_ps(x1 + c), x1hi = _mm256_loadu_ps(x1 + c + 8);
        for (int r = 0; r < 4; r++) {
            const __m256 wlo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(rows[r] + c)));
            const __m256 whi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(rows[r] + c + 8)));
            a[0][r] = _mm256_fmadd_ps(whi, x0hi, _mm256_fmadd_ps(wlo, x0lo, a[0][r]));
            a[1][r] = _mm256_fmadd_ps(whi, x1hi, _mm256_fmadd_ps(wlo, x1lo, a[1][r]));
        }
    }
    for (int r = 0; r < 4; r++) {
        out[0][r] = hsum8(a[0][r]) + dot_row(rows[r] + k16, x0 + k16, k - k16);
        out[1][r] = hsum8(a[1][r]) + dot_row(rows[r] + k16, x1 + k16, k - k16);
    }
}

/* One row of x against the 4-row block at r0, prefetching the weight stream ahead (the block
 * is 4k contiguous bytes; 64 of them are consumed per step, and the prefetch runs on into the
 * next blocks). */
static void block_one_row(const int8_t *r0, int k, const float *x, float out[4]) {
    const int8_t *r1 = r0 + k, *r2 = r1 + k, *r3 = r2 + k;
    /* lo: columns c..c+7 of each 16, hi: c+8..c+15, per row */
    __m256 lo0 = _mm256_setzero_ps(), lo1 = lo0, lo2 = lo0, lo3 = lo0;
    __m256 hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0;
    const int k16 = k - k % 16;
    for (int c = 0; c < k16; c += 16) {
        _mm_prefetch((const char *)(r0 + 4 * c + PREFETCH), _MM_HINT_T0);
        const __m256 xlo = _mm256_loadu_ps(x + c), xhi = _mm256_loadu_ps(x + c + 8);
        lo0 = fma8(load8(r0 + c), xlo, lo0), hi0 = fma8(load8(r0 + c + 8), xhi, hi0);
        lo1 = fma8(load8(r1 + c), xlo, lo1), hi1 = fma8(load8(r1 + c + 8), xhi, hi1);
        lo2 = fma8(load8(r2 + c), xlo, lo2), hi2 = fma8(load8(r2 + c + 8), xhi, hi2);
        lo3 = fma8(load8(r3 + c), xlo, lo3), hi3 = fma8(load8(r3 + c + 8), xhi, hi3);
    }
    const int tail = k - k16; /* 0 or 8 for a shard (K is a multiple of 8), anything here */
    out[0] = hsum8(_mm256_add_ps(lo0, hi0)) + dot_row(r0 + k16, x + k16, tail);
    out[1] = hsum8(_mm256_add_ps(lo1, hi1)) + dot_row(r1 + k16, x + k16, tail);
    out[2] = hsum8(_mm256_add_ps(lo2, hi2)) + dot_row(r2 + k16, x + k16, tail);
    out[3] = hsum8(_mm256_add_ps(lo3, hi3)) + dot_row(r3 + k16, x + k16, tail);
}

/* The 4 rows of a weight block as floats, 8 columns a step (k8 = k rounded down to 8). */
static void convert_block(const int8_t *r0, int k, int k8, float *buf) {
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < k8; c += 8) {
            if (c % 64 == 0) _mm_prefetch((const char *)(r0 + (int64_t)r * k + c + PREFETCH), _MM_HINT_T0);
            _mm256_store_ps(buf + (int64_t)r * k8 + c,
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(r0 + (int64_t)r * k + c)))));
        }
}

/* rows (1-3) rows of x against 4 float weight rows (row stride `stride`) over columns [0, k8):
 * rows x 4 accumulators, one float load of the weights per 8 columns and weight row, the rest
 * FMAs. Inlined with a constant row count so the accumulators stay in registers (3 x 4 + 3 of
 * x: all 16 of AVX2's). The caller adds the columns from k8 on. */
static inline __attribute__((always_inline)) void rows_against_floats(const float *block, int64_t stride, int64_t k8,
                                                                      const float *xs[3], int rows,
                                                                      float out[3][4]) {
    __m256 acc[3][4];
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm256_setzero_ps();
    for (int c = 0; c < k8; c += 8) {
        __m256 xv[3];
        for (int i = 0; i < rows; i++) xv[i] = _mm256_loadu_ps(xs[i] + c);
        for (int r = 0; r < 4; r++) {
            const __m256 wv = _mm256_loadu_ps(block + r * stride + c);
            for (int i = 0; i < rows; i++) acc[i][r] = _mm256_fmadd_ps(wv, xv[i], acc[i][r]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < 4; r++) out[i][r] = hsum8(acc[i][r]);
}

/* The same with the row count as a constant of each call (see rows_against_floats). */
static void up_to_three_rows(const float *block, int64_t stride, int64_t k8, const float *xs[3], int rows,
                             float out[3][4]) {
    if (rows == 3) rows_against_floats(block, stride, k8, xs, 3, out);
    else if (rows == 2) rows_against_floats(block, stride, k8, xs, 2, out);
    else rows_against_floats(block, stride, k8, xs, 1, out);
}

/* y (m, n) = x (m, k) @ dequant(w (n, k)).T, all row-major, every 4-row block of w read from
 * memory once for all m rows of x.
 * - Fewer than SCRATCH_MIN_ROWS rows (decode, batches): straight from int8, converting as it
 *   goes, a pair of rows at a time; the first row (or pair) streams the block in with prefetch,
 *   the rest find it in L1/L2 (a block is 4k bytes: 2-22 KB for k of 512-5632).
 * - More (prompts): the block is converted to floats once, into a per-thread scratch, and 3 rows
 *   of x at a time run against it: the conversion is paid once instead of once per pair of
 *   rows, and the loop is FMA-bound. */
void int8_gemm_f32(const int8_t *w, const uint16_t *scales, const float *x, float *y, int m, int n, int k,
                   int threads) {
    const int blocks = n / 4;
    if (threads > 1 && blocks < MIN_BLOCKS_PER_THREAD * threads) threads = 1;
    const int k8 = k - k % 8;
#pragma omp parallel num_threads(threads)
    {
        float *buf = m >= SCRATCH_MIN_ROWS ? aligned_alloc(32, ((size_t)4 * k8 * sizeof(float) + 31) / 32 * 32) : NULL;
#pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            const int8_t *r0 = w + (int64_t)4 * b * k;
            float s[4];
            for (int r = 0; r < 4; r++) s[r] = bf16_to_float(scales[4 * b + r]);
            int i = 0;
            if (buf != NULL) {
                convert_block(r0, k, k8, buf);
                for (; i < m; i += 3) {
                    const float *xs[3] = {x + (int64_t)i * k, x + (int64_t)(i + 1) * k, x + (int64_t)(i + 2) * k};
                    float out[3][4];
                    const int rows = m - i >= 3 ? 3 : m - i;
                    up_to_three_rows(buf, k8, k8, xs, rows, out);
                    for (int j = 0; j < rows; j++)
                        for (int r = 0; r < 4; r++)
                            y[(int64_t)(i + j) * n + 4 * b + r] =
                                (out[j][r] + dot_row(r0 + (int64_t)r * k + k8, xs[j] + k8, k - k8)) * s[r];
                }
                continue;
            }
            if (m % 2) { /* an odd row first */
                float out[4];
                block_one_row(r0, k, x, out);
                for (int r = 0; r < 4; r++) y[4 * b + r] = out[r] * s[r];
                i = 1;
            }
            for (; i < m; i += 2) {
                float out[2][4];
                block_two_rows(r0, k, x + (int64_t)i * k, x + (int64_t)(i + 1) * k, i == 0, out);
                for (int r = 0; r < 4; r++) {
                    y[(int64_t)i * n + 4 * b + r] = out[0][r] * s[r];
                    y[(int64_t)(i + 1) * n + 4 * b + r] = out[1][r] * s[r];
                }
            }
        }
        free(buf);
    }
    for (int r = 4 * blocks; r < n; r++)
        for (int i = 0; i < m; i++)
            y[(int64_t)i * n + r] = dot_row(w + (int64_t)r * k, x + (int64_t)i * k, k) * bf16_to_float(scales[r]);
}

/* One row of x against 8 weight rows (row stride k) over columns [0, k8): the decode case (f32_gemm).
 * Eight row streams at once rather than four: the hardware prefetcher restarts its streams at
 * every block, and a longer block (8 rows of 2048 floats: 64 KB) spends less of its time
 * ramping up. Measured with 1 row of x, interleaved rounds over every matrix of a model, GB/s
 * mean at 2 / 1 threads, 4-row blocks against 8: 1.1B shape (4.1 GB) 23.6 / 13.0 against 24.8
 * / 13.8 (faster in 22 of 30 rounds); 512x8 shape 14.7 / 8.9 against 16.5 / 9.9 (37 of 40).
 * 6 and 12 rows were in between, 16 slower. */
static void one_row_against_eight(const float *r0, int64_t k, int64_t k8, const float *x, float out[8]) {
    __m256 acc[8];
    for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
    for (int c = 0; c < k8; c += 8) {
        const __m256 xv = _mm256_loadu_ps(x + c);
        for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + r * k + c), xv, acc[r]);
    }
    for (int r = 0; r < 8; r++) out[r] = hsum8(acc[r]);
}

#define F32_VEC 8 /* floats per vector: f32_gemm's column blocks */
#include "../f32_gemm.h"


/* 8 bfloat16 values at p as floats (a bf16 is the top half of a float32). */
static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Rows x0..x(rows-1) (floats, 1-3 of them) against the bf16 weight rows r0..r0+wrows-1 (row
 * stride k) over columns [0, k8); the caller adds the columns from k8 on. Inlined with constant
 * counts so the accumulators stay in registers. prefetch (8-row blocks only): read the block
 * stream ahead in software, for rows too short for the hardware prefetcher to ramp up on. */
static inline __attribute__((always_inline)) void rows_against_bf16(const uint16_t *r0, int64_t k, int k8,
                                                                    const float *xs[3], int rows, int wrows,
                                                                    int prefetch, float out[3][8]) {
    __m256 acc[3][8];
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < wrows; r++) acc[i][r] = _mm256_setzero_ps();
    for (int c = 0; c < k8; c += 8) {
        __m256 xv[3];
        for (int i = 0; i < rows; i++) xv[i] = _mm256_loadu_ps(xs[i] + c);
        if (prefetch) { /* the block's next 128 bytes, PREFETCH ahead (8 rows of 16 bytes a step) */
            _mm_prefetch((const char *)(r0 + 8 * c) + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(r0 + 8 * c) + PREFETCH + 64, _MM_HINT_T0);
        }
        for (int r = 0; r < wrows; r++) {
            const __m256 wv = load8_bf16(r0 + r * k + c);
            for (int i = 0; i < rows; i++) acc[i][r] = _mm256_fmadd_ps(wv, xv[i], acc[i][r]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < wrows; r++) out[i][r] = hsum8(acc[i][r]);
}

/* y (m, n) = x (m, k) @ w (n, k).T with bfloat16 x, w and y, summed in float32 and rounded once,
 * as torch's bf16 matmul does, for few rows of x. Blocks as in f32_gemm: 8 weight rows for one
 * row of x (decode), else 4 rows for up to 3 rows of x at a time. Why: on this AVX2 CPU (no bf16
 * instructions) torch's bf16 F.linear read the 1.1B shape's matrices at the speed of the fp32
 * kernel, half the bytes at half the rate (one row, 2 threads, ms per matrix, torch / this:
 * 11264x2048 3.8-3.9 / 2.3-2.8, 2048x5632 1.8-2.4 / 1.0-1.6); here each weight converts with one
 * shift. x is converted to floats once (xf: m * k floats of scratch from the caller). */
void bf16_gemm(const uint16_t *w, const uint16_t *x, uint16_t *y, float *xf, int m, int n, int k, int threads) {
    for (int64_t i = 0; i < (int64_t)m * k; i++) xf[i] = bf16_to_float(x[i]);
    if (threads > 1 && n < 4 * MIN_BLOCKS_PER_THREAD * threads) threads = 1;
    const int k8 = k - k % 8;
    const int wrows = m == 1 ? 8 : 4;
    const int blocks = n / wrows;
    /* Rows of at most 2 KB: one row of x, ms per matrix at 2 threads, cold, hardware prefetch only
     * against 8 KB ahead in software: 3072x512 0.34-0.35 / 0.23-0.24, 768x512 0.10 / 0.08; the
     * 1.1B shape's rows (4 and 11 KB) were 13-25% slower with it. */
    const int short_rows = k <= 1024;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        const uint16_t *r0 = w + (int64_t)wrows * b * k;
        for (int i = 0; i < m; i += 3) {
            const int rows = m - i >= 3 ? 3 : m - i;
            const float *xs[3];
            for (int j = 0; j < 3; j++) xs[j] = xf + (int64_t)(j < rows ? i + j : i) * k;
            float out[3][8];
            if (wrows == 8) rows_against_bf16(r0, k, k8, xs, 1, 8, short_rows, out);
            else if (rows == 3) rows_against_bf16(r0, k, k8, xs, 3, 4, 0, out);
            else if (rows == 2) rows_against_bf16(r0, k, k8, xs, 2, 4, 0, out);
            else rows_against_bf16(r0, k, k8, xs, 1, 4, 0, out);
            for (int j = 0; j < rows; j++)
                for (int r = 0; r < wrows; r++) {
                    float sum = out[j][r];
                    for (int c = k8; c < k; c++) sum += bf16_to_float(r0[(int64_t)r * k + c]) * xs[j][c];
                    y[(int64_t)(i + j) * n + wrows * b + r] = float_to_bf16(sum);
                }
        }
    }
    for (int r = wrows * blocks; r < n; r++)
        for (int i = 0; i < m; i++) {
            float sum = 0.0f;
            for (int c = 0; c < k; c++) sum += bf16_to_float(w[(int64_t)r * k + c]) * xf[(int64_t)i * k + c];
            y[(int64_t)i * n + r] = float_to_bf16(sum);
        }
}
