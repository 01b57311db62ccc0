/* What the aarch64 quantized products share between their two compile units: matmul.c (built
 * for armv8-a: every 64-bit Pi) and dotprod.c (built for armv8.2-a+dotprod: the Pi 5's
 * Cortex-A76, chosen at run time from HWCAP_ASIMDDP).
 *
 * Activations are quantized per 32-block to int8 first (distributed-llama's Q80, with an fp32
 * scale instead of fp16): d = max|x| / 127, q = round-half-even(x * (1 / d)). Each block's
 * integer sum of weight x activation products is then exact, and one float multiply-add per
 * block and 4 weight rows applies d. The error this adds is at most d / 2 per activation,
 * times |w| (int8) or |w - zero| (int4).
 *
 * The inner loops (rows4 functions below) run 4 weight rows against one row of quantized
 * activations: the activation loads are shared by the 4 rows, and the 4 rows' int32 sums of a
 * block are reduced into one vector (lane r: row r) so that the scales are applied to 4 rows
 * with one instruction. Each is one small function so that it can be read and measured alone
 * (llvm-mca: docs/benchmarks.md). */
#ifndef EDGELLM_ARM_QUANT_H
#define EDGELLM_ARM_QUANT_H

#include <stdint.h>

#define QBLOCK 32 /* activations per quantization block */

/* int8 weights: out[r] = sum over blocks b < blocks of xd[b] * sum_{i<32} rows[r][32b + i] * xq[32b + i]
 * (the weight row's own scale is applied by the caller). */
typedef void Int8Rows4(const int8_t *const rows[4], const int8_t *xq, const float *xd, int64_t blocks,
                       float out[4]);

/* edgellm int4 weights (worker/quant.py has the format: 16 bytes per 32 weights, byte i of a
 * block holding weight i in its low nibble and weight 16 + i in its high nibble, q in 0..15,
 * w = (q - 8) * scale + zero per group of `group` weights): out[r] = sum_k w[r, k] * x[k] with x
 * quantized for the (q - 8) * scale part and exact (xsum[j]: the sum of x over group j) for the
 * zero part. sz[r] points at row r's (scale, zero) bf16 pairs, one pair per group. */
typedef void Int4Rows4(const uint8_t *const rows[4], const uint16_t *const sz[4], const int8_t *xq,
                       const float *xd, const float *xsum, int64_t groups, int64_t blocks_per_group, float out[4]);

Int8Rows4 int8_rows4_neon, int8_rows4_dotprod;
Int4Rows4 int4_rows4_neon, int4_rows4_dotprod;

#endif
