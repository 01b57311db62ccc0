/* Matrix products for decode on aarch64 (NEON), the same C functions and contracts as
 * ../x86/matmul.c: f32_gemm and bf16_gemm (float weights, few rows of x), int8_gemm (int8
 * weights, bf16 per-row scales, fp32 x) and int4_gemm (edgellm int4 weights: worker/kernels/quant.py).
 *
 * Built for armv8-a, which every 64-bit Pi runs (worker/kernels/native.py). The quantized products
 * quantize x per 32-block to int8 first (quant.h) and sum integer products: with the
 * dot-product instructions (dotprod.c, chosen once at load from HWCAP_ASIMDDP: the Pi 5's
 * Cortex-A76) or with widening multiplies (here: the Pi 4's Cortex-A72). Unlike the x86 int8
 * kernel, whose fp32 activations make its sums exact to fp32, these add the activations'
 * rounding (at most d / 2 each, d = max|x| / 127 of its block): int8 -> float conversions of
 * every weight would take 4-6 instructions per 4 weights, integer products 1-2 per 16. */
#include <arm_neon.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>

#include "../common.h"
#include "quant.h"

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

#define MIN_BLOCKS_PER_THREAD 16 /* below this a second thread costs more than it saves */

/* ---- quantized products without dot-product instructions (the Pi 4) ---- */

#define ROWS4(name) name##_neon

/* Products in int16 pairs (weight i with weight 16 + i: |w| <= 128 and |x| <= 127, so a pair is
 * at most 32512), then added pairwise into int32. */
static inline int32x4_t block_int8(const int8_t *w, int8x16_t x0, int8x16_t x1) {
    const int8x16_t w0 = vld1q_s8(w), w1 = vld1q_s8(w + 16);
    int16x8_t lo = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    lo = vmlal_s8(lo, vget_low_s8(w1), vget_low_s8(x1));
    int16x8_t hi = vmull_high_s8(w0, x0);
    hi = vmlal_high_s8(hi, w1, x1);
    return vpadalq_s16(vpaddlq_s16(lo), hi);
}

/* As dotprod.c's: 16 * (q - 8) (|.| <= 128) of weights i and 16 + i from byte i. */
static inline int32x4_t block_int4(const uint8_t *w, int8x16_t x0, int8x16_t x1) {
    const uint8x16_t t = veorq_u8(vld1q_u8(w), vdupq_n_u8(0x88));
    const int8x16_t lo = vreinterpretq_s8_u8(vshlq_n_u8(t, 4)), hi = vreinterpretq_s8_u8(vandq_u8(t, vdupq_n_u8(0xf0)));
    int16x8_t a = vmull_s8(vget_low_s8(lo), vget_low_s8(x0));
    a = vmlal_s8(a, vget_low_s8(hi), vget_low_s8(x1));
    int16x8_t b = vmull_high_s8(lo, x0);
    b = vmlal_high_s8(b, hi, x1);
    return vpadalq_s16(vpaddlq_s16(a), b);
}

#include "rows4.h"

/* ---- the run-time choice ---- */

static Int8Rows4 *int8_rows4 = int8_rows4_neon;
static Int4Rows4 *int4_rows4 = int4_rows4_neon;
static int has_dotprod;

__attribute__((constructor)) static void choose_kernels(void) {
    has_dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
    if (has_dotprod) {
        int8_rows4 = int8_rows4_dotprod;
        int4_rows4 = int4_rows4_dotprod;
    }
}

/* Which kernels the library runs on this CPU, for worker/kernels/native.py's log line. */
const char *kernel_isa(void) {
    return has_dotprod ? "aarch64 NEON, dot product (sdot) for int8/int4" : "aarch64 NEON, no dot product";
}

/* ---- activations quantized per 32-block ---- */

typedef struct {
    int8_t *q;     /* (m, blocks * 32), zero past k */
    float *d;      /* (m, blocks) */
    float *xsum;   /* (m, groups): sum of x over each group (int4 only) */
    int64_t blocks, groups;
} QuantRows;

