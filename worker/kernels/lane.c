/* The data plane's lane: one pre-connected TCP socket between the hub and a rank, framed and
 * authenticated, driven by the thread that computes (no I/O thread, no hand-off per message).
 *
 * Built and loaded by worker/comm/lane.py (portable C, libsodium). A frame is
 *
 *   header (24 bytes, little-endian): magic "EDL1" | kind u8 | mode u8 | format u16 | step u64 |
 *                                     seq u32 | payload bytes u32
 *   (kind: worker/comm/wire.py's Kind; mode: 1 integrity, 2 encryption; format: the wire dtype code
 *   of the payload's first tensor, 0xFFFF for none)
 *   payload (payload bytes)
 *   tag (16 bytes): ChaCha20-Poly1305 (IETF) under this direction's session key, the nonce the
 *                   count of frames sent before it in this direction (so a frame replayed,
 *                   dropped or reordered fails too). Integrity (the default): the header and
 *                   payload are the associated data, nothing is encrypted. Encryption: the
 *                   header is the associated data and the payload is encrypted.
 *
 * A frame is read whole into the lane's receive buffer and its tag checked before anything of
 * it is used: a half-written frame (the peer killed mid-send) is never summed, and a frame that
 * fails its tag breaks the lane (the stream can no longer be trusted to be in step).
 * A receive that times out keeps what it read; the next call goes on from there. */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <poll.h>
#include <sodium.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEADER_BYTES 24
#define TAG_BYTES 16
#define KEY_BYTES 32
#define FORMAT_F32 0 /* worker/comm/wire.py's DTYPES codes of float32 and int8 */
#define FORMAT_I8 5
/* int8 payloads (--sync-dtype int8, wire.py's sync_payload): n int8 values, then a float32 absmax
 * scale per block of Q8_BLOCK values: value = q * scale, q in [-127, 127]. */
#define Q8_BLOCK 32
#define Q8_LEVELS 127.0f
/* The most payload bytes a frame may announce: the buffers grow to what a frame needs up to
 * this (its tag can only be checked once it is read whole). */
#define MAX_PAYLOAD ((int64_t)1 << 30)

enum { MODE_NONE = 0, MODE_MAC = 1, MODE_ENCRYPT = 2 };
enum { KIND_PARTIAL = 3, KIND_REDUCED = 4, KIND_STOP = 5, KIND_ABORT = 7 }; /* worker/comm/wire.py's Kind */

/* Return codes (negative): the Python side names them in worker/comm/lane.py. */
enum { ERR_TIMEOUT = -1, ERR_CLOSED = -2, ERR_TAG = -3, ERR_FORMAT = -4, ERR_TOO_BIG = -5, ERR_SEND = -6,
       ERR_ORDER = -7, ERR_CONTROL = -8 };

typedef struct {
    int fd, mode;
    uint8_t send_key[KEY_BYTES], recv_key[KEY_BYTES];
    uint64_t sent, received;   /* frames so far in each direction: the nonces */
    int64_t capacity;          /* payload bytes the buffers hold */
    uint8_t *out;              /* header | payload | tag of the frame being sent */
    uint8_t *in;               /* header | payload | tag of the frame being received */
    int64_t have;              /* bytes of the current incoming frame read so far */
    /* the last frame received whole and checked */
    int kind, format;
    uint64_t step;
    uint32_t seq;
    int64_t length;
    /* the step lane_allreduce_f32 works in, set by lane_begin */
    uint64_t current_step;
    int slice_ms, spin_us;
} Lane;

static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get_u32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = v << 8 | p[i]; return v; }
static uint64_t get_u64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }

static void nonce_of(uint64_t counter, uint8_t nonce[12]) {
    memset(nonce, 0, 12);
    put_u64(nonce + 4, counter);
}

int lane_init(void) { return sodium_init() < 0 ? -1 : 0; }

void *lane_new(int fd, const uint8_t *send_key, const uint8_t *recv_key, int mode, int64_t capacity) {
    Lane *l = calloc(1, sizeof(Lane));
    if (!l) return NULL;
    l->fd = fd;
    l->mode = mode;
    memcpy(l->send_key, send_key, KEY_BYTES);
    memcpy(l->recv_key, recv_key, KEY_BYTES);
    l->capacity = capacity;
    l->out = malloc(HEADER_BYTES + capacity + TAG_BYTES);
    l->in = malloc(HEADER_BYTES + capacity + TAG_BYTES);
    if (!l->out || !l->in) {
        free(l->out), free(l->in), free(l);
        return NULL;
    }
    return l;
}

