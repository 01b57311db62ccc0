/* The small operations of a decode step on aarch64 (NEON): RMSNorm, the gated MLP's SiLU and one
 * new token's attention, the same C functions, contracts and numerics as ../x86/decode.c (whose
 * header says why they are in C); the same Cephes exp, with 4-wide vectors. */
#include <arm_neon.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "../common.h"

static float dot(const float *a, const float *b, int n) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= n; i += 4) acc = vfmaq_f32(acc, vld1q_f32(a + i), vld1q_f32(b + i));
    float sum = vaddvq_f32(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* e^x for 4 floats: Cephes' expf (range reduction by ln 2 in two parts, a degree-6 polynomial,
 * the exponent added as bits), within 2 ulp of expf over [-87, 88]; x is clamped to that range. */
static inline float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
    const float32x4_t n = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), x, vdupq_n_f32(1.44269504088896341f)));
    x = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    x = vfmsq_f32(x, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, x);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, x);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, x);
    y = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.0f)), y, vmulq_f32(x, x));
    const int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(bits));
}

static inline float exp1(float x) { return vgetq_lane_f32(exp4(vdupq_n_f32(x)), 0); }

/* out (m, d) = x / sqrt(mean(x^2) + eps) * weight, each row of x (m, d). */
void rms_norm_rows(const float *x, const float *weight, float *out, int m, int d, float eps) {
    for (int i = 0; i < m; i++) {
        const float *row = x + (int64_t)i * d;
        float *o = out + (int64_t)i * d;
        const float inv_rms = 1.0f / sqrtf(dot(row, row, d) / (float)d + eps);
        for (int j = 0; j < d; j++) o[j] = (row[j] * inv_rms) * weight[j];
    }
}

/* out (m, w) = silu(gate) * up, where each row of gate_up (m, 2w) is [gate | up]. */
void silu_mul_rows(const float *gate_up, float *out, int m, int w) {
    const float32x4_t one = vdupq_n_f32(1.0f);
    for (int i = 0; i < m; i++) {
        const float *gate = gate_up + (int64_t)i * 2 * w, *up = gate + w;
        float *o = out + (int64_t)i * w;
        int j = 0;
        for (; j + 4 <= w; j += 4) {
            const float32x4_t g = vld1q_f32(gate + j);
            const float32x4_t silu = vdivq_f32(g, vaddq_f32(one, exp4(vnegq_f32(g))));
            vst1q_f32(o + j, vmulq_f32(silu, vld1q_f32(up + j)));
        }
        for (; j < w; j++) o[j] = gate[j] / (1.0f + exp1(-gate[j])) * up[j];
    }
}

/* One query head against keys [start, end) of its KV head: softmax(scale * q.k) weighted sum of
 * the values, into out (hd,). scores has room for end - start floats. */
static void attend_head(const float *q, const float *keys, const float *values, int start, int end, int hd,
                        float scale, float *scores, float *out) {
    const int n = end - start;
    float max = -INFINITY;
    for (int t = 0; t < n; t++) {
        scores[t] = scale * dot(q, keys + (int64_t)(start + t) * hd, hd);
        if (scores[t] > max) max = scores[t];
    }
    float32x4_t total4 = vdupq_n_f32(0.0f);
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        const float32x4_t p = exp4(vsubq_f32(vld1q_f32(scores + t), vdupq_n_f32(max)));
        vst1q_f32(scores + t, p);
        total4 = vaddq_f32(total4, p);
    }
    float total = vaddvq_f32(total4);
    for (; t < n; t++) total += scores[t] = exp1(scores[t] - max);
    for (int j = 0; j < hd; j++) out[j] = 0.0f;
    for (t = 0; t < n; t++) {
        const float *v = values + (int64_t)(start + t) * hd;
        int j = 0;
        for (; j + 4 <= hd; j += 4) vst1q_f32(out + j, vfmaq_n_f32(vld1q_f32(out + j), vld1q_f32(v + j), scores[t]));
        for (; j < hd; j++) out[j] += scores[t] * v[j];
    }
    for (int j = 0; j < hd; j++) out[j] /= total;
}

#include "../decode_attention.h"