/* One block of 32 floats: d = max|x| / 127, q = x * (1 / d) rounded half to even. */
static void quantize_block(const float *x, int8_t *q, float *d) {
    float32x4_t v[8], amax = vdupq_n_f32(0.0f);
    for (int i = 0; i < 8; i++) {
        v[i] = vld1q_f32(x + 4 * i);
        amax = vmaxq_f32(amax, vabsq_f32(v[i]));
    }
    const float scale = vmaxvq_f32(amax) / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    *d = scale;
    int16x8_t h[4];
    for (int i = 0; i < 4; i++)
        h[i] = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(v[2 * i], inv))),
                            vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(v[2 * i + 1], inv))));
    vst1q_s8(q, vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])));
    vst1q_s8(q + 16, vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])));
}

/* x (m, k) quantized into qr (its arrays malloc'ed here; group 0: no group sums). Returns 0 when
 * out of memory. */
static int quantize_rows(const float *x, int64_t m, int64_t k, int64_t group, QuantRows *qr) {
    qr->blocks = (k + QBLOCK - 1) / QBLOCK;
    qr->groups = group > 0 ? k / group : 0;
    qr->q = malloc((size_t)(m * qr->blocks * QBLOCK));
    qr->d = malloc(sizeof(float) * (size_t)(m * qr->blocks));
    qr->xsum = malloc(sizeof(float) * (size_t)(m * qr->groups + 1));
    if (qr->q == NULL || qr->d == NULL || qr->xsum == NULL) return 0;
    for (int64_t i = 0; i < m; i++) {
        const float *row = x + i * k;
        for (int64_t b = 0; b < qr->blocks; b++) {
            int8_t *q = qr->q + (i * qr->blocks + b) * QBLOCK;
            float *d = qr->d + i * qr->blocks + b;
            if ((b + 1) * QBLOCK <= k) {
                quantize_block(row + b * QBLOCK, q, d);
            } else { /* the last, partial block, padded with zeros */
                float padded[QBLOCK] = {0};
                memcpy(padded, row + b * QBLOCK, sizeof(float) * (size_t)(k - b * QBLOCK));
                quantize_block(padded, q, d);
            }
        }
        for (int64_t j = 0; j < qr->groups; j++) {
            float32x4_t s = vdupq_n_f32(0.0f);
            for (int64_t c = j * group; c < (j + 1) * group; c += 4) s = vaddq_f32(s, vld1q_f32(row + c));
            qr->xsum[i * qr->groups + j] = vaddvq_f32(s);
        }
    }
    return 1;
}

static void free_rows(QuantRows *qr) {
    free(qr->q);
    free(qr->d);
    free(qr->xsum);
}

/* ---- the quantized products ---- */

/* y (m, n) = x (m, k) @ (w (n, k) * scales[:, None]).T: every 4-row block of w read once from
 * memory for all m rows of x (the first row streams it in, the others find it in L1/L2), the
 * blocks split across threads, each output summed by one thread (the same bits at any count). */
void int8_gemm(const int8_t *w, const uint16_t *scales, const float *x, float *y, int m, int n, int k,
               int threads) {
    QuantRows qr;
    if (!quantize_rows(x, m, k, 0, &qr)) abort();
    const int64_t full = k / QBLOCK; /* whole blocks; columns [full * 32, k) are summed below */
    const int blocks = (n + 3) / 4;
    if (threads > 1 && blocks < MIN_BLOCKS_PER_THREAD * threads) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int first = 4 * b, count = n - first < 4 ? n - first : 4;
        const int8_t *rows[4]; /* a last block of fewer rows repeats its last row */
        for (int r = 0; r < 4; r++) rows[r] = w + (int64_t)(first + (r < count ? r : count - 1)) * k;
        for (int i = 0; i < m; i++) {
            const int8_t *xq = qr.q + (int64_t)i * qr.blocks * QBLOCK;
            const float *xd = qr.d + (int64_t)i * qr.blocks;
            float out[4];
            int8_rows4(rows, xq, xd, full, out);
            for (int r = 0; r < count; r++) {
                float sum = out[r];
                if (full < qr.blocks) {
                    int32_t tail = 0;
                    for (int64_t c = full * QBLOCK; c < k; c++) tail += rows[r][c] * xq[c];
                    sum += xd[full] * (float)tail;
                }
                y[(int64_t)i * n + first + r] = sum * bf16_to_float(scales[first + r]);
            }
        }
    }
    free_rows(&qr);
}