/* Room for frames of n payload bytes in both buffers (kept: what a frame has read so far). */
int lane_reserve(void *handle, int64_t n) {
    Lane *l = handle;
    if (n <= l->capacity) return 0;
    if (n > MAX_PAYLOAD) return ERR_TOO_BIG;
    uint8_t *out = realloc(l->out, HEADER_BYTES + n + TAG_BYTES);
    if (!out) return ERR_TOO_BIG;
    l->out = out;
    uint8_t *in = realloc(l->in, HEADER_BYTES + n + TAG_BYTES);
    if (!in) return ERR_TOO_BIG;
    l->in = in;
    l->capacity = n;
    return 0;
}

void lane_free(void *handle) {
    Lane *l = handle;
    if (!l) return;
    sodium_memzero(l->send_key, KEY_BYTES);
    sodium_memzero(l->recv_key, KEY_BYTES);
    free(l->out), free(l->in), free(l);
}

/* The payload of the last frame received (valid until the next receive). */
const uint8_t *lane_payload(void *handle) { return ((Lane *)handle)->in + HEADER_BYTES; }
int lane_kind(void *handle) { return ((Lane *)handle)->kind; }
int lane_format(void *handle) { return ((Lane *)handle)->format; }
uint64_t lane_step(void *handle) { return ((Lane *)handle)->step; }
uint32_t lane_seq(void *handle) { return ((Lane *)handle)->seq; }

static int send_all(int fd, const uint8_t *p, int64_t n) {
    while (n > 0) {
        const ssize_t k = send(fd, p, (size_t)n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd w = {fd, POLLOUT, 0};
                if (poll(&w, 1, 1000) < 0 && errno != EINTR) return ERR_SEND;
                continue;
            }
            return ERR_SEND;
        }
        p += k, n -= k;
    }
    return 0;
}

/* Room for a frame of n payload bytes in the out buffer, its header written: the payload to
 * fill before frame_send, or NULL when it cannot grow. */
static uint8_t *frame_begin(Lane *l, int kind, int format, uint64_t step, uint32_t seq, int64_t n) {
    if (n > l->capacity && lane_reserve(l, n)) return NULL;
    uint8_t *h = l->out;
    memcpy(h, "EDL1", 4);
    h[4] = (uint8_t)kind, h[5] = (uint8_t)l->mode, h[6] = (uint8_t)format, h[7] = (uint8_t)(format >> 8);
    put_u64(h + 8, step);
    put_u32(h + 16, seq);
    put_u32(h + 20, (uint32_t)n);
    return h + HEADER_BYTES;
}

/* Tag (and, in encryption mode, encrypt) the frame frame_begin started, and send it whole. */
static int frame_send(Lane *l, int64_t n) {
    uint8_t *h = l->out, *payload = h + HEADER_BYTES, *tag = payload + n;
    uint8_t nonce[12];
    nonce_of(l->sent++, nonce);
    if (l->mode == MODE_MAC)
        crypto_aead_chacha20poly1305_ietf_encrypt_detached(payload, tag, NULL, payload, 0, h, HEADER_BYTES + n, NULL,
                                                           nonce, l->send_key);
    else if (l->mode == MODE_ENCRYPT)
        crypto_aead_chacha20poly1305_ietf_encrypt_detached(payload, tag, NULL, payload, n, h, HEADER_BYTES, NULL,
                                                           nonce, l->send_key);
    else
        memset(tag, 0, TAG_BYTES);
    return send_all(l->fd, h, HEADER_BYTES + n + TAG_BYTES);
}

/* Send one frame whose payload is a followed by b (either may be empty). */
int lane_send(void *handle, int kind, int format, uint64_t step, uint32_t seq, const void *a, int64_t na,
              const void *b, int64_t nb) {
    Lane *l = handle;
    uint8_t *payload = frame_begin(l, kind, format, step, seq, na + nb);
    if (!payload) return ERR_TOO_BIG;
    if (na) memcpy(payload, a, (size_t)na);
    if (nb) memcpy(payload + na, b, (size_t)nb);
    return frame_send(l, na + nb);
}

