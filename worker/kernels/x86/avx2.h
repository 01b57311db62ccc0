/* What the AVX2 kernels of this directory share. */
#ifndef EDGELLM_X86_AVX2_H
#define EDGELLM_X86_AVX2_H

#include <immintrin.h>

/* The sum of the 8 floats of v. */
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

#endif