/* y (m, n) = x (m, k) @ dequant(w).T for edgellm int4 w (n, k / 2) with bf16 (scale, zero) pairs
 * sz (n, k / g, 2); g a multiple of 32 that divides k (the caller checks). The signature of the
 * x86 int4_gemm (int4fmt's ../x86/int4.c); blocks and threads as int8_gemm's. */
void int4_gemm(const uint8_t *w, const uint16_t *sz, const float *x, float *y, int m, int n, int k, int g,
               int threads) {
    const int64_t rows = m, group = g, groups = k / g, blocks = (n + 3) / 4;
    QuantRows qr;
    if (!quantize_rows(x, rows, k, group, &qr)) abort();
    if (threads > 1 && blocks < MIN_BLOCKS_PER_THREAD * threads) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = 4 * b, count = n - first < 4 ? n - first : 4;
        const uint8_t *wrows[4];
        const uint16_t *pairs[4];
        for (int64_t r = 0; r < 4; r++) {
            const int64_t row = first + (r < count ? r : count - 1);
            wrows[r] = w + row * (k / 2);
            pairs[r] = sz + row * groups * 2;
        }
        for (int64_t i = 0; i < rows; i++) {
            float out[4];
            int4_rows4(wrows, pairs, qr.q + i * qr.blocks * QBLOCK, qr.d + i * qr.blocks, qr.xsum + i * groups, groups,
                       group / QBLOCK, out);
            for (int64_t r = 0; r < count; r++) y[i * n + first + r] = out[r];
        }
    }
    free_rows(&qr);
}

/* ---- float weights ---- */

/* One row of x against 8 weight rows (row stride k) over columns [0, k4): the decode case, 8
 * row streams at once (as ../x86/matmul.c, which measured why). */
static void one_row_against_eight(const float *r0, int64_t k, int64_t k4, const float *x, float out[8]) {
    float32x4_t acc[8];
    for (int r = 0; r < 8; r++) acc[r] = vdupq_n_f32(0.0f);
    for (int64_t c = 0; c < k4; c += 4) {
        const float32x4_t xv = vld1q_f32(x + c);
        for (int r = 0; r < 8; r++) acc[r] = vfmaq_f32(acc[r], vld1q_f32(r0 + r * k + c), xv);
    }
    for (int r = 0; r < 8; r++) out[r] = vaddvq_f32(acc[r]);
}

/* rows (1-3) rows of x against 4 float weight rows (row stride `stride`) over columns [0, k4);
 * inlined with a constant row count so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void rows_against_floats(const float *block, int64_t stride, int64_t k4,
                                                                      const float *xs[3], int rows,
                                                                      float out[3][4]) {
    float32x4_t acc[3][4];
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = vdupq_n_f32(0.0f);
    for (int64_t c = 0; c < k4; c += 4) {
        float32x4_t xv[3];
        for (int i = 0; i < rows; i++) xv[i] = vld1q_f32(xs[i] + c);
        for (int r = 0; r < 4; r++) {
            const float32x4_t wv = vld1q_f32(block + r * stride + c);
            for (int i = 0; i < rows; i++) acc[i][r] = vfmaq_f32(acc[i][r], wv, xv[i]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < 4; r++) out[i][r] = vaddvq_f32(acc[i][r]);
}

static void up_to_three_rows(const float *block, int64_t stride, int64_t k4, const float *xs[3], int rows,
                             float out[3][4]) {
    if (rows == 3) rows_against_floats(block, stride, k4, xs, 3, out);
    else if (rows == 2) rows_against_floats(block, stride, k4, xs, 2, out);
    else rows_against_floats(block, stride, k4, xs, 1, out);
}

#define F32_VEC 4 /* floats per vector: f32_gemm's column blocks */
#include "../f32_gemm.h"


