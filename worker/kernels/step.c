/* One rank's decode step in one call: every dense Llama-family layer of the rank, its two
 * allreduces per layer included, for B new tokens (one per sequence).
 *
 * Why: a rank that runs its layers in Python pays the interpreter, torch's dispatch and a
 * ctypes call per kernel (about 12 small calls per layer) between the allreduces, from caches
 * the weights just evicted; and a peer waiting in its allreduce waits for all of it.
 *
 * ISA-independent C, built into the kernel library of each machine (worker/kernels/native.py's
 * COMPILE_UNITS): it only composes that machine's kernels (x86/ or arm/), called exactly as the
 * Python path calls them (worker/models/llama.py), so the step computes the same bits. The
 * allreduce is a function pointer and its context from the caller (the lane library's
 * lane_allreduce_f32 and a lane handle, worker/comm/lane.py): this library is not linked
 * against libsodium. With no allreduce (one rank) a partial is the sum.
 *
 * A step is a sequence of 2 * layers stages (attention of layer L is stage 2L, its MLP 2L + 1),
 * each ending in one allreduce (seq: first_seq + stage). An allreduce that fails (an error code,
 * or a timeout after its frame was sent) stops the step: the caller gets the code and the
 * stage, finishes or abandons that allreduce itself (its own partial is at the start of
 * scratch), adds the sum to hidden and may go on from the next stage. */
#include <stdint.h>
#include <time.h>

void f32_gemm(const float *w, const float *x, float *y, int m, int n, int k, int threads);
void int8_gemm(const int8_t *w, const uint16_t *scales, const float *x, float *y, int m, int n, int k, int threads);
void int4_gemm(const uint8_t *w, const uint16_t *sz, const float *x, float *y, int m, int n, int k, int g,
               int threads);
void rms_norm_rows(const float *x, const float *weight, float *out, int m, int d, float eps);
void silu_mul_rows(const float *gate_up, float *out, int m, int w);
void decode_attention(const float *qkv, int64_t qkv_stride, const float *cos, const float *signed_sin,
                      float *k_cache, float *v_cache, const int64_t *slots, const int64_t *positions, int batch,
                      int qh, int kh, int hd, int max_len, int window, float scale, float *out, int threads);

enum { WEIGHT_F32 = 0, WEIGHT_INT8 = 1, WEIGHT_INT4 = 2 };

/* One (n, k) weight matrix as worker/kernels/quant.py's linear takes it. */
typedef struct {
    const void *w;           /* f32 (n, k), int8 (n, k), or int4 uint8 (n, k/2) in edgellm's layout */
    const uint16_t *scales;  /* bf16: int8 (n,), int4 (n, k/g, 2); NULL for f32 */
    const float *bias;       /* (n,) or NULL */
    int32_t kind, group, n, k;
} StepMatrix;

typedef struct {
    const float *attn_norm, *mlp_norm;  /* (d,) each */
    StepMatrix qkv;                     /* ((qh + 2kh) * hd, d) */
    StepMatrix o;                       /* (d, qh * hd) */
    StepMatrix gate_up;                 /* (2w, d), rows [gate | up] */
    StepMatrix down;                    /* (d, w) */
    float *k_cache, *v_cache;           /* this layer's (slots, kh, max_len, hd) */
} StepLayer;

typedef int (*StepAllreduce)(void *ctx, float *x, int64_t n, uint32_t seq);

typedef struct {
    const StepLayer *layers;
    int32_t num_layers, d, qh, kh, hd, ffn, max_len, window;  /* ffn: this rank's MLP columns w */
    float eps, scale;
    const float *cos, *signed_sin;  /* (max_len, hd) RoPE tables */
    StepAllreduce allreduce;        /* NULL: one rank */
    void *allreduce_ctx;
} StepModel;

