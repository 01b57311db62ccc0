"""The data plane's lanes: one pre-connected TCP socket per worker rank to the hub, for the
allreduces of a step (``worker.comm.collective`` uses them when every rank has one).

Why not ZeroMQ for these: a 2-rank allreduce there cost ~300 µs, mostly software (its I/O
thread on both ends, CURVE, thread wake-ups). A lane is driven by the thread that computes:
``kernels/lane.c`` frames, authenticates, sends, receives into a buffer it keeps and sums, in
one call; it spins briefly before it sleeps where a rank has a core to itself.

Security, bound to the cluster token as ZeroMQ CURVE was:

- Handshake (``client_handshake``/``server_handshake``): the rank sends a fresh nonce, the hub
  answers with its own and an HMAC-SHA256 of both under a key derived from the token, the rank
  checks it and answers with its HMAC, the hub checks that and confirms with one byte once the
  lane is registered (so a step that follows the rank's join already uses it). Neither side sends anything keyed before it has seen the
  other prove the token; the session keys (one per direction) are HMACs of the transcript, so
  each connection has its own.
- Every frame carries a ChaCha20-Poly1305 tag (libsodium) under its direction's key, its nonce
  the frame count: a frame forged, altered, replayed or reordered breaks the lane. Integrity is
  the default; ``encrypt`` also encrypts the payloads (``--data-plane-encryption``).

The C source is compiled at first use like ``worker.kernels.native``'s kernels (cached by its hash) and
linked with libsodium (``libsodium-dev``, installed by ``deploy/install-system-deps.sh``); where
it cannot be built, ranks fall back to ZeroMQ for their allreduces and a log line says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from worker.comm.wire import DTYPE_CODES, Kind, decode_lane_step
from worker.kernels.native import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[1] / "kernels" / "lane.c"
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off")  # no fused multiply-add: int8 sums match wire.py's
LIBS = ("-lsodium", "-lm")
# "0": this process has no lanes at all (a hub uses ZeroMQ, a rank refuses the lane a hub
# offers). Unset or anything else: a hub uses lanes unless told otherwise (serve --no-lanes).
# On by default: at 2 ranks on a calm machine lanes beat ZeroMQ in every served comparison
# (1.42-3.33x with the native step, docs/benchmarks.md#native-decode-step), and the whole test
# suite passes on them.
DISABLE_ENV = "EDGELLM_LANE"
SPIN_ENV = "EDGELLM_SPIN_US"
# µs a lane spins on its socket before it sleeps, where each rank of the host has a core: a wake-up
# from poll() costs 30-60 µs here, more than most waits of an allreduce
DEFAULT_SPIN_US = 1000
INITIAL_CAPACITY = 1 << 16  # payload bytes; the buffers grow to what a frame needs
HANDSHAKE_TIMEOUT_S = 5.0
MAX_HANDSHAKES = 16  # concurrent handshakes the hub runs (an idle intruder holds one for the timeout)

MODES = {"none": 0, "mac": 1, "encrypt": 2}  # "none" is for the benchmark's wire baseline only
ERRORS = {-1: "timed out", -2: "the peer closed the connection", -3: "a frame failed its authentication tag",
          -4: "a frame does not follow the lane format", -5: "a frame is too large", -6: "send failed",
          -7: "a frame is out of order", -8: "a control frame arrived"}
TIMEOUT, FORMAT, CONTROL = -1, -4, -8
# The C calls of an allreduce in place, by sync dtype (worker.comm.wire): a rank's end, the star's hub
IN_PLACE = {"fp32": "lane_allreduce_f32", "int8": "lane_allreduce_q8"}
HUB_IN_PLACE = {"fp32": "lane_hub_allreduce_f32", "int8": "lane_hub_allreduce_q8"}
NO_FORMAT = 0xFFFF  # a frame without tensors

_HELLO = struct.Struct("<4sBI32s")  # magic, version, rank, rank's nonce
_REPLY = struct.Struct("<4sBBH32s")  # magic, mode, ranks on the rank's host, 0, hub's nonce (+ 32-byte MAC)
_MAC = 32
_ADOPTED = b"\x01"  # hub -> rank, last: the lane is registered
VERSION = 1


class LaneError(RuntimeError):
    """The lane cannot carry on (closed, timed out, a frame failed its check)."""

    def __init__(self, code: int, what: str = ""):
        self.code = code
        super().__init__(f"{what}{': ' if what else ''}{ERRORS.get(code, f'error {code}')}")


_lock = threading.Lock()
_library: list[ctypes.CDLL | str] = []


def library_path() -> Path:
    cc = os.environ.get("CC", "cc")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *FLAGS, *LIBS)).encode()).hexdigest()[:16]
    return cache_dir() / f"lane-{digest}.so"


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), *LIBS, "-o", tmp], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build() -> Path:
    """Compile the library into the cache now (the image build does this, where a compiler is)."""
    target = library_path()
    _build(target)
    return target


def _open() -> ctypes.CDLL | str:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    target = library_path()
    try:
        if not target.exists():
            if shutil.which(os.environ.get("CC", "cc")) is None:
                return f"no C compiler and no build at {target}"
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{getattr(exc, 'stderr', '') or exc}".strip()
    p, i64, u64, u32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
    for name, restype, argtypes in (
            ("lane_init", c_int, []),
            ("lane_new", p, [c_int, p, p, c_int, i64]),
            ("lane_free", None, [p]),
            ("lane_reserve", c_int, [p, i64]),
            ("lane_payload", p, [p]),
            ("lane_kind", c_int, [p]),
            ("lane_format", c_int, [p]),
            ("lane_step", u64, [p]),
            ("lane_seq", u32, [p]),
            ("lane_send", c_int, [p, c_int, c_int, u64, u32, p, i64, p, i64]),
            ("lane_recv", i64, [p, u64, u32, c_int, c_int]),
            ("lane_recv_next", i64, [p, u64, c_int, c_int]),
            ("lane_add_f32", None, [p, p, p, i64]),
            ("lane_accumulate_f32", None, [p, p, i64]),
            ("lane_finish_f32", c_int, [p, p, p, i64]),
            ("lane_begin", None, [p, u64, c_int, c_int]),
            ("lane_allreduce_f32", c_int, [p, p, i64, u32]),
            ("lane_bench_exchange", c_int, [p, p, p, i64, c_int, p]),
            ("lane_exchange_f32", c_int, [p, c_int, u64, u32, p, p, i64, c_int, c_int]),
            ("lane_hub_new", p, [p, c_int]),
            ("lane_hub_free", None, [p]),
            ("lane_hub_begin", None, [p, u64, c_int, c_int]),
            ("lane_hub_pending", u64, [p]),
            ("lane_hub_failed", c_int, [p]),
            ("lane_hub_allreduce_f32", c_int, [p, p, i64, u32]),
            ("lane_quantize_q8", None, [p, i64, p, p]),
            ("lane_finish_q8", c_int, [p, p, i64]),
            ("lane_allreduce_q8", c_int, [p, p, i64, u32]),
            ("lane_hub_allreduce_q8", c_int, [p, p, i64, u32])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.lane_init() != 0:
        return "libsodium failed to initialise"
    return lib


def enabled_by_default() -> bool:
    """Whether a hub not told either way uses lanes: yes, unless ``EDGELLM_LANE=0``."""
    return os.environ.get(DISABLE_ENV) != "0"


def library() -> ctypes.CDLL | None:
    """The lane library, or None where it cannot be built or loaded (logged once)."""
    with _lock:
        if not _library:
            _library.append(_open())
            if isinstance(_library[0], str):
                log.info("data-plane lanes off (%s): allreduces go over ZeroMQ", _library[0])
    lib = _library[0]
    return None if isinstance(lib, str) else lib


def spin_us(ranks_on_host: int) -> int:
    """µs to spin before sleeping: ``$EDGELLM_SPIN_US``, else ``DEFAULT_SPIN_US`` where this host
    has a core to spare beyond one per rank, and 0 otherwise. With exactly a core per rank the
    OS, the coordinator's other threads or any other load take a spinning rank's core away: on 2
    cores with 2 ranks, spinning made a step's communication 14x slower (bench/netns_comm.py)
    and served decode 8x slower (bench/tp_vs_dllama.py) than sleeping at once."""
    if configured := os.environ.get(SPIN_ENV):
        try:
            return max(0, int(float(configured)))
        except ValueError:
            raise ValueError(f"{SPIN_ENV} must be a number of microseconds") from None
    return DEFAULT_SPIN_US if (os.cpu_count() or 1) > ranks_on_host else 0


# --- handshake -------------------------------------------------------------------------------------

def _base_key(token: str) -> bytes:
    return hashlib.sha256(f"edgellm/lane/{token}".encode()).digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def _session_keys(base: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(rank -> hub, hub -> rank) keys of one connection."""
    session = _mac(base, b"keys", transcript)
    return _mac(session, b"rank->hub"), _mac(session, b"hub->rank")


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection during the handshake")
        data += chunk
    return data