/* 4 bfloat16 values at p as floats (a bf16 is the top half of a float32). */
static inline float32x4_t load4_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }

/* Rows xs (floats, 1-3 of them) against the bf16 weight rows r0.. (wrows of them, row stride k)
 * over columns [0, k4); inlined with constant counts so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void rows_against_bf16(const uint16_t *r0, int64_t k, int64_t k4,
                                                                    const float *xs[3], int rows, int wrows,
                                                                    float out[3][8]) {
    float32x4_t acc[3][8];
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < wrows; r++) acc[i][r] = vdupq_n_f32(0.0f);
    for (int64_t c = 0; c < k4; c += 4) {
        float32x4_t xv[3];
        for (int i = 0; i < rows; i++) xv[i] = vld1q_f32(xs[i] + c);
        for (int r = 0; r < wrows; r++) {
            const float32x4_t wv = load4_bf16(r0 + r * k + c);
            for (int i = 0; i < rows; i++) acc[i][r] = vfmaq_f32(acc[i][r], wv, xv[i]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < wrows; r++) out[i][r] = vaddvq_f32(acc[i][r]);
}

/* y (m, n) = x (m, k) @ w (n, k).T with bfloat16 x, w and y, summed in float32 and rounded once
 * (../x86/matmul.c's contract); x is converted to floats once into xf (m * k floats from the
 * caller). */
void bf16_gemm(const uint16_t *w, const uint16_t *x, uint16_t *y, float *xf, int m, int n, int k, int threads) {
    for (int64_t i = 0; i < (int64_t)m * k; i++) xf[i] = bf16_to_float(x[i]);
    if (threads > 1 && n < 4 * MIN_BLOCKS_PER_THREAD * threads) threads = 1;
    const int64_t k4 = k - k % 4;
    const int wrows = m == 1 ? 8 : 4;
    const int blocks = n / wrows;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        const uint16_t *r0 = w + (int64_t)wrows * b * k;
        for (int i = 0; i < m; i += 3) {
            const int rows = m - i >= 3 ? 3 : m - i;
            const float *xs[3];
            for (int j = 0; j < 3; j++) xs[j] = xf + (int64_t)(j < rows ? i + j : i) * k;
            float out[3][8];
            if (wrows == 8) rows_against_bf16(r0, k, k4, xs, 1, 8, out);
            else if (rows == 3) rows_against_bf16(r0, k, k4, xs, 3, 4, out);
            else if (rows == 2) rows_against_bf16(r0, k, k4, xs, 2, 4, out);
            else rows_against_bf16(r0, k, k4, xs, 1, 4, out);
            for (int j = 0; j < rows; j++)
                for (int r = 0; r < wrows; r++) {
                    float sum = out[j][r];
                    for (int64_t c = k4; c < k; c++) sum += bf16_to_float(r0[(int64_t)r * k + c]) * xs[j][c];
                    y[(int64_t)(i + j) * n + wrows * b + r] = float_to_bf16(sum);
                }
        }
    }
    for (int r = wrows * blocks; r < n; r++)
        for (int i = 0; i < m; i++) {
            float sum = 0.0f;
            for (int64_t c = 0; c < k; c++) sum += bf16_to_float(w[(int64_t)r * k + c]) * xf[(int64_t)i * k + c];
            y[(int64_t)i * n + r] = float_to_bf16(sum);
        }
}