/* --- int8 payloads: the same float operations, in the same order, as wire.py's sync_payload,
 * _dequantized and add_sync_payload (built with -ffp-contract=off: no fused multiply-add), so
 * ranks that sum in C and ranks that sum in Python hold the same bits. */

static int64_t q8_bytes(int64_t n) { return n + n / Q8_BLOCK * 4; }

/* q (n,) int8 and scales (n / Q8_BLOCK,) of x (n,), n a multiple of Q8_BLOCK. A block holding a
 * NaN or an infinity gets a non-finite scale (which every receiver refuses) and zeros. */
void lane_quantize_q8(const float *x, int64_t n, int8_t *q, float *scales) {
    for (int64_t b = 0; b < n / Q8_BLOCK; b++) {
        const float *v = x + b * Q8_BLOCK;
        /* the block's absmax as the largest |value|'s bits: for non-negative floats the integer
         * order is the float order, and a NaN's bits exceed infinity's (an integer max vectorizes) */
        int32_t top = 0;
        for (int i = 0; i < Q8_BLOCK; i++) {
            int32_t bits;
            memcpy(&bits, v + i, 4);
            bits &= 0x7fffffff;
            top = bits > top ? bits : top;
        }
        float amax;
        memcpy(&amax, &top, 4);
        float scale = amax / Q8_LEVELS;
        if (scale < FLT_MIN) scale = FLT_MIN;  /* an all-zero block: its values stay exactly 0 */
        scales[b] = scale;
        int8_t *out = q + b * Q8_BLOCK;
        if (!isfinite(scale)) {
            memset(out, 0, Q8_BLOCK);
            continue;
        }
        /* |r| <= 127 (1 + 2^-24)^2 < 127.5: the clamp to [-127, 127] wire.py applies never bites */
        for (int i = 0; i < Q8_BLOCK; i++) {
            const float r = v[i] / scale;
            /* to nearest, ties to even (torch.round) for |r| < 2^22 in the default rounding mode:
             * adding 1.5 * 2^23 leaves no fraction bits. Unlike rintf, it vectorizes. */
            out[i] = (int8_t)(int32_t)((r + 12582912.0f) - 12582912.0f);
        }
    }
}

/* x (n,) = the values of an int8 payload (n values, then the scales). */
static void q8_load(const uint8_t *payload, float *x, int64_t n) {
    const int8_t *q = (const int8_t *)payload;
    const float *scales = (const float *)(payload + n);
    for (int64_t b = 0; b < n / Q8_BLOCK; b++) {
        const float scale = scales[b];
        for (int i = 0; i < Q8_BLOCK; i++) x[b * Q8_BLOCK + i] = (float)q[b * Q8_BLOCK + i] * scale;
    }
}

/* x (n,) += the values of an int8 payload, each rounded before the add. */
static void q8_add(const uint8_t *payload, float *x, int64_t n) {
    const int8_t *q = (const int8_t *)payload;
    const float *scales = (const float *)(payload + n);
    for (int64_t b = 0; b < n / Q8_BLOCK; b++) {
        const float scale = scales[b];
        for (int i = 0; i < Q8_BLOCK; i++) {
            const float value = (float)q[b * Q8_BLOCK + i] * scale;
            x[b * Q8_BLOCK + i] = x[b * Q8_BLOCK + i] + value;
        }
    }
}

