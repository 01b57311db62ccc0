/* Runs the native kernels (worker/kernels/) on inputs from stdin and writes their outputs to
 * stdout, so that tests/test_arm_kernels.py can check a cross-compiled build under qemu against
 * float64 references computed in Python. Linked statically with the kernels' object files.
 *
 * Each case: 16 little-endian int64 header fields (op, then the op's sizes; floats as their bit
 * patterns), then the op's input arrays; it writes the op's output arrays. op 0 ends the run.
 * Every array is read and written whole, in the order tests/test_arm_kernels.py packs them. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { END, ISA, F32, INT8, INT4, BF16, RMS_NORM, SILU_MUL, ATTENTION };

const char *kernel_isa(void);
void f32_gemm(const float *w, const float *x, float *y, int m, int n, int k, int threads);
void int8_gemm(const int8_t *w, const uint16_t *scales, const float *x, float *y, int m, int n, int k, int threads);
void int4_gemm(const uint8_t *w, const uint16_t *sz, const float *x, float *y, int m, int n, int k, int g,
               int threads);
void bf16_gemm(const uint16_t *w, const uint16_t *x, uint16_t *y, float *xf, int m, int n, int k, int threads);
void rms_norm_rows(const float *x, const float *weight, float *out, int m, int d, float eps);
void silu_mul_rows(const float *gate_up, float *out, int m, int w);
void decode_attention(const float *qkv, int64_t qkv_stride, const float *cos, const float *signed_sin,
                      float *k_cache, float *v_cache, const int64_t *slots, const int64_t *positions, int batch,
                      int qh, int kh, int hd, int max_len, int window, float scale, float *out, int threads);

static void *input(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (p == NULL || fread(p, 1, bytes, stdin) != bytes) {
        fprintf(stderr, "harness: short input\n");
        exit(2);
    }
    return p;
}

static void output(const void *p, size_t bytes) { fwrite(p, 1, bytes, stdout); }

static float as_float(int64_t bits) {
    const uint32_t u = (uint32_t)bits;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

int main(void) {
    int64_t h[16];
    while (fread(h, sizeof h, 1, stdin) == 1 && h[0] != END) {
        const int64_t a = h[1], b = h[2], c = h[3], d = h[4];
        switch (h[0]) {
        case ISA: {
            char name[64] = {0};
            strncpy(name, kernel_isa(), sizeof name - 1);
            output(name, sizeof name);
            break;
        }
        case F32: { /* m, n, k, threads; w (n, k), x (m, k) -> y (m, n) */
            float *w = input(4 * b * c), *x = input(4 * a * c), *y = malloc(4 * a * b);
            f32_gemm(w, x, y, (int)a, (int)b, (int)c, (int)d);
            output(y, 4 * a * b);
            free(w), free(x), free(y);
            break;
        }
        case INT8: { /* m, n, k, threads; w int8 (n, k), scales bf16 (n,), x (m, k) -> y (m, n) */
            int8_t *w = input(b * c);
            uint16_t *s = input(2 * b);
            float *x = input(4 * a * c), *y = malloc(4 * a * b);
            int8_gemm(w, s, x, y, (int)a, (int)b, (int)c, (int)d);
            output(y, 4 * a * b);
            free(w), free(s), free(x), free(y);
            break;
        }
        case INT4: { /* rows, n, k, group, threads; x (rows, k), w (n, k/2), sz (n, k/group, 2) -> y */
            float *x = input(4 * a * c), *y = malloc(4 * a * b);
            uint8_t *w = input(b * c / 2);
            uint16_t *sz = input(2 * b * (c / d) * 2);
            int4_gemm(w, sz, x, y, (int)a, (int)b, (int)c, (int)d, (int)h[5]);
            output(y, 4 * a * b);
            free(x), free(w), free(sz), free(y);
            break;
        }
        case BF16: { /* m, n, k, threads; w bf16 (n, k), x bf16 (m, k) -> y bf16 (m, n) */
            uint16_t *w = input(2 * b * c), *x = input(2 * a * c), *y = malloc(2 * a * b);
            float *xf = malloc(4 * a * c);
            bf16_gemm(w, x, y, xf, (int)a, (int)b, (int)c, (int)d);
            output(y, 2 * a * b);
            free(w), free(x), free(y), free(xf);
            break;
        }
        case RMS_NORM: { /* m, d, eps bits; x (m, d), weight (d,) -> out (m, d) */
            float *x = input(4 * a * b), *weight = input(4 * b), *out = malloc(4 * a * b);
            rms_norm_rows(x, weight, out, (int)a, (int)b, as_float(c));
            output(out, 4 * a * b);
            free(x), free(weight), free(out);
            break;
        }
        case SILU_MUL: { /* m, w; gate_up (m, 2w) -> out (m, w) */
            float *gate_up = input(8 * a * b), *out = malloc(4 * a * b);
            silu_mul_rows(gate_up, out, (int)a, (int)b);
            output(out, 4 * a * b);
            free(gate_up), free(out);
            break;
        }
        case ATTENTION: { /* batch, qh, kh, hd, max_len, window, scale bits, threads, cache slots;
                           * qkv, cos, sin, k_cache, v_cache, slots, positions -> out, k_cache, v_cache */
            const int64_t batch = a, qh = b, kh = c, hd = d, max_len = h[5], window = h[6], threads = h[8];
            const int64_t width = (qh + 2 * kh) * hd, cache = h[9] * kh * max_len * hd;
            float *qkv = input(4 * batch * width), *cos = input(4 * max_len * hd), *sin = input(4 * max_len * hd);
            float *k_cache = input(4 * cache), *v_cache = input(4 * cache), *out = malloc(4 * batch * qh * hd);
            int64_t *slots = input(8 * batch), *positions = input(8 * batch);
            decode_attention(qkv, width, cos, sin, k_cache, v_cache, slots, positions, (int)batch, (int)qh, (int)kh,
                             (int)hd, (int)max_len, (int)window, as_float(h[7]), out, (int)threads);
            output(out, 4 * batch * qh * hd);
            output(k_cache, 4 * cache);
            output(v_cache, 4 * cache);
            free(qkv), free(cos), free(sin), free(k_cache), free(v_cache), free(out), free(slots), free(positions);
            break;
        }
        default:
            fprintf(stderr, "harness: unknown op %lld\n", (long long)h[0]);
            return 2;
        }
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
