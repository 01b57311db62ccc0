/* f32_gemm, the same blocking on every ISA: included by x86/matmul.c and arm/matmul.c after
 * their vector loops, which it calls:
 *   one_row_against_eight(r0, k, kv, x, out[8])   one row of x against 8 weight rows
 *   up_to_three_rows(r0, k, kv, xs, rows, out)    1-3 rows of x against 4 weight rows
 * over columns [0, kv), kv = k rounded down to F32_VEC (floats per vector); the columns from kv
 * on and the rows a block leaves over go through dot_floats (../common.h). */
#ifndef EDGELLM_KERNELS_F32_GEMM_H
#define EDGELLM_KERNELS_F32_GEMM_H

/* y (m, n) = x (m, k) @ w (n, k).T in float32, for few rows of x (decode, small batches): every
 * block of w is read from memory once (8 rows for one row of x; else 4 rows, used for up to 3
 * rows of x at a time while the rest find it in L1/L2), the blocks split across threads.
 * On x86, MKL's sgemm/sgemv for these shapes streams 16-21 GB/s at 1 row and 6-9 GB/s at 2-8
 * rows on 2 threads; this reads 25-35. No software prefetch: the row streams are what the
 * hardware prefetcher follows best, and prefetching 1-4 KB ahead measured slower. */
void f32_gemm(const float *w, const float *x, float *y, int m, int n, int k, int threads) {
    if (threads > 1 && n < 4 * MIN_BLOCKS_PER_THREAD * threads) threads = 1;
    const int64_t kv = k - k % F32_VEC;
    const int wide_blocks = m == 1 ? n / 8 : 0; /* 8-row blocks, rows [0, 8 * wide_blocks) */
    const int first = 8 * wide_blocks;          /* then 4-row blocks from this row */
    const int blocks = (n - first) / 4;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (int b = 0; b < wide_blocks; b++) {
            const float *r0 = w + (int64_t)8 * b * k;
            float out[8];
            one_row_against_eight(r0, k, kv, x, out);
            for (int r = 0; r < 8; r++) y[8 * b + r] = out[r] + dot_floats(r0 + (int64_t)r * k + kv, x + kv, k - kv);
        }
#pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            const float *r0 = w + (int64_t)(first + 4 * b) * k;
            for (int i = 0; i < m; i += 3) {
                const int rows = m - i >= 3 ? 3 : m - i;
                const float *xs[3];
                for (int j = 0; j < 3; j++) xs[j] = x + (int64_t)(j < rows ? i + j : i) * k;
                float out[3][4];
                up_to_three_rows(r0, k, kv, xs, rows, out);
                for (int j = 0; j < rows; j++)
                    for (int r = 0; r < 4; r++)
                        y[(int64_t)(i + j) * n + first + 4 * b + r] =
                            out[j][r] + dot_floats(r0 + (int64_t)r * k + kv, xs[j] + kv, k - kv);
            }
        }
    }
    for (int r = first + 4 * blocks; r < n; r++)
        for (int i = 0; i < m; i++) y[(int64_t)i * n + r] = dot_floats(w + (int64_t)r * k, x + (int64_t)i * k, k);
}

#endif