/* Whether the last frame received is an int8 payload of n values with finite scales. */
static int q8_valid(const Lane *l, int64_t n) {
    if (l->format != FORMAT_I8 || l->length != q8_bytes(n)) return 0;
    const float *scales = (const float *)(l->in + HEADER_BYTES + n);
    for (int64_t b = 0; b < n / Q8_BLOCK; b++)
        if (!isfinite(scales[b])) return 0;
    return 1;
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

/* Read until `want` bytes of the frame are in: spin (non-blocking reads) for spin_us, then
 * block in poll until timeout_ms (from the call's start). */
static int fill(Lane *l, int64_t want, double start, int timeout_ms, int spin_us) {
    while (l->have < want) {
        const ssize_t k = recv(l->fd, l->in + l->have, (size_t)(want - l->have), MSG_DONTWAIT);
        if (k > 0) {
            l->have += k;
            continue;
        }
        if (k == 0) return ERR_CLOSED;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return ERR_CLOSED;
        const double elapsed = now_us() - start;
        if (elapsed < spin_us) continue;
        const int left = timeout_ms - (int)(elapsed / 1000);
        if (left <= 0) return ERR_TIMEOUT;
        struct pollfd r = {l->fd, POLLIN, 0};
        if (poll(&r, 1, left) < 0 && errno != EINTR) return ERR_CLOSED;
    }
    return 0;
}

/* Read the next whole frame and check its tag: its payload length, or an error code; on success
 * lane_kind/step/seq/payload describe it. */
static int64_t read_frame(Lane *l, double start, int timeout_ms, int spin_us) {
    int rc = fill(l, HEADER_BYTES, start, timeout_ms, spin_us);
    if (rc) return rc;
    const uint8_t *h = l->in;
    if (memcmp(h, "EDL1", 4) != 0 || h[5] != l->mode) return ERR_FORMAT;
    const int64_t n = get_u32(h + 20);
    if (n > l->capacity && lane_reserve(l, n)) return ERR_TOO_BIG;
    h = l->in;
    rc = fill(l, HEADER_BYTES + n + TAG_BYTES, start, timeout_ms, spin_us);
    if (rc) return rc;
    uint8_t nonce[12];
    nonce_of(l->received, nonce);
    uint8_t *payload = l->in + HEADER_BYTES, *tag = payload + n;
    int bad = 0;
    if (l->mode == MODE_MAC)
        bad = crypto_aead_chacha20poly1305_ietf_decrypt_detached(payload, NULL, payload, 0, tag, l->in,
                                                                 HEADER_BYTES + n, nonce, l->recv_key);
    else if (l->mode == MODE_ENCRYPT)
        bad = crypto_aead_chacha20poly1305_ietf_decrypt_detached(payload, NULL, payload, n, tag, l->in,
                                                                 HEADER_BYTES, nonce, l->recv_key);
    l->have = 0;
    if (bad) return ERR_TAG;
    l->received++;
    l->kind = h[4];
    l->format = h[6] | h[7] << 8;
    l->step = get_u64(h + 8);
    l->seq = get_u32(h + 16);
    l->length = n;
    return n;
}

/* Receive the next whole, checked frame. Frames of an earlier (step, seq) are dropped (what a
 * step abandoned left in flight); ABORT and STOP are returned whatever their seq. Returns the
 * payload length, or an error code; on success lane_kind/step/seq/payload describe it. */
int64_t lane_recv(void *handle, uint64_t step, uint32_t seq, int timeout_ms, int spin_us) {
    Lane *l = handle;
    const double start = now_us();
    for (;;) {
        const int64_t n = read_frame(l, start, timeout_ms, spin_us);
        if (n < 0) return n;
        if (l->kind == KIND_STOP || (l->kind == KIND_ABORT && l->step >= step)) return n;
        if (l->step < step || (l->step == step && l->seq < seq) || l->kind == KIND_ABORT) continue;  /* stale */
        if (l->step != step || l->seq != seq) return ERR_ORDER;
        return n;
    }
}

/* A rank between steps: the next frame of a step after `after_step` (the hub's next STEP, or an
 * ABORT of a step this rank never began), or a STOP; what is left of steps up to `after_step`
 * (an abandoned step's frames, an ABORT of a step that had already ended here) is dropped.
 * Returns as lane_recv does. */
int64_t lane_recv_next(void *handle, uint64_t after_step, int timeout_ms, int spin_us) {
    Lane *l = handle;
    const double start = now_us();
    for (;;) {
        const int64_t n = read_frame(l, start, timeout_ms, spin_us);
        if (n < 0 || l->kind == KIND_STOP || l->step > after_step) return n;
    }
}

/* out (n,) = a + b, float32: the two-rank exchange's sum (the same bits on both ranks, since
 * float addition of two terms commutes). */
void lane_add_f32(const float *a, const float *b, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* acc (n,) += the last received payload read as float32. */
void lane_accumulate_f32(void *handle, float *acc, int64_t n) {
    const float *b = (const float *)lane_payload(handle);
    for (int64_t i = 0; i < n; i++) acc[i] += b[i];
}

/* One allreduce of a rank in one call: send own (n floats) as a `kind` frame, receive the
 * answer: a PARTIAL (the two-rank exchange) gives out = own + theirs (the same bits on both
 * ranks: float addition of two terms commutes), a REDUCED (the star's sum) is copied to out.
 * Returns 0, or an error code: ERR_TIMEOUT once the frame was sent (go on with lane_recv and
 * lane_finish_f32), ERR_CONTROL for an ABORT or STOP (lane_kind says which). */
int lane_finish_f32(void *handle, const float *own, float *out, int64_t n) {
    Lane *l = handle;
    if (l->kind != KIND_PARTIAL && l->kind != KIND_REDUCED) return ERR_CONTROL;
    if (l->length != n * 4 || l->format != FORMAT_F32) return ERR_FORMAT;
    const float *theirs = (const float *)lane_payload(handle);
    if (l->kind == KIND_PARTIAL) lane_add_f32(own, theirs, out, n);
    else memcpy(out, theirs, (size_t)n * 4);
    return 0;
}

int lane_exchange_f32(void *handle, int kind, uint64_t step, uint32_t seq, const float *own, float *out, int64_t n,
                      int timeout_ms, int spin_us) {
    int rc = lane_send(handle, kind, FORMAT_F32, step, seq, own, n * 4, NULL, 0);
    if (rc) return rc;
    const int64_t got = lane_recv(handle, step, seq, timeout_ms, spin_us);
    if (got < 0) return (int)got;
    return lane_finish_f32(handle, own, out, n);
}

/* The step the next lane_allreduce_f32 calls belong to, and how long each waits at most before
 * it returns ERR_TIMEOUT to its caller (who checks heartbeats and cancellation, then goes on
 * with lane_recv and lane_finish_f32), spinning spin_us first. */
void lane_begin(void *handle, uint64_t step, int slice_ms, int spin_us) {
    Lane *l = handle;
    l->current_step = step, l->slice_ms = slice_ms, l->spin_us = spin_us;
}

/* lane_exchange_f32 in place, in the step of lane_begin: x (n floats) is sent as a PARTIAL and
 * becomes the sum. Four arguments: each one costs ctypes about half a microsecond. */
int lane_allreduce_f32(void *handle, float *x, int64_t n, uint32_t seq) {
    Lane *l = handle;
    return lane_exchange_f32(handle, KIND_PARTIAL, l->current_step, seq, x, x, n, l->slice_ms, l->spin_us);
}

/* lane_finish_f32 for an int8 payload of n values, in place: x holds this rank's own partial
 * as it was sent (dequantized). A PARTIAL (the exchange) adds the peer's values to it, a
 * REDUCED (the star's sum) replaces it. */
int lane_finish_q8(void *handle, float *x, int64_t n) {
    Lane *l = handle;
    if (l->kind != KIND_PARTIAL && l->kind != KIND_REDUCED) return ERR_CONTROL;
    if (!q8_valid(l, n)) return ERR_FORMAT;
    if (l->kind == KIND_PARTIAL) q8_add(lane_payload(handle), x, n);
    else q8_load(lane_payload(handle), x, n);
    return 0;
}

/* lane_allreduce_f32 with an int8 payload (n a multiple of Q8_BLOCK): x is quantized into the
 * frame and replaced by what was sent, dequantized; then the answer is added (a PARTIAL: both
 * ranks hold deq(hub's) + deq(worker's), the bits of wire.sum_payloads) or taken (a REDUCED).
 * On ERR_TIMEOUT x already holds the own term: go on with lane_recv and lane_finish_q8. */
int lane_allreduce_q8(void *handle, float *x, int64_t n, uint32_t seq) {
    Lane *l = handle;
    if (n % Q8_BLOCK) return ERR_FORMAT;
    uint8_t *payload = frame_begin(l, KIND_PARTIAL, FORMAT_I8, l->current_step, seq, q8_bytes(n));
    if (!payload) return ERR_TOO_BIG;
    lane_quantize_q8(x, n, (int8_t *)payload, (float *)(payload + n));
    q8_load(payload, x, n);
    int rc = frame_send(l, q8_bytes(n));
    if (rc) return rc;
    const int64_t got = lane_recv(handle, l->current_step, seq, l->slice_ms, l->spin_us);
    if (got < 0) return (int)got;
    return lane_finish_q8(handle, x, n);
}

/* The hub of a star (3+ ranks): one lane per worker rank, in rank order. An allreduce waits on
 * every worker's PARTIAL of (step, seq) at once (a poll over their sockets, spinning spin_us
 * first as lane_recv does), each frame read whole into its own lane's buffer and its tag checked
 * before anything of it is used; then rank 0's partial and the workers' are summed in rank order
 * (x += rank 1's, then rank 2's, ...: the bits of the Python star and of ZeroMQ), and the sum is
 * sent to every worker as REDUCED. The state of a wait survives a return: a call that returns
 * ERR_TIMEOUT keeps the frames it has (and what it read of the others), and the next call with
 * the same (step, seq) goes on from there; x is untouched until every partial is in. */
#define MAX_WORKERS 64

typedef struct {
    int count;
    Lane *lanes[MAX_WORKERS];  /* rank r's lane at r - 1 */
    uint64_t current_step;
    int slice_ms, spin_us;
    uint64_t step;   /* the allreduce under way: its (step, seq), and which lanes have their frame */
    uint32_t seq;
    uint64_t have;   /* bit i: lanes[i]'s PARTIAL is in its buffer, checked */
    int failed;      /* the lane index of the last error (-1: none) */
} Hub;

void *lane_hub_new(void *const *lanes, int count) {
    if (count < 1 || count > MAX_WORKERS) return NULL;
    Hub *h = calloc(1, sizeof(Hub));
    if (!h) return NULL;
    h->count = count;
    for (int i = 0; i < count; i++) h->lanes[i] = lanes[i];
    h->failed = -1;
    return h;
}

void lane_hub_free(void *handle) { free(handle); }

/* As lane_begin, for the hub's allreduces. */
void lane_hub_begin(void *handle, uint64_t step, int slice_ms, int spin_us) {
    Hub *h = handle;
    h->current_step = step, h->slice_ms = slice_ms, h->spin_us = spin_us;
}

/* Lanes (bit i: rank i + 1) whose partial of the allreduce under way has not come yet. */
uint64_t lane_hub_pending(void *handle) {
    Hub *h = handle;
    const uint64_t all = h->count == 64 ? ~(uint64_t)0 : ((uint64_t)1 << h->count) - 1;
    return all & ~h->have;
}

/* The lane index (rank - 1) whose frame or socket gave the last error, -1 for none. */
int lane_hub_failed(void *handle) { return ((Hub *)handle)->failed; }

/* One non-blocking attempt on lane i: 1 when its PARTIAL of (step, seq) is in and holds n values
 * (float32, or int8 where q8). */
static int hub_take(Hub *h, int i, int64_t n, int q8) {
    Lane *l = h->lanes[i];
    const int64_t got = lane_recv(l, h->step, h->seq, 0, 0);
    if (got == ERR_TIMEOUT) return 0;
    if (got < 0) return (int)got;
    if (l->kind == KIND_ABORT || l->kind == KIND_STOP) return ERR_CONTROL;
    if (l->kind != KIND_PARTIAL) return ERR_FORMAT;
    if (q8 ? !q8_valid(l, n) : (got != n * 4 || l->format != FORMAT_F32)) return ERR_FORMAT;
    h->have |= (uint64_t)1 << i;
    return 1;
}

/* Wait until every worker's PARTIAL of (the hub's step, seq) is in: 0, or an error code. */
static int hub_gather(Hub *h, int64_t n, uint32_t seq, int q8) {
    if (h->step != h->current_step || h->seq != seq) h->step = h->current_step, h->seq = seq, h->have = 0;
    h->failed = -1;
    const double start = now_us();
    struct pollfd fds[MAX_WORKERS];
    int which[MAX_WORKERS];
    for (;;) {
        int waiting = 0;
        for (int i = 0; i < h->count; i++) {
            if (h->have >> i & 1) continue;
            const int rc = hub_take(h, i, n, q8);
            if (rc < 0) {
                h->failed = i;
                return rc;
            }
            if (rc == 0) fds[waiting] = (struct pollfd){h->lanes[i]->fd, POLLIN, 0}, which[waiting++] = i;
        }
        if (!waiting) return 0;
        const double elapsed = now_us() - start;
        if (elapsed < h->spin_us) continue;
        const int left = h->slice_ms - (int)(elapsed / 1000);
        if (left <= 0) return ERR_TIMEOUT;
        if (poll(fds, (nfds_t)waiting, left) < 0 && errno != EINTR) {
            h->failed = which[0];
            return ERR_CLOSED;
        }
    }
}

/* The star's allreduce of x (n floats, rank 0's partial) in place, in the step of lane_hub_begin:
 * 0 with the sum in x, or an error code (lane_hub_failed says whose): ERR_TIMEOUT after the wait's
 * slice (call again with the same seq to go on), ERR_CONTROL for an ABORT or STOP, another code for
 * a broken lane. Same arguments as lane_allreduce_f32, so kernels/step.c calls either. */
int lane_hub_allreduce_f32(void *handle, float *x, int64_t n, uint32_t seq) {
    Hub *h = handle;
    int rc = hub_gather(h, n, seq, 0);
    if (rc) return rc;
    for (int i = 0; i < h->count; i++) lane_accumulate_f32(h->lanes[i], x, n);  /* rank order */
    h->have = 0, h->seq = 0;  /* done: a call with this seq again would start a new wait */
    for (int i = 0; i < h->count; i++) {
        rc = lane_send(h->lanes[i], KIND_REDUCED, FORMAT_F32, h->current_step, seq, x, n * 4, NULL, 0);
        if (rc) {
            h->failed = i;
            return rc;
        }
    }
    return 0;
}

/* lane_hub_allreduce_f32 with int8 payloads (n a multiple of Q8_BLOCK): x (rank 0's partial,
 * exact) plus every worker's values in rank order, quantized once and sent as REDUCED; x
 * becomes what was sent, dequantized, the value every rank then holds (the Python star's bits). */
int lane_hub_allreduce_q8(void *handle, float *x, int64_t n, uint32_t seq) {
    Hub *h = handle;
    if (n % Q8_BLOCK) return ERR_FORMAT;
    int rc = hub_gather(h, n, seq, 1);
    if (rc) return rc;
    for (int i = 0; i < h->count; i++) q8_add(lane_payload(h->lanes[i]), x, n);  /* rank order */
    h->have = 0, h->seq = 0;
    const int64_t bytes = q8_bytes(n);
    uint8_t *first = NULL;
    for (int i = 0; i < h->count; i++) {  /* every frame filled before any is sealed (encrypted in place) */
        uint8_t *payload = frame_begin(h->lanes[i], KIND_REDUCED, FORMAT_I8, h->current_step, seq, bytes);
        if (!payload) {
            h->failed = i;
            return ERR_TOO_BIG;
        }
        if (first) {
            memcpy(payload, first, (size_t)bytes);
        } else {
            first = payload;
            lane_quantize_q8(x, n, (int8_t *)payload, (float *)(payload + n));
            q8_load(payload, x, n);
        }
    }
    for (int i = 0; i < h->count; i++) {
        rc = frame_send(h->lanes[i], bytes);
        if (rc) {
            h->failed = i;
            return rc;
        }
    }
    return 0;
}

/* Benchmark only (bench/lane.py): `iters` back-to-back lane_exchange_f32 calls in C, the time of
 * each in nanoseconds into times_ns: the wire's cost with no Python in the loop. */
int lane_bench_exchange(void *handle, const float *own, float *out, int64_t n, int iters, int64_t *times_ns) {
    for (int i = 0; i < iters; i++) {
        const double start = now_us();
        const int rc = lane_exchange_f32(handle, KIND_PARTIAL, 1, (uint32_t)i + 1, own, out, n, 10000,
                                         ((Lane *)handle)->spin_us);
        if (rc) return rc;
        times_ns[i] = (int64_t)((now_us() - start) * 1e3);
    }
    return 0;
}