/* Floats of scratch a step of `batch` rows needs: partial (B, d) first, then the rest. */
int64_t step_scratch_floats(const StepModel *m, int batch) {
    const int64_t qkv = (int64_t)(m->qh + 2 * m->kh) * m->hd;
    return (int64_t)batch * (2 * m->d + qkv + m->qh * m->hd + 3 * m->ffn);
}

/* y (B, n) = x (B, k) @ w.T (+ bias). */
static void matmul(const StepMatrix *w, const float *x, float *y, int batch, int threads) {
    if (w->kind == WEIGHT_INT8)
        int8_gemm(w->w, w->scales, x, y, batch, w->n, w->k, threads);
    else if (w->kind == WEIGHT_INT4)
        int4_gemm(w->w, w->scales, x, y, batch, w->n, w->k, w->group, threads);
    else
        f32_gemm(w->w, x, y, batch, w->n, w->k, threads);
    if (w->bias)
        for (int b = 0; b < batch; b++)
            for (int j = 0; j < w->n; j++) y[(int64_t)b * w->n + j] += w->bias[j];
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The partial (B, d) of stage `stage` for the residual stream hidden (B, d). */
static void stage_partial(const StepModel *m, int stage, const float *hidden, int batch, const int64_t *slots,
                          const int64_t *positions, float *scratch, int threads) {
    const StepLayer *l = &m->layers[stage / 2];
    const int64_t qkv_width = (int64_t)(m->qh + 2 * m->kh) * m->hd;
    float *partial = scratch, *x = partial + (int64_t)batch * m->d, *work = x + (int64_t)batch * m->d;
    if (stage % 2 == 0) {  /* attention */
        float *qkv = work, *attended = qkv + batch * qkv_width;  /* (B, (qh + 2kh) hd), (B, qh hd) */
        rms_norm_rows(hidden, l->attn_norm, x, batch, m->d, m->eps);
        matmul(&l->qkv, x, qkv, batch, threads);
        decode_attention(qkv, qkv_width, m->cos, m->signed_sin, l->k_cache, l->v_cache, slots, positions, batch,
                         m->qh, m->kh, m->hd, m->max_len, m->window, m->scale, attended, threads);
        matmul(&l->o, attended, partial, batch, threads);
    } else {  /* gated MLP */
        float *gate_up = work, *act = gate_up + (int64_t)batch * 2 * m->ffn;  /* (B, 2w), (B, w) */
        rms_norm_rows(hidden, l->mlp_norm, x, batch, m->d, m->eps);
        matmul(&l->gate_up, x, gate_up, batch, threads);
        silu_mul_rows(gate_up, act, batch, m->ffn);
        matmul(&l->down, act, partial, batch, threads);
    }
}

/* Stages [first, 2 * layers) on hidden (B, d), in place. slots and positions (B,) say where each
 * row's token goes in the KV cache (checked by the caller). scratch holds step_scratch_floats.
 * allreduce_ns (2 * layers,) gets the time of each stage's allreduce. Returns 0, or the failed
 * allreduce's code with *failed_stage set (hidden then lacks that stage's sum). */
int decode_step(const StepModel *m, float *hidden, int batch, const int64_t *slots, const int64_t *positions,
                float *scratch, int first, uint32_t first_seq, int threads, int *failed_stage,
                int64_t *allreduce_ns) {
    const int64_t n = (int64_t)batch * m->d;
    for (int stage = first; stage < 2 * m->num_layers; stage++) {
        stage_partial(m, stage, hidden, batch, slots, positions, scratch, threads);
        if (m->allreduce) {
            const int64_t start = now_ns();
            const int rc = m->allreduce(m->allreduce_ctx, scratch, n, first_seq + (uint32_t)stage);
            allreduce_ns[stage] = now_ns() - start;
            if (rc) {
                *failed_stage = stage;
                return rc;
            }
        }
        for (int64_t i = 0; i < n; i++) hidden[i] += scratch[i];
    }
    return 0;
}