def client_handshake(sock: socket.socket, token: str, rank: int) -> tuple[bytes, bytes, int, int]:
    """Rank side: (send key, receive key, mode, ranks on this host). Raises ``PermissionError``
    when the hub does not prove the token."""
    base = _base_key(token)
    hello = _HELLO.pack(b"EDLH", VERSION, rank, secrets.token_bytes(32))
    sock.sendall(hello)
    reply = _read_exactly(sock, _REPLY.size)
    hub_mac = _read_exactly(sock, _MAC)
    magic, mode, ranks_on_host, _, _ = _REPLY.unpack(reply)
    if magic != b"EDLW" or not hmac.compare_digest(hub_mac, _mac(base, b"hub", hello, reply)):
        raise PermissionError("the hub's lane did not prove the cluster token")
    if mode not in (MODES["mac"], MODES["encrypt"]):
        raise PermissionError(f"the hub asked for lane mode {mode}")
    sock.sendall(_mac(base, b"rank", hello, reply))
    to_hub, to_rank = _session_keys(base, hello + reply)
    if _read_exactly(sock, 1) != _ADOPTED:  # the hub holds the lane: a step may use it at once
        raise PermissionError("the hub did not confirm the lane")
    return to_hub, to_rank, mode, ranks_on_host


def server_handshake(sock: socket.socket, token: str, mode: int,
                     ranks_on_host: Callable[[int], int]) -> tuple[int, bytes, bytes]:
    """Hub side: (rank, send key, receive key). Raises ``PermissionError`` on a peer without the token."""
    base = _base_key(token)
    hello = _read_exactly(sock, _HELLO.size)
    magic, version, rank, _ = _HELLO.unpack(hello)
    if magic != b"EDLH" or version != VERSION:
        raise PermissionError("not a lane hello")
    reply = _REPLY.pack(b"EDLW", mode, min(ranks_on_host(rank), 0xFF), 0, secrets.token_bytes(32))
    sock.sendall(reply + _mac(base, b"hub", hello, reply))
    if not hmac.compare_digest(_read_exactly(sock, _MAC), _mac(base, b"rank", hello, reply)):
        raise PermissionError("a lane peer without the cluster token")
    to_hub, to_rank = _session_keys(base, hello + reply)
    return rank, to_rank, to_hub


