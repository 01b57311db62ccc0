/* Decode-step matrix-vector product for int8 weights: y[n] = scale[n] * sum_k w[n, k] * x[k].
 *
 * Built and loaded by worker/native.py (x86-64 with AVX2 and FMA; see its docstring for why).
 * The weights are a shard's int8 matrix (N, K), row-major, as it lies in its buffer; scales are
 * the shard's bfloat16 per-row scales; x and y are float32. Products are summed in fp32, with
 * fp32 activations: no bf16 rounding of x, unlike torch's _weight_int8pack_mm.
 *
 * Why it is faster than _weight_int8pack_mm at one row: a decode step reads every weight once
 * from DRAM, and that kernel issues no prefetch, so a core waits on each 512-byte row. Here a
 * block of 4 rows (4K contiguous bytes) is read as one stream with a software prefetch PREFETCH
 * bytes ahead, which keeps enough cache-line fills in flight to roughly double the bandwidth. */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH 3072 /* bytes ahead on the block stream; 2048-3072 were best, 1024 and 4096 slower */
#define MIN_BLOCKS_PER_THREAD 16 /* below this a second thread costs more than it saves */

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* 8 int8 weights (the low 8 bytes of v) times 8 floats of x, added to acc. */
static inline __m256 fma8(__m128i v, __m256 x, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), x, acc);
}

/* One row, for the N % 4 rows a 4-row block leaves over. */
static float dot_row(const int8_t *row, const float *x, int k_end) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= k_end; k += 8)
        acc = fma8(_mm_loadl_epi64((const __m128i *)(row + k)), _mm256_loadu_ps(x + k), acc);
    float sum = hsum(acc);
    for (; k < k_end; k++) sum += row[k] * x[k];
    return sum;
}

void int8_gemv(const int8_t *w, const uint16_t *scales, const float *x, float *y, int n, int k,
               int threads) {
    const int blocks = n / 4;
    if (threads > 1 && blocks < MIN_BLOCKS_PER_THREAD * threads) threads = 1;
    const int k16 = k - k % 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        const int8_t *r0 = w + (int64_t)4 * b * k, *r1 = r0 + k, *r2 = r1 + k, *r3 = r2 + k;
        /* lo: columns k..k+7 of each 16, hi: k+8..k+15, per row */
        __m256 lo0 = _mm256_setzero_ps(), lo1 = lo0, lo2 = lo0, lo3 = lo0;
        __m256 hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0;
        for (int c = 0; c < k16; c += 16) {
            /* the block is 4k contiguous bytes; 64 of them are consumed per iteration */
            _mm_prefetch((const char *)(r0 + 4 * c + PREFETCH), _MM_HINT_T0);
            const __m256 xlo = _mm256_loadu_ps(x + c), xhi = _mm256_loadu_ps(x + c + 8);
            __m128i v;
            v = _mm_loadu_si128((const __m128i *)(r0 + c));
            lo0 = fma8(v, xlo, lo0), hi0 = fma8(_mm_unpackhi_epi64(v, v), xhi, hi0);
            v = _mm_loadu_si128((const __m128i *)(r1 + c));
            lo1 = fma8(v, xlo, lo1), hi1 = fma8(_mm_unpackhi_epi64(v, v), xhi, hi1);
            v = _mm_loadu_si128((const __m128i *)(r2 + c));
            lo2 = fma8(v, xlo, lo2), hi2 = fma8(_mm_unpackhi_epi64(v, v), xhi, hi2);
            v = _mm_loadu_si128((const __m128i *)(r3 + c));
            lo3 = fma8(v, xlo, lo3), hi3 = fma8(_mm_unpackhi_epi64(v, v), xhi, hi3);
        }
        const float *xt = x + k16;
        const int tail = k - k16; /* 0 or 8 for a shard (K is a multiple of 8), anything here */
        y[4 * b + 0] = (hsum(_mm256_add_ps(lo0, hi0)) + dot_row(r0 + k16, xt, tail)) * bf16_to_float(scales[4 * b + 0]);
        y[4 * b + 1] = (hsum(_mm256_add_ps(lo1, hi1)) + dot_row(r1 + k16, xt, tail)) * bf16_to_float(scales[4 * b + 1]);
        y[4 * b + 2] = (hsum(_mm256_add_ps(lo2, hi2)) + dot_row(r2 + k16, xt, tail)) * bf16_to_float(scales[4 * b + 2]);
        y[4 * b + 3] = (hsum(_mm256_add_ps(lo3, hi3)) + dot_row(r3 + k16, xt, tail)) * bf16_to_float(scales[4 * b + 3]);
    }
    for (int r = 4 * blocks; r < n; r++)
        y[r] = dot_row(w + (int64_t)r * k, x, k) * bf16_to_float(scales[r]);
}
