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
#define FORMAT_F32 0 /* worker/comm/wire.py's DTYPES code of float32 */
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

/* Send one frame whose payload is a followed by b (either may be empty). */
int lane_send(void *handle, int kind, int format, uint64_t step, uint32_t seq, const void *a, int64_t na,
              const void *b, int64_t nb) {
    Lane *l = handle;
    const int64_t n = na + nb;
    if (n > l->capacity && lane_reserve(l, n)) return ERR_TOO_BIG;
    uint8_t *h = l->out;
    memcpy(h, "EDL1", 4);
    h[4] = (uint8_t)kind, h[5] = (uint8_t)l->mode, h[6] = (uint8_t)format, h[7] = (uint8_t)(format >> 8);
    put_u64(h + 8, step);
    put_u32(h + 16, seq);
    put_u32(h + 20, (uint32_t)n);
    uint8_t *payload = h + HEADER_BYTES, *tag = payload + n;
    if (na) memcpy(payload, a, (size_t)na);
    if (nb) memcpy(payload + na, b, (size_t)nb);
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

/* Receive the next whole, checked frame. Frames of an earlier (step, seq) are dropped (what a
 * step abandoned left in flight); ABORT and STOP are returned whatever their seq. Returns the
 * payload length, or an error code; on success lane_kind/step/seq/payload describe it. */
int64_t lane_recv(void *handle, uint64_t step, uint32_t seq, int timeout_ms, int spin_us) {
    Lane *l = handle;
    const double start = now_us();
    for (;;) {
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
        if (l->kind == KIND_STOP || (l->kind == KIND_ABORT && l->step >= step)) return n;
        if (l->step < step || (l->step == step && l->seq < seq) || l->kind == KIND_ABORT) continue;  /* stale */
        if (l->step != step || l->seq != seq) return ERR_ORDER;
        return n;
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

/* One non-blocking attempt on lane i: 1 when its PARTIAL of (step, seq) is in and fits n floats. */
static int hub_take(Hub *h, int i, int64_t n) {
    Lane *l = h->lanes[i];
    const int64_t got = lane_recv(l, h->step, h->seq, 0, 0);
    if (got == ERR_TIMEOUT) return 0;
    if (got < 0) return (int)got;
    if (l->kind == KIND_ABORT || l->kind == KIND_STOP) return ERR_CONTROL;
    if (l->kind != KIND_PARTIAL || got != n * 4 || l->format != FORMAT_F32) return ERR_FORMAT;
    h->have |= (uint64_t)1 << i;
    return 1;
}

/* The star's allreduce of x (n floats, rank 0's partial) in place, in the step of lane_hub_begin:
 * 0 with the sum in x, or an error code (lane_hub_failed says whose): ERR_TIMEOUT after the wait's
 * slice (call again with the same seq to go on), ERR_CONTROL for an ABORT or STOP, another code for
 * a broken lane. Same arguments as lane_allreduce_f32, so kernels/step.c calls either. */
int lane_hub_allreduce_f32(void *handle, float *x, int64_t n, uint32_t seq) {
    Hub *h = handle;
    if (h->step != h->current_step || h->seq != seq) h->step = h->current_step, h->seq = seq, h->have = 0;
    h->failed = -1;
    const double start = now_us();
    struct pollfd fds[MAX_WORKERS];
    int which[MAX_WORKERS];
    for (;;) {
        int waiting = 0;
        for (int i = 0; i < h->count; i++) {
            if (h->have >> i & 1) continue;
            const int rc = hub_take(h, i, n);
            if (rc < 0) {
                h->failed = i;
                return rc;
            }
            if (rc == 0) fds[waiting] = (struct pollfd){h->lanes[i]->fd, POLLIN, 0}, which[waiting++] = i;
        }
        if (!waiting) break;
        const double elapsed = now_us() - start;
        if (elapsed < h->spin_us) continue;
        const int left = h->slice_ms - (int)(elapsed / 1000);
        if (left <= 0) return ERR_TIMEOUT;
        if (poll(fds, (nfds_t)waiting, left) < 0 && errno != EINTR) {
            h->failed = which[0];
            return ERR_CLOSED;
        }
    }
    for (int i = 0; i < h->count; i++) lane_accumulate_f32(h->lanes[i], x, n);  /* rank order */
    h->have = 0, h->seq = 0;  /* done: a call with this seq again would start a new wait */
    for (int i = 0; i < h->count; i++) {
        const int rc = lane_send(h->lanes[i], KIND_REDUCED, FORMAT_F32, h->current_step, seq, x, n * 4, NULL, 0);
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