# --- one lane ----------------------------------------------------------------------------------------

class Lane:
    """One authenticated connection, used by one thread at a time (the one that computes)."""

    def __init__(self, lib: ctypes.CDLL, sock: socket.socket, send_key: bytes, recv_key: bytes, mode: int,
                 spin: int):
        sock.settimeout(None)  # blocking: the C side reads with MSG_DONTWAIT and polls itself
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # (tests join lanes by socketpair)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lib, self.sock, self.mode, self.spin_us = lib, sock, mode, spin
        self._h = lib.lane_new(sock.fileno(), send_key, recv_key, mode, INITIAL_CAPACITY)
        if not self._h:
            raise MemoryError("cannot allocate a lane")
        self.kind = 0  # of the last frame received
        self.format = NO_FORMAT  # the wire dtype code of its first tensor
        self.step = self.seq = 0  # its step and seq (set by ``recv_next`` and ``refresh``)

    def send(self, kind: int, step: int, seq: int, tensors: list[torch.Tensor] = ()) -> None:  # type: ignore[assignment]
        """One frame carrying ``tensors``' bytes back to back (at most two, contiguous); its
        header names the first one's dtype."""
        parts = [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors] + [(None, 0)] * (2 - len(tensors))
        fmt = DTYPE_CODES[tensors[0].dtype] if tensors else NO_FORMAT
        rc = self._lib.lane_send(self._h, kind, fmt, step, seq, parts[0][0], parts[0][1], parts[1][0], parts[1][1])
        if rc:
            raise LaneError(rc)

    def recv(self, step: int, seq: int, timeout_ms: int) -> int:
        """The next frame of ``(step, seq)`` (earlier ones dropped) or a control frame whatever its
        seq: its byte count (``kind`` says which it was); -1 after ``timeout_ms`` (the frame is
        still read on at the next call)."""
        got = self._lib.lane_recv(self._h, step, seq, timeout_ms, self.spin_us)
        if got == TIMEOUT:
            return -1
        if got < 0:
            raise LaneError(got)
        self.kind = self._lib.lane_kind(self._h)
        self.format = self._lib.lane_format(self._h)
        return got

    def recv_next(self, after_step: int, timeout_ms: int, spin: bool = True) -> int:
        """A rank between steps: the next frame of a step after ``after_step`` (the hub's STEP) or
        a STOP, what is left of earlier steps dropped; its byte count, or -1 after ``timeout_ms``
        (spinning first where ``spin``, as ``recv`` does)."""
        got = self._lib.lane_recv_next(self._h, after_step, timeout_ms, self.spin_us if spin else 0)
        if got == TIMEOUT:
            return -1
        if got < 0:
            raise LaneError(got)
        self.refresh()
        return got

    def exchange_f32(self, kind: int, step: int, seq: int, own: torch.Tensor, out: torch.Tensor,
                     timeout_ms: int) -> bool:
        """Send ``own`` (float32, contiguous) as a ``kind`` frame and receive the answer: a PARTIAL
        gives ``out = own + theirs``, a REDUCED is copied to ``out``. False when it timed out
        after sending (go on with ``recv`` and ``finish_f32``); ``LaneError`` on a control frame
        (``kind`` says which) or a broken lane."""
        rc = self._lib.lane_exchange_f32(self._h, kind, step, seq, own.data_ptr(), out.data_ptr(), own.numel(),
                                         timeout_ms, self.spin_us)
        if rc == TIMEOUT:
            return False
        self.kind = self._lib.lane_kind(self._h)
        if rc:
            raise LaneError(rc)
        return True

    def refresh(self) -> None:
        """Read ``kind``, ``format``, ``step`` and ``seq`` of the last frame from C (after an
        ``allreduce_f32`` call)."""
        self.kind = self._lib.lane_kind(self._h)
        self.format = self._lib.lane_format(self._h)
        self.step, self.seq = self._lib.lane_step(self._h), self._lib.lane_seq(self._h)

    def begin(self, step: int, slice_ms: int) -> None:
        """The step of the next in-place allreduce calls; each waits ``slice_ms`` at most."""
        self._lib.lane_begin(self._h, step, slice_ms, self.spin_us)

    def allreduce_in_place(self, sync: str = "fp32") -> Callable[[int, int, int], int]:
        """The C call ``(x pointer, floats, seq) -> 0 or an error code``: the exchange in place, in
        ``begin``'s step, with no Python wrapper in between (the hot path of a step). ``sync``:
        the payload, fp32 (``lane_allreduce_f32``: ``exchange_f32`` in place) or int8
        (``lane_allreduce_q8``: blocks of 32 with a float32 scale, ``wire.sync_payload``'s format)."""
        return functools.partial(getattr(self._lib, IN_PLACE[sync]), ctypes.c_void_p(self._h))

    def native_allreduce(self, sync: str = "fp32") -> tuple[int, int]:
        """(address of the C call of ``allreduce_in_place(sync)``, this lane's handle), for C
        callers (``kernels/step.c``), which call it as ``fn(handle, x, floats, seq)``."""
        fn = ctypes.cast(getattr(self._lib, IN_PLACE[sync]), ctypes.c_void_p).value
        assert fn is not None and self._h
        return fn, self._h

    def finish_in_place(self, sync: str, x: torch.Tensor) -> None:
        """What an in-place allreduce of ``x`` that timed out does with the answer, after a
        ``recv`` that got it: ``x`` is then the sum (fp32: ``x`` still the own partial; int8: ``x``
        what the call sent, dequantized, as it leaves it)."""
        if sync == "int8":
            rc = self._lib.lane_finish_q8(self._h, x.data_ptr(), x.numel())
        else:
            rc = self._lib.lane_finish_f32(self._h, x.data_ptr(), x.data_ptr(), x.numel())
        if rc:
            raise LaneError(rc)

    def bench_exchange(self, own: torch.Tensor, out: torch.Tensor, iters: int) -> list[float]:
        """Benchmark only: ``iters`` exchanges (step 1, seq 1..iters) in a C loop; seconds each."""
        self._lib.lane_begin(self._h, 1, 10_000, self.spin_us)
        times = torch.zeros(iters, dtype=torch.int64)
        rc = self._lib.lane_bench_exchange(self._h, own.data_ptr(), out.data_ptr(), own.numel(), iters,
                                           times.data_ptr())
        if rc:
            raise LaneError(rc)
        return [t * 1e-9 for t in times.tolist()]

    def finish_f32(self, own: torch.Tensor, out: torch.Tensor) -> None:
        """What ``exchange_f32`` does with the answer, after a ``recv`` that got it."""
        rc = self._lib.lane_finish_f32(self._h, own.data_ptr(), out.data_ptr(), own.numel())
        if rc:
            raise LaneError(rc)

    def accumulate_f32(self, acc: torch.Tensor) -> None:
        """``acc +=`` the received payload as float32, in place (after ``recv``)."""
        self._lib.lane_accumulate_f32(self._h, acc.data_ptr(), acc.numel())

    def step_frame(self, nbytes: int) -> list[torch.Tensor]:
        """[spans, hidden] of the STEP frame just received (``nbytes``), copied out of the buffer."""
        return decode_lane_step(self._lib.lane_payload(self._h), nbytes)

    def send_step(self, step: int, flags: int, layout: bytes, hidden: torch.Tensor) -> None:
        """A STEP frame: ``layout`` (``wire.lane_step_layout``) then ``hidden``'s bytes (contiguous)."""
        rc = self._lib.lane_send(self._h, Kind.STEP, DTYPE_CODES[torch.int64], step, flags, layout, len(layout),
                                 hidden.data_ptr(), hidden.numel() * hidden.element_size())
        if rc:
            raise LaneError(rc)

    def payload(self, nbytes: int) -> torch.Tensor:
        """The received payload's bytes as a uint8 tensor viewing the lane's buffer: valid until
        the next receive."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        buffer = (ctypes.c_uint8 * nbytes).from_address(self._lib.lane_payload(self._h))
        return torch.frombuffer(buffer, dtype=torch.uint8)

    def close(self) -> None:
        if self._h:
            self._lib.lane_free(self._h)
            self._h = None
        self.sock.close()


class StarLanes:
    """The hub's end of a star (3+ ranks) in C: the worker ranks' lanes, and one call that waits
    for all their partials at once, sums them with rank 0's in rank order and sends the sum back
    (``lane_hub_allreduce_f32``, ``lane_hub_allreduce_q8``). It holds the lanes' handles: close it before any of them."""

    def __init__(self, lib: ctypes.CDLL, lanes: dict[int, Lane]):
        self._lib, self.ranks = lib, sorted(lanes)
        if self.ranks != list(range(1, len(self.ranks) + 1)):
            raise ValueError(f"a star needs the lanes of ranks 1..N-1, got {self.ranks}")
        self._lanes = [lanes[r] for r in self.ranks]
        self.spin_us = self._lanes[0].spin_us
        handles = (ctypes.c_void_p * len(self._lanes))(*(lane._h for lane in self._lanes))
        self._h = lib.lane_hub_new(handles, len(self._lanes))
        if not self._h:
            raise MemoryError("cannot allocate the hub's star")

    def begin(self, step: int, slice_ms: int) -> None:
        """The step of the next allreduces; each call waits ``slice_ms`` at most."""
        self._lib.lane_hub_begin(self._h, step, slice_ms, self.spin_us)

    def allreduce_in_place(self, sync: str = "fp32") -> Callable[[int, int, int], int]:
        """The C call ``(x pointer, floats, seq) -> 0 or an error code``: the star's sum into x in
        place, in ``begin``'s step, with ``sync`` payloads (fp32 or int8, as ``Lane``'s). After
        ``TIMEOUT`` the same call (same x, same seq) goes on."""
        return functools.partial(getattr(self._lib, HUB_IN_PLACE[sync]), ctypes.c_void_p(self._h))

    def native_allreduce(self, sync: str = "fp32") -> tuple[int, int]:
        """(address of the C call of ``allreduce_in_place(sync)``, this star's handle), for
        ``kernels/step.c``."""
        fn = ctypes.cast(getattr(self._lib, HUB_IN_PLACE[sync]), ctypes.c_void_p).value
        assert fn is not None and self._h
        return fn, self._h

    def pending(self) -> set[int]:
        """The ranks whose partial of the allreduce under way has not come yet."""
        bits = self._lib.lane_hub_pending(self._h)
        return {rank for i, rank in enumerate(self.ranks) if bits >> i & 1}

    def failed(self) -> int | None:
        """The rank whose lane gave the last error code, None for none (a timeout)."""
        index = self._lib.lane_hub_failed(self._h)
        if index < 0:
            return None
        self._lanes[index].refresh()
        return self.ranks[index]

    def close(self) -> None:
        if self._h:
            self._lib.lane_hub_free(self._h)
            self._h = None


