/* The small operations of a decode step, between its matrix products: RMSNorm, the gated MLP's
 * SiLU, and one new token's attention (RoPE, KV-cache write, grouped-query softmax attention).
 *
 * Built and loaded with matmul.c by worker/kernels/native.py. Why in C: a decode step streams every
 * weight from DRAM, which evicts the interpreter's and torch's own code and data from the
 * caches, so each small torch op after a matrix product costs 10-35 us instead of 3-5. On the
 * 1.1B shape (2 threads) the ops between a layer's four products took 0.96 ms, 10% of the step;
 * one call here replaces 3 to 15 of them.
 *
 * Numerics: fp32 throughout, like the torch path they replace; sums run in another order, so
 * results differ from it by a few ulps (worker/models/llama.py's tests bound the difference). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "../common.h"
#include "avx2.h"

static float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum8(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* e^x for 8 floats: Cephes' expf (range reduction by ln 2 in two parts, a degree-6 polynomial,
 * the exponent added as bits), within 2 ulp of expf over [-87, 88]; x is clamped to that range
 * (e^-87 is 1.6e-38: zero beside any softmax sum or SiLU). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

static inline float exp1(float x) { return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))); }

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
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int i = 0; i < m; i++) {
        const float *gate = gate_up + (int64_t)i * 2 * w, *up = gate + w;
        float *o = out + (int64_t)i * w;
        int j = 0;
        for (; j + 8 <= w; j += 8) {
            const __m256 g = _mm256_loadu_ps(gate + j);
            const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + j)));
        }
        for (; j < w; j++) o[j] = gate[j] / (1.0f + exp1(-gate[j])) * up[j];
    }
}

/* One query head against keys [start, end) of its KV head (rows of hd floats): softmax(scale *
 * q.k) weighted sum of the values, into out (hd,). scores has room for end - start floats. */
static void attend_head(const float *q, const float *keys, const float *values, int start, int end, int hd,
                        float scale, float *scores, float *out) {
    const int n = end - start;
    float max = -INFINITY;
    for (int t = 0; t < n; t++) {
        scores[t] = scale * dot(q, keys + (int64_t)(start + t) * hd, hd);
        if (scores[t] > max) max = scores[t];
    }
    __m256 total8 = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(max)));
        _mm256_storeu_ps(scores + t, p);
        total8 = _mm256_add_ps(total8, p);
    }
    float total = hsum8(total8);
    for (; t < n; t++) total += scores[t] = exp1(scores[t] - max);
    for (int j = 0; j < hd; j++) out[j] = 0.0f;
    for (t = 0; t < n; t++) {
        const float *v = values + (int64_t)(start + t) * hd;
        const __m256 p = _mm256_set1_ps(scores[t]);
        int j = 0;
        for (; j + 8 <= hd; j += 8)
            _mm256_storeu_ps(out + j, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + j), _mm256_loadu_ps(out + j)));
        for (; j < hd; j++) out[j] += scores[t] * v[j];
    }
    for (int j = 0; j < hd; j++) out[j] /= total;
}

#include "../decode_attention.h"
