/* decode_attention, the same on every ISA: included at the end of x86/decode.c and arm/decode.c,
 * after their vector attend_head (one query head against a range of its KV head's cached keys);
 * rope_head is ../common.h's. */
#ifndef EDGELLM_KERNELS_DECODE_ATTENTION_H
#define EDGELLM_KERNELS_DECODE_ATTENTION_H

/* Sequences x heads x keys x head_dim below which the attention runs on one thread. */
#define ATTENTION_PARALLEL_WORK (1 << 17)

/* One new token of each of `batch` sequences: RoPE on its query (qh heads) and key (kh heads),
 * its key and value written to the KV cache at (slots[b], positions[b]), then each query head
 * attends to its KV head's (head / (qh / kh)) cached keys [positions[b] - window + 1 or 0,
 * positions[b]] (window 0: all). Each row of qkv (qkv_stride floats apart) holds the token's
 * q, k and v side by side (qh * hd, kh * hd and kh * hd floats); cos and signed_sin are
 * (max_len, hd) tables; the caches one layer's (slots, kh, max_len, hd); out is (batch, qh * hd).
 * Heads of a long context are split across `threads` (each output computed by one thread: the
 * same bits at any count). */
void decode_attention(const float *qkv, int64_t qkv_stride, const float *cos, const float *signed_sin,
                      float *k_cache, float *v_cache, const int64_t *slots, const int64_t *positions, int batch,
                      int qh, int kh, int hd, int max_len, int window, float scale, float *out, int threads) {
    const int64_t head_stride = (int64_t)max_len * hd, slot_stride = kh * head_stride;
    float *rotated_q = malloc(sizeof(float) * batch * qh * hd);
    int longest = 0;
    for (int b = 0; b < batch; b++) {
        const int64_t pos = positions[b];
        const float *c = cos + pos * hd, *s = signed_sin + pos * hd;
        const float *q = qkv + b * qkv_stride, *k = q + qh * hd, *v = k + kh * hd;
        for (int h = 0; h < qh; h++) rope_head(q + h * hd, c, s, hd, rotated_q + ((int64_t)b * qh + h) * hd);
        for (int h = 0; h < kh; h++) {
            const int64_t row = slots[b] * slot_stride + h * head_stride + pos * hd;
            rope_head(k + h * hd, c, s, hd, k_cache + row);
            for (int j = 0; j < hd; j++) v_cache[row + j] = v[h * hd + j];
        }
        if (pos + 1 > longest) longest = (int)pos + 1;
    }
    const int group = qh / kh;
    const int64_t work = (int64_t)batch * qh * longest * hd;
    if (work < ATTENTION_PARALLEL_WORK) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (longest > 0 ? longest : 1));
#pragma omp for schedule(static)
        for (int bh = 0; bh < batch * qh; bh++) {
            const int b = bh / qh, h = bh % qh;
            const int end = (int)positions[b] + 1;
            const int start = window > 0 && end > window ? end - window : 0;
            const int64_t head = slots[b] * slot_stride + (h / group) * head_stride;
            attend_head(rotated_q + (int64_t)bh * hd, k_cache + head, v_cache + head, start, end, hd, scale, scores,
                        out + (int64_t)bh * hd);
        }
        free(scores);
    }
    free(rotated_q);
}

#endif