def connect(lib: ctypes.CDLL, host: str, port: int, token: str, rank: int, timeout_s: float) -> Lane:
    """Rank side: a lane to the hub's listener, handshake done."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        send_key, recv_key, mode, ranks_on_host = client_handshake(sock, token, rank)
        return Lane(lib, sock, send_key, recv_key, mode, spin_us(ranks_on_host))
    except BaseException:
        sock.close()
        raise


class Listener:
    """The hub's lane port: accepts connections and runs each handshake in a short-lived thread
    (an idle intruder holds one thread for ``HANDSHAKE_TIMEOUT_S``, never the engine). Lanes that
    pass wait in ``take`` for the engine thread to adopt them."""

    def __init__(self, lib: ctypes.CDLL, host: str, port: int, token: str, world_size: int, encrypt: bool,
                 ranks_on_host: Callable[[int], int]):
        self._lib, self._token, self._world = lib, token, world_size
        self.mode = MODES["encrypt" if encrypt else "mac"]
        self._ranks_on_host = ranks_on_host
        self._sock = socket.create_server((host, port), backlog=64)
        self.port = self._sock.getsockname()[1]
        self._ready: dict[int, Lane] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._closed = False
        threading.Thread(target=self._accept, name="lane-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                log.warning("refused a data-plane connection: %d handshakes already running", MAX_HANDSHAKES)
                conn.close()
                continue
            threading.Thread(target=self._handshake, args=(conn,), name="lane-handshake", daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            rank, send_key, recv_key = server_handshake(conn, self._token, self.mode, self._ranks_on_host)
            if not 1 <= rank < self._world:
                raise PermissionError(f"rank {rank} is not a worker rank of this cluster")
            lane = Lane(self._lib, conn, send_key, recv_key, self.mode, spin_us(self._ranks_on_host(0)))
            with self._lock:
                old, self._ready[rank] = self._ready.get(rank), lane
            if old is not None:
                old.close()  # never adopted: the rank reconnected before a step needed it
            conn.sendall(_ADOPTED)
        except (OSError, PermissionError, struct.error) as exc:
            log.warning("refused a data-plane connection: %s", exc)
            conn.close()
        finally:
            self._slots.release()

    def take(self) -> dict[int, Lane]:
        """Lanes whose handshake passed since the last call, by rank."""
        with self._lock:
            ready, self._ready = self._ready, {}
        return ready

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._sock.close()
        for lane in self.take().values():
            lane.close()
