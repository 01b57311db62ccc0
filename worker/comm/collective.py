"""The star allreduce over ZeroMQ (TPI-LLM): every rank sends its partial to the hub, the
hub sums them and sends the sum back. Two hops whatever the number of ranks; at two ranks one,
since the hub sends its own partial while the worker sends its own and both sides sum.

The hub is rank 0 and lives in the coordinator; it binds a ROUTER socket. Each worker
rank connects a DEALER whose identity is its rank. All collectives of the project go
through :meth:`StarHub.allreduce` and :meth:`StarRank.allreduce`.

Every connection is ZeroMQ CURVE, with keys derived from the cluster token: a peer without
the token fails the handshake (the hub's ZAP handler refuses its key) and never gets to send
a frame; the frames of those who pass are encrypted and authenticated.

Payloads travel in the cluster's sync dtype (``worker.comm.wire.SYNC_DTYPES``): fp32 is exact (the
model's own dtype), fp16/bf16/int8 cut the bytes; the hub always sums in float32. No extra
copies: tensors are sent from their own memory and received as views of the ZeroMQ frames
(CURVE decrypts into a fresh buffer anyway, so a ``recv_into`` would only add a copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import torch
import zmq
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from worker.comm import lane as lanes
from worker.comm.wire import (
    DTYPES,
    STEP_ALL_LOGITS,
    STEP_ON_LANES,
    Kind,
    Message,
    WireError,
    add_sync_payload,
    check_sync_payload,
    decode_message,
    effective_sync,
    encode_message,
    lane_step_layout,
    split_sync_payload,
    sum_payloads,
    sync_dtype_name,
    sync_payload,
    sync_value,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
# ZeroMQ heartbeats find a peer that vanished without closing its socket (an unplugged Pi).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
LIVENESS_POLL_MS = 200  # how often a waiting allreduce looks at the heartbeat's verdict
CANCEL_POLL_MS = 100  # how often a rank waiting for the hub looks whether it is being stopped
# Frames from this size on are sent zero-copy; smaller ones are copied, which is cheaper than
# pyzmq's zero-copy bookkeeping (measured: a 16 KB message 55 us zero-copy, 6 us copied; 1 MB
# 15 us zero-copy, 300 us copied).
ZERO_COPY_MIN_BYTES = 1 << 16
SPIN_ENV = "EDGELLM_SPIN_US"  # µs a rank spins on its socket before it sleeps in a poll


def default_spin_wait_s() -> float:
    """How long a receive checks its socket without sleeping before it blocks (``$EDGELLM_SPIN_US``,
    default 0). Worth it where each rank has its own cores (a Pi per rank): waking a sleeping
    thread costs more than the wait it covers, e.g. a 2-rank 16 KB star allreduce on loopback,
    p50 536-971 µs spinning 300 µs against 830-2394 µs not. Harmful where ranks share cores
    (``serve --local-workers``; 4 ranks on 2 cores went from 1331-1816 to 1937-2219 µs): the
    spinning thread takes the CPU another rank needs."""
    try:
        return max(0.0, float(os.environ.get(SPIN_ENV, "0"))) * 1e-6
    except ValueError:
        raise CollectiveError(f"{SPIN_ENV} must be a number of microseconds") from None


def _keepalive(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


class CollectiveError(RuntimeError):
    """A peer is gone, too slow, or sent something that does not fit the step."""


def _curve_keypair(token: str, role: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys derived from the cluster token: any 32 bytes are a valid secret."""
    secret = zmq.utils.z85.encode(hashlib.sha256(f"edgellm/{role}/{token}".encode()).digest())
    return zmq.curve_public(secret), secret


class _TokenKeys:
    """ZAP credentials check: only the rank key derived from our token may connect."""

    def __init__(self, token: str):
        self.rank_public = _curve_keypair(token, "rank")[0]

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = hmac.compare_digest(zmq.utils.z85.encode(key) if len(key) == 32 else key, self.rank_public)
        if not allowed:
            log.warning("refused a data-plane peer with a wrong cluster token")
        return allowed


def _kind_name(kind: int) -> str:
    return Kind(kind).name if kind in Kind._value2member_map_ else f"kind {kind}"


def _identity(rank: int) -> bytes:
    return f"rank-{rank}".encode()


def _recv_frames(sock: zmq.Socket, timeout_ms: int, spin_s: float = 0.0,
                 cancelled: threading.Event | None = None) -> list[zmq.Frame] | None:
    """The next multipart message as frames, or None after ``timeout_ms`` or once ``cancelled``
    is set (checked every ``CANCEL_POLL_MS``). For the first ``spin_s`` it checks without
    sleeping (see ``default_spin_wait_s``); then it blocks in a poll."""
    spin_until = time.perf_counter() + spin_s
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if time.perf_counter() >= spin_until:
                break
    deadline = time.monotonic() + timeout_ms / 1000
    while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        if cancelled is not None and cancelled.is_set():
            return None
        if sock.poll(left_ms if cancelled is None else min(left_ms, CANCEL_POLL_MS)):
            return sock.recv_multipart(copy=False)
    return None


def _nbytes(frame: bytes | memoryview | zmq.Frame) -> int:
    return len(frame) if isinstance(frame, zmq.Frame) else memoryview(frame).nbytes


def _send_frames(sock: zmq.Socket, frames: list) -> None:
    """One multipart message: large frames zero-copy (from the tensor's memory), small ones copied."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, zmq.SNDMORE if i < last else 0, copy=_nbytes(frame) < ZERO_COPY_MIN_BYTES)


def _io_threads(world_size: int) -> int:
    """ZeroMQ I/O threads of the hub: CURVE en/decrypts each rank's link in the I/O thread that
    owns it, so with one thread a large payload is encrypted N - 1 times in a row."""
    return max(1, min(world_size - 1, (os.cpu_count() or 1) // 2, 4))


def _in_place(partial: torch.Tensor, sync: str) -> bool:
    """Whether ``partial`` goes through a step's C allreduce in place (``allreduce_``): float32,
    contiguous, and carried in ``sync`` itself (an int8 cluster's narrow payloads travel as fp32,
    in Python)."""
    return partial.dtype == torch.float32 and partial.is_contiguous() \
        and (sync == "fp32" or effective_sync(sync, tuple(partial.shape)) == sync)


class _NativeSeqs:
    """The allreduce seqs of a native decode step (``worker.models.native_step``), for both ends
    of the star: the step takes its seqs up front, and an allreduce of it that returned to Python
    is finished as ``allreduce_``'s own failure is."""

    _seq: int

    def _fast_failed(self, rc: int, partial: torch.Tensor) -> None:
        raise NotImplementedError

    def native_seqs(self, count: int) -> int:
        """Take ``count`` allreduce seqs for a native step; returns the first."""
        self._seq += count
        return self._seq - count + 1

    def native_failed(self, rc: int, partial: torch.Tensor, seq: int) -> None:
        """A native step's allreduce of ``seq`` returned ``rc``: as ``allreduce_``'s failure."""
        taken, self._seq = self._seq, seq
        try:
            self._fast_failed(rc, partial)
        finally:
            self._seq = taken


class StarHub(_NativeSeqs):
    """Hub side, used by rank 0 in the coordinator's engine thread (not thread-safe)."""

    def __init__(self, world_size: int, bind: str = "tcp://127.0.0.1:0", token: str = "",
                 timeout_s: float = DEFAULT_TIMEOUT_S, context: zmq.Context | None = None,
                 sync_dtype: str = "fp32", spin_wait_s: float | None = None, exchange: bool = True,
                 lane: bool | None = None, lane_port: int = 0, encrypt: bool = False,
                 ranks_on_host: Callable[[int], int] | None = None, c_star: bool = True):
        """``lane``: the allreduces go over lanes (``worker.comm.lane``, listening on ``lane_port``) where
        every rank has one, else over ZeroMQ (None: ``lanes.enabled_by_default()``, on unless
        ``EDGELLM_LANE=0``); ``encrypt`` encrypts lane payloads (integrity
        alone otherwise); ``ranks_on_host(rank)``: how many ranks share that rank's host (rank 0:
        this one), which decides whether lanes spin (default: all of them); ``c_star``: False keeps
        the star on lanes summing in Python (the hub's allreduces and steps), for the benchmarks."""
        self.world_size = world_size
        # two ranks swap partials (one hop, ``_exchange``); False keeps the two-hop star there too,
        # for the benchmark and the planner's probe, which measure both
        self.exchange = exchange and world_size == 2
        self.c_star = c_star
        self.timeout_ms = int(timeout_s * 1000)
        self.spin_wait_s = default_spin_wait_s() if spin_wait_s is None else spin_wait_s
        self.sync_dtype = sync_dtype
        # a context of our own: its ZAP handler (one per context) checks this hub's token only
        self._ctx = context or zmq.Context(io_threads=_io_threads(world_size))
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".zap"))
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=_TokenKeys(token))
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.curve_server = True
        self.sock.curve_secretkey = _curve_keypair(token, "hub")[1]
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished rank raises at once
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted rank takes its identity back
        _keepalive(self.sock)
        self.sock.bind(bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._peers = [_identity(r) for r in range(1, world_size)]
        self._lanes: dict[int, lanes.Lane] = {}  # adopted by the engine thread, by rank
        self._fast: Callable[[int, int, int], int] | None = None  # this step's in-place allreduce (allreduce_)
        self._star: lanes.StarLanes | None = None  # the star's hub in C over self._lanes (3+ ranks)
        self.listener: lanes.Listener | None = None
        if lane is None:
            lane = lanes.enabled_by_default()
        lib = self._lib = lanes.library() if lane and world_size > 1 else None
        if lib is not None:
            host = bind.split("://", 1)[-1].rsplit(":", 1)[0]
            self.listener = lanes.Listener(lib, host, lane_port, token, world_size, encrypt,
                                           ranks_on_host or (lambda rank: world_size))
        # ranks known to be gone (a heartbeat says so): an allreduce waiting on one fails at once
        self.missing_ranks: Callable[[], set[int]] = set
        self._step = 0
        self._seq = 0

    @property
    def sync_dtype(self) -> str:
        """Payload dtype of the allreduce, agreed with every rank (``fp32``, ``fp16``, ``bf16``, ``int8``)."""
        return self._sync

    @sync_dtype.setter
    def sync_dtype(self, name: str) -> None:
        self._sync = sync_dtype_name(name)

    def wait_for_ranks(self, timeout_s: float, still_loading: Callable[[], bool] = lambda: False,
                       ranks: list[int] | None = None) -> None:
        """Block until every worker rank (or those of ``ranks``) said HELLO with the right token
        and, where it was offered one, opened its lane (it does in ``StarRank.wait_welcome``).

        The ``timeout_s`` clock restarts while ``still_loading()`` is true: loading a big
        shard may take minutes, joining after it should take seconds.
        """
        missing = set(self._peers) if ranks is None else {_identity(r) for r in ranks}
        lanes_due: set[int] = set()  # welcomed ranks whose lane has not passed its handshake yet
        deadline = time.monotonic() + timeout_s
        while missing or lanes_due:
            if still_loading():
                deadline = time.monotonic() + timeout_s
            self._adopt_lanes()
            lanes_due -= self._lanes.keys()
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                names = sorted(m.decode() for m in missing) + [f"rank-{r}'s lane" for r in sorted(lanes_due)]
                raise CollectiveError(f"ranks never joined the data plane: {', '.join(names)}")
            if not self.sock.poll(min(left_ms, 10 if lanes_due else 200)):
                continue
            ident, *frames = self.sock.recv_multipart(copy=False)
            sender = ident.bytes
            try:
                msg = decode_message(frames)
            except WireError as exc:
                log.warning("dropping malformed frames from %r: %s", sender, exc)
                continue
            if msg.kind != Kind.HELLO:
                log.warning("dropping unexpected %s from %r before start", msg.kind.name, sender)
                continue
            if sender in missing:
                missing.discard(sender)
                rank = self._peers.index(sender) + 1
                self._drop_lane(rank)  # a rank that joins again opens a new one
                hello = msg.tensors[0] if msg.tensors else torch.zeros(1, dtype=torch.int64)
                # a rank that can open a lane is told its port, and waited for until it has
                port = []
                if self.listener is not None and hello.numel() >= 2 and int(hello[1]) == 1:
                    port = [torch.tensor([self.listener.port])]
                    lanes_due.add(rank)
                self.sock.send_multipart([sender, *encode_message(Kind.WELCOME, port)])

    def _adopt_lanes(self) -> None:
        if self.listener is None:
            return
        for rank, lane in self.listener.take().items():
            self._drop_lane(rank)
            self._lanes[rank] = lane
            log.info("rank %d's data-plane lane is up (%s, spin %d us)", rank,
                     "encrypted" if lane.mode == lanes.MODES["encrypt"] else "authenticated", lane.spin_us)

    def _drop_lane(self, rank: int) -> None:
        self._fast = None
        if self._star is not None:  # it holds the lanes' handles
            self._star.close()
            self._star = None
        if (lane := self._lanes.pop(rank, None)) is not None:
            lane.close()

    @property
    def on_lanes(self) -> bool:
        """Whether this step's allreduces go over lanes: every worker rank has one."""
        return self.listener is not None and len(self._lanes) == len(self._peers)

    def _broadcast(self, frames: list) -> None:
        # a large payload becomes one zmq.Frame, built once: each peer's send shares its buffer
        frames = [zmq.Frame(f) if _nbytes(f) >= ZERO_COPY_MIN_BYTES else f for f in frames]
        for peer in self._peers:
            try:
                _send_frames(self.sock, [peer, *frames])
            except zmq.ZMQError as exc:
                raise CollectiveError(f"{peer.decode()} is not connected ({exc})") from None

    def start_step(self, spans: torch.Tensor, hidden: torch.Tensor, all_logits: bool = False) -> None:
        """Send the step's batch layout (S, 3) and input hidden states (T, d) to every rank;
        ``all_logits``: the ranks return logits of every token, not only each span's last."""
        self._step += 1
        self._seq = 0
        if self._peers:  # alone, there is nothing to encode (~100 us of a 512x8 decode step)
            self._adopt_lanes()
            # the header's seq holds the step's flags: where its allreduces go, which logits it returns
            flags = STEP_ON_LANES * self.on_lanes | STEP_ALL_LOGITS * all_logits
            if self.on_lanes:  # ~40 µs a rank where ZeroMQ + CURVE took ~300 (docs/cluster.md)
                layout, hidden = lane_step_layout(spans, hidden), hidden.contiguous()
                for rank, lane in sorted(self._lanes.items()):
                    with self._lane_errors(rank):
                        lane.send_step(self._step, flags, layout, hidden)
            else:
                self._broadcast(encode_message(Kind.STEP, [spans, hidden], step=self._step, seq=flags))
        self._fast = None
        if self.on_lanes and self.exchange:
            if self._sync in lanes.IN_PLACE:
                (lane,) = self._lanes.values()
                lane.begin(self._step, LIVENESS_POLL_MS)
                self._fast = lane.allreduce_in_place(self._sync)
        elif self.on_lanes and self.c_star:
            if self._star is None:
                assert self._lib is not None
                self._star = lanes.StarLanes(self._lib, self._lanes)
            self._star.begin(self._step, LIVENESS_POLL_MS)
            if self._sync in lanes.HUB_IN_PLACE:
                self._fast = self._star.allreduce_in_place(self._sync)

    def allreduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum rank 0's ``partial`` with every worker's, in rank order, and send the sum back.

        Each worker's payload must be ``partial``'s shape in the agreed sync dtype; the sum is
        float32, and what the hub returns is what the ranks decode (they all see one value).
        With a single worker the two ranks exchange partials instead (``_exchange``).
        The result, and ``partial`` itself, may still be being sent from their own memory:
        read them, never modify them in place.
        """
        if self.world_size == 1:
            return partial
        self._seq += 1
        shape = tuple(partial.shape)
        if self.on_lanes:
            return self._lane_allreduce(partial, shape)
        if self.exchange:
            return self._exchange(partial, shape)
        received = self._gather_partials(shape, partial.dtype)
        total = partial.to(torch.float32, copy=True)  # (T, d) float32 accumulator, summed in place
        for peer in self._peers:
            add_sync_payload(total, received[peer], self._sync)
        exact = effective_sync(self._sync, shape) == "fp32"
        payload = sync_payload(total.to(partial.dtype) if exact else total, self._sync)
        self._broadcast(encode_message(Kind.REDUCED, payload, step=self._step, seq=self._seq))
        if exact:
            return payload[0]
        return sync_value(payload, self._sync, shape, partial.dtype, check=False).to(partial.dtype)

    def allreduce_(self, partial: torch.Tensor) -> torch.Tensor:
        """``allreduce`` for a caller that gives ``partial`` up: the sum may be written into it
        (on lanes with fp32 or int8 sync: one C call, no allocation). The models' blocks call this."""
        fast = self._fast
        if fast is None or not _in_place(partial, self._sync):
            return self.allreduce(partial)
        self._seq += 1
        if rc := fast(partial.data_ptr(), partial.numel(), self._seq):
            self._fast_failed(rc, partial)
        return partial

    def _fast_failed(self, rc: int, partial: torch.Tensor) -> None:
        """The in-place allreduce of seq ``_seq`` returned ``rc``: after a timeout (its frame was
        sent) wait for the worker's partial and sum into ``partial``; else ``CollectiveError``."""
        if not self.exchange:
            self._star_failed(rc, partial, self._sync)
            return
        ((rank, lane),) = self._lanes.items()
        lane.refresh()
        with self._lane_errors(rank):
            if rc != lanes.TIMEOUT:
                raise lanes.LaneError(rc)
            self._lane_receive(rank, tuple(partial.shape), partial.dtype, raw=True)
            lane.finish_in_place(self._sync, partial)

    def _star_failed(self, rc: int, partial: torch.Tensor, sync: str) -> None:
        """The star's C allreduce of seq ``_seq`` returned ``rc``: after a timeout call it again
        (it goes on where it stopped) until every partial is in, the step timeout passes or the
        heartbeat finds a waited-for rank gone; an error code drops the lane it names."""
        star = self._star
        assert star is not None
        deadline = time.monotonic() + self.timeout_ms / 1000
        while rc == lanes.TIMEOUT:
            late = star.pending()
            if gone := late & self.missing_ranks():
                raise CollectiveError(f"{', '.join(f'rank-{r}' for r in sorted(gone))} stopped answering "
                                      f"heartbeats mid-step")
            if time.monotonic() >= deadline:
                raise CollectiveError(f"timed out waiting for the PARTIAL of {', '.join(f'rank-{r}' for r in sorted(late))}")
            rc = star.allreduce_in_place(sync)(partial.data_ptr(), partial.numel(), self._seq)
        if rc:
            rank = star.failed()
            assert rank is not None
            kind = self._lanes[rank].kind
            with self._lane_errors(rank):
                if rc == lanes.CONTROL or (rc == lanes.FORMAT and kind != Kind.PARTIAL):
                    raise lanes.LaneError(rc, f"it sent a {_kind_name(kind)} frame")
                raise lanes.LaneError(rc)

    # --- the native decode step's side (worker.models.native_step) --------------------------------

    def native_allreduce(self, width: int) -> tuple[int, int] | None:
        """(C function, context) of this step's in-place allreduce of rows of ``width`` floats for
        ``kernels/step.c``: (0, 0) alone (no allreduce), None where this step's allreduces are
        not one C call (ZeroMQ, fp16/bf16 sync, int8 rows that are not whole blocks): those
        steps run in Python."""
        if self.world_size == 1:
            return 0, 0
        if self._fast is None or effective_sync(self._sync, (width,)) != self._sync:
            return None
        if self._star is not None:
            return self._star.native_allreduce(self._sync)
        ((_, lane),) = self._lanes.items()
        return lane.native_allreduce(self._sync)

    def _exchange(self, partial: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Two ranks: the hub sends its own partial before it waits, the worker sends its own,
        and each side adds the two payloads in rank order (``sum_payloads``): one hop instead of
        two, and both sides hold the same bits. A lossy sync dtype rounds both partials (the
        hub's own too, so the sums agree) instead of one partial and the sum."""
        own = sync_payload(partial, self._sync)
        self._broadcast(encode_message(Kind.PARTIAL, own, step=self._step, seq=self._seq))
        (theirs,) = self._gather_partials(shape, partial.dtype).values()
        return sum_payloads([own, theirs], self._sync, shape, partial.dtype)

    def _gather_partials(self, shape: tuple[int, ...], exact_dtype: torch.dtype) -> dict[bytes, list[torch.Tensor]]:
        """Every worker's checked PARTIAL of the current step and seq, as views of its frames."""
        def check(tensors: list[torch.Tensor], expected: tuple[int, ...]) -> None:
            check_sync_payload(tensors, self._sync, expected, exact_dtype)

        return self._collect(Kind.PARTIAL, dict.fromkeys(self._peers, shape), check)

    def _collect(self, kind: Kind, shapes: dict[bytes, tuple[int, ...]],
                 check: Callable[[list[torch.Tensor], tuple[int, ...]], None]) -> dict[bytes, list[torch.Tensor]]:
        """Every worker's ``kind`` message of the current step and seq, its tensors checked by
        ``check`` against the worker's shape in ``shapes``, as views of its frames."""
        received: dict[bytes, list[torch.Tensor]] = {}
        deadline = time.monotonic() + self.timeout_ms / 1000
        while len(received) < len(self._peers):
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                late = [p.decode() for p in self._peers if p not in received]
                raise CollectiveError(f"timed out waiting for partial sums from {', '.join(late)}")
            got = _recv_frames(self.sock, min(left_ms, LIVENESS_POLL_MS), self.spin_wait_s)
            if got is None:
                if gone := {_identity(r) for r in self.missing_ranks()} - received.keys():
                    raise CollectiveError(f"{', '.join(sorted(g.decode() for g in gone))} stopped answering "
                                          f"heartbeats mid-step")
                continue
            ident, *frames = got
            sender = ident.bytes
            try:
                msg = decode_message(frames)
            except WireError as exc:
                log.warning("dropping malformed frames from %r: %s", sender, exc)
                continue
            if msg.kind != kind or (msg.step, msg.seq) != (self._step, self._seq):
                log.warning("dropping stale %s step=%d seq=%d from %r", msg.kind.name, msg.step, msg.seq, sender)
                continue
            if sender not in self._peers:
                raise CollectiveError(f"{sender!r} is not a rank of this cluster")
            try:
                check(msg.tensors, shapes[sender])
            except WireError as exc:
                raise CollectiveError(f"{sender.decode()} sent a bad {kind.name.lower()}: {exc}") from None
            received[sender] = msg.tensors  # views of the frames: no copy until the sum
        return received

    def _lane_allreduce(self, partial: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """``allreduce`` over the lanes: the same sums, in the same rank order, as over ZeroMQ."""
        if self.exchange:
            ((rank, lane),) = self._lanes.items()
            if effective_sync(self._sync, shape) == "fp32" and partial.dtype == torch.float32:
                own = partial.contiguous()
                out = torch.empty_like(own)  # (T, d)
                with self._lane_errors(rank):
                    if not lane.exchange_f32(Kind.PARTIAL, self._step, self._seq, own, out, LIVENESS_POLL_MS):
                        self._lane_receive(rank, shape, partial.dtype, raw=True)
                        lane.finish_f32(own, out)
                return out
            payload = sync_payload(partial, self._sync)
            with self._lane_errors(rank):
                lane.send(Kind.PARTIAL, self._step, self._seq, [t.contiguous() for t in payload])
            theirs = self._lane_receive(rank, shape, partial.dtype)
            return sum_payloads([payload, theirs], self._sync, shape, partial.dtype)
        sync = effective_sync(self._sync, shape)
        if self._star is not None and sync in lanes.HUB_IN_PLACE and partial.dtype == torch.float32:
            out = partial.contiguous().clone()  # (T, d): the C star sums into it in place, in rank order
            if rc := self._star.allreduce_in_place(sync)(out.data_ptr(), out.numel(), self._seq):
                self._star_failed(rc, out, sync)
            return out
        total = partial.to(torch.float32, copy=True)  # (T, d) float32 accumulator, summed in place
        for rank in sorted(self._lanes):  # rank order, as over ZeroMQ; each lane keeps its own buffer
            add_sync_payload(total, self._lane_receive(rank, shape, partial.dtype), self._sync)
        exact = effective_sync(self._sync, shape) == "fp32"
        payload = [t.contiguous() for t in sync_payload(total.to(partial.dtype) if exact else total, self._sync)]
        for rank, lane in sorted(self._lanes.items()):
            with self._lane_errors(rank):
                lane.send(Kind.REDUCED, self._step, self._seq, payload)
        if exact:
            return payload[0]
        return sync_value(payload, self._sync, shape, partial.dtype, check=False).to(partial.dtype)

    @contextlib.contextmanager
    def _lane_errors(self, rank: int) -> Iterator[None]:
        """A broken lane is closed (the rank must join again for lanes to be used) and reported
        as a ``CollectiveError``, like a rank gone from ZeroMQ."""
        try:
            yield
        except lanes.LaneError as exc:
            self._drop_lane(rank)
            raise CollectiveError(f"rank-{rank}'s lane: {exc}") from None

    def _lane_receive(self, rank: int, shape: tuple[int, ...], exact_dtype: torch.dtype,
                      raw: bool = False) -> list[torch.Tensor]:
        """Rank ``rank``'s checked PARTIAL of this step and seq, as views of its lane's buffer
        (``raw``: left in the buffer, unchecked, for ``finish_f32``)."""
        lane = self._lanes[rank]
        got = self._lane_frame(rank, Kind.PARTIAL)
        if raw:
            return []
        try:
            return split_sync_payload(lane.payload(got), lane.format, self._sync, shape, exact_dtype)
        except WireError as exc:
            raise CollectiveError(f"rank-{rank} sent a bad partial: {exc}") from None

    def _lane_frame(self, rank: int, kind: Kind) -> int:
        """The byte count of rank ``rank``'s ``kind`` frame of this step and seq, waited for up to
        the step timeout; a rank the heartbeat finds gone fails it at once."""
        lane = self._lanes[rank]
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise CollectiveError(f"timed out waiting for the {kind.name} of rank-{rank}")
            with self._lane_errors(rank):
                got = lane.recv(self._step, self._seq, min(left_ms, LIVENESS_POLL_MS))
            if got < 0:
                if rank in self.missing_ranks():
                    raise CollectiveError(f"rank-{rank} stopped answering heartbeats mid-step")
                continue
            if lane.kind != kind:
                self._drop_lane(rank)
                raise CollectiveError(f"rank-{rank} sent a {_kind_name(lane.kind)} frame on its lane")
            return got

    def gather_logits(self, own: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The step's logits (R, V): rank 0's ``own`` (R, V_0) and every worker's LOGITS (R, V_r),
        side by side in rank order. A gather, not a sum: each rank projects onto its own LM head
        rows (``worker.rank.head``); a rank's V_r is what it sends, the whole must be ``vocab_size``."""
        if self.world_size == 1:
            return own
        self._seq += 1
        rows = own.shape[0]
        if self.on_lanes:
            parts = [own, *(self._lane_logits(rank, rows) for rank in sorted(self._lanes))]
        else:
            received = self._collect(Kind.LOGITS, dict.fromkeys(self._peers, (rows,)), self._check_logits)
            parts = [own, *(received[peer][0] for peer in self._peers)]
        if (width := sum(p.shape[1] for p in parts)) != vocab_size:
            raise CollectiveError(f"the ranks' logits add up to {width} columns, expected {vocab_size}: "
                                  f"{[p.shape[1] for p in parts]}")
        return torch.cat(parts, dim=1)  # (R, V)

    @staticmethod
    def _check_logits(tensors: list[torch.Tensor], shape: tuple[int, ...]) -> None:
        """One float32 (R, V_r) tensor, R = ``shape[0]``."""
        if len(tensors) != 1 or tensors[0].dtype != torch.float32 or tensors[0].dim() != 2 \
                or tensors[0].shape[0] != shape[0]:
            got = [(tuple(t.shape), t.dtype) for t in tensors]
            raise WireError(f"logits {got}, expected one ({shape[0]}, V_r) float32")

    def _lane_logits(self, rank: int, rows: int) -> torch.Tensor:
        """Rank ``rank``'s LOGITS of this step (R, V_r) float32, a view of its lane's buffer (valid
        until that lane's next receive)."""
        lane = self._lanes[rank]
        raw = lane.payload(self._lane_frame(rank, Kind.LOGITS))
        if DTYPES.get(lane.format) != torch.float32 or raw.numel() % (rows * 4):
            raise CollectiveError(f"rank-{rank} sent {raw.numel()} bytes of logits (dtype code {lane.format}), "
                                  f"not ({rows}, V_r) float32")
        return raw.view(torch.float32).view(rows, -1)  # (R, V_r)

    def _lane_control(self, kind: Kind) -> None:
        for rank, lane in list(self._lanes.items()):
            try:
                lane.send(kind, self._step, self._seq)
            except lanes.LaneError:
                self._drop_lane(rank)

    def abort_step(self) -> None:
        """Tell every reachable rank to drop the current step (one of them failed)."""
        self._lane_control(Kind.ABORT)
        for peer in self._peers:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart([peer, *encode_message(Kind.ABORT, step=self._step)])
        # partials of the dead step still in flight are dropped later by their step id

    def stop(self) -> None:
        self._lane_control(Kind.STOP)
        for peer in self._peers:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart([peer, *encode_message(Kind.STOP)])

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self._star is not None:
            self._star.close()
            self._star = None
        for rank in list(self._lanes):
            self._drop_lane(rank)
        self.sock.close(linger=0)
        self._auth.stop()
        self._ctx.term()


class StarRank(_NativeSeqs):
    """A worker rank's end of the star (used by the worker's data-plane thread only)."""

    def __init__(self, rank: int, hub_address: str, token: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None, sync_dtype: str = "fp32", spin_wait_s: float | None = None):
        self.rank = rank
        self.timeout_ms = int(timeout_s * 1000)
        self.spin_wait_s = default_spin_wait_s() if spin_wait_s is None else spin_wait_s
        self.sync_dtype = sync_dtype_name(sync_dtype)  # must equal the hub's
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, _identity(rank))
        self.sock.curve_serverkey = _curve_keypair(token, "hub")[0]
        self.sock.curve_publickey, self.sock.curve_secretkey = _curve_keypair(token, "rank")
        _keepalive(self.sock)
        # connection events, read by hub_connected() from the worker's control threads
        self._monitor: zmq.Socket | None = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._monitor_lock = threading.Lock()
        self._hub_connected = False
        self.sock.connect(hub_address)
        self._hub_host = hub_address.split("://", 1)[-1].rsplit(":", 1)[0]
        self._token = token
        self._lib = lanes.library()
        self.lane: lanes.Lane | None = None  # opened once the hub welcomed us and offered one
        self._on_lane = False  # this step's allreduces go over the lane (the STEP header says)
        self._fast: Callable[[int, int, int], int] | None = None  # this step's in-place exchange (allreduce_)
        self.step = 0
        self._seq = 0
        self.all_logits = False  # this step returns logits of every token (its STEP's flags)
        # set by another thread (the rank stopping): a wait for the hub ends within CANCEL_POLL_MS
        # instead of the step timeout, so the owning thread can close the socket itself
        self.cancelled = threading.Event()
        # [rank, 1 when this rank can open a lane]
        self.sock.send_multipart(encode_message(Kind.HELLO, [torch.tensor([rank, int(self._lib is not None)])]))

    def wait_welcome(self, timeout_s: float) -> None:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise CollectiveError("the hub did not accept this rank (wrong cluster token or hub down)")
        msg = self.recv(timeout_ms=0)
        if msg.kind != Kind.WELCOME:
            raise CollectiveError(f"expected WELCOME from the hub, got {msg.kind.name}")
        if msg.tensors and self._lib is not None:  # the hub offers a lane on this port
            port = int(msg.tensors[0][0])
            try:
                self.lane = lanes.connect(self._lib, self._hub_host, port, self._token, self.rank, timeout_s)
            except (OSError, PermissionError) as exc:
                raise CollectiveError(f"cannot open the data-plane lane to {self._hub_host}:{port}: {exc}") from None

    def recv(self, timeout_ms: int | None = None) -> Message:
        """The hub's next message between steps (``next_message``), waited for up to ``timeout_ms``
        (default: the step timeout)."""
        msg = self.next_message(self.timeout_ms if timeout_ms is None else timeout_ms)
        if msg is None:
            if self.cancelled.is_set():
                raise CollectiveError("this rank is stopping")
            raise CollectiveError("timed out waiting for the hub")
        return msg

    def next_message(self, timeout_ms: int) -> Message | None:
        """The hub's next message between steps, over ZeroMQ or the lane (where a hub whose ranks
        all have lanes sends its STEPs, ABORTs and STOPs), or None after ``timeout_ms`` or once
        ``cancelled`` is set (checked every ``CANCEL_POLL_MS``). Leftovers of steps up to the last
        one begun here are dropped from the lane."""
        deadline = time.monotonic() + timeout_ms / 1000
        spin = True  # the lane spins (where it does) once: the next STEP comes soon after a step
        while True:
            if (msg := self._lane_message(spin)) is not None:
                return msg
            spin = False
            with contextlib.suppress(zmq.Again):
                return decode_message(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or self.cancelled.is_set():
                return None
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            if self.lane is not None:
                poller.register(self.lane.sock.fileno(), zmq.POLLIN)
            poller.poll(min(left_ms, CANCEL_POLL_MS))

    def _lane_message(self, spin: bool) -> Message | None:
        """The lane's next frame of a step after ``step`` as a message (None: none yet, or no lane).
        A lane that breaks here is dropped: the hub finds it broken too, and steps go over ZeroMQ."""
        lane = self.lane
        if lane is None:
            return None
        try:
            got = lane.recv_next(self.step, 0, spin)
        except lanes.LaneError as exc:
            log.warning("rank %d: the lane to the hub broke between steps (%s); steps go over ZeroMQ",
                        self.rank, exc)
            self.lane, self._on_lane, self._fast = None, False, None
            lane.close()
            return None
        if got < 0:
            return None
        if lane.kind not in Kind._value2member_map_:
            raise WireError(f"a lane frame of kind {lane.kind}")
        tensors = lane.step_frame(got) if lane.kind == Kind.STEP else []
        return Message(Kind(lane.kind), lane.step, lane.seq, tensors)

    def _recv_zmq(self) -> Message:
        """The hub's next ZeroMQ message within a step, up to the step timeout."""
        frames = _recv_frames(self.sock, self.timeout_ms, self.spin_wait_s, self.cancelled)
        if frames is None:
            if self.cancelled.is_set():
                raise CollectiveError("this rank is stopping")
            raise CollectiveError("timed out waiting for the hub")
        return decode_message(frames)

    def begin(self, msg: Message) -> None:
        """Adopt the step id of a STEP message."""
        self.step = msg.step
        self._seq = 0
        self.all_logits = bool(msg.seq & STEP_ALL_LOGITS)
        self._on_lane = bool(msg.seq & STEP_ON_LANES) and self.lane is not None
        self._fast = None
        if self._on_lane and self.lane is not None and self.sync_dtype in lanes.IN_PLACE:
            self.lane.begin(self.step, CANCEL_POLL_MS)
            self._fast = self.lane.allreduce_in_place(self.sync_dtype)

    def allreduce_(self, partial: torch.Tensor) -> torch.Tensor:
        """``allreduce`` for a caller that gives ``partial`` up: on the lane with fp32 or int8
        sync the sum is written into it, in one C call (see ``StarHub.allreduce_``)."""
        fast = self._fast
        if fast is None or not _in_place(partial, self.sync_dtype):
            return self.allreduce(partial)
        self._seq += 1
        if rc := fast(partial.data_ptr(), partial.numel(), self._seq):
            self._fast_failed(rc, partial)
        return partial

    def send_logits(self, logits: torch.Tensor) -> None:
        """This rank's (R, V_r) float32 logits of the step to the hub (``StarHub.gather_logits``),
        on the lane where the step's allreduces went, else over ZeroMQ."""
        self._seq += 1
        logits = logits.contiguous()
        if self._on_lane and self.lane is not None:
            try:
                self.lane.send(Kind.LOGITS, self.step, self._seq, [logits])
            except lanes.LaneError as exc:
                self._lane_failed(self.lane, exc)
            return
        _send_frames(self.sock, encode_message(Kind.LOGITS, [logits], step=self.step, seq=self._seq))

    def _fast_failed(self, rc: int, partial: torch.Tensor) -> None:
        """The in-place exchange of seq ``_seq`` returned ``rc``: after a timeout (its frame was
        sent) wait for the hub's answer and sum into ``partial``; else ``CollectiveError``."""
        lane = self.lane
        assert lane is not None
        lane.refresh()
        try:
            if rc != lanes.TIMEOUT:
                raise lanes.LaneError(rc)
            self._lane_wait(lane)
            lane.finish_in_place(self.sync_dtype, partial)
        except lanes.LaneError as exc:
            self._lane_failed(lane, exc)

    # --- the native decode step's side (worker.models.native_step) --------------------------------

    def native_allreduce(self, width: int) -> tuple[int, int] | None:
        """(C function, context) of this step's in-place allreduce of rows of ``width`` floats for
        ``kernels/step.c``, or None where this step's allreduces are not one C call (see
        ``StarHub.native_allreduce``)."""
        if self._fast is None or self.lane is None or effective_sync(self.sync_dtype, (width,)) != self.sync_dtype:
            return None
        return self.lane.native_allreduce(self.sync_dtype)

    def _lane_failed(self, lane: lanes.Lane, exc: lanes.LaneError) -> NoReturn:
        if exc.code == lanes.CONTROL or lane.kind in (Kind.ABORT, Kind.STOP):
            raise CollectiveError(f"hub sent {_kind_name(lane.kind)} during the step") from None
        self._on_lane, self._fast = False, None
        raise CollectiveError(f"the lane to the hub broke: {exc}") from None

    def allreduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Send ``partial`` in the sync dtype (from its own memory when it needs no conversion)
        and return the sum in ``partial``'s dtype: the hub's REDUCED, or, at two ranks, the
        hub's PARTIAL added to ours in rank order exactly as the hub adds them (see
        ``StarHub._exchange``). ``partial`` may still be being sent: never modify it in place."""
        self._seq += 1
        shape = tuple(partial.shape)
        if self._on_lane:
            return self._lane_allreduce(partial, shape)
        payload = sync_payload(partial, self.sync_dtype)
        _send_frames(self.sock, encode_message(Kind.PARTIAL, payload, step=self.step, seq=self._seq))
        msg = self._recv_zmq()
        if msg.kind in (Kind.STOP, Kind.ABORT):
            raise CollectiveError(f"hub sent {msg.kind.name} during the step")
        if msg.kind not in (Kind.REDUCED, Kind.PARTIAL) or (msg.step, msg.seq) != (self.step, self._seq):
            raise CollectiveError(f"expected REDUCED or PARTIAL {self.step}/{self._seq}, got {msg.kind.name} "
                                  f"{msg.step}/{msg.seq}")
        try:
            if msg.kind == Kind.PARTIAL:
                check_sync_payload(msg.tensors, self.sync_dtype, shape, partial.dtype)
                return sum_payloads([msg.tensors, payload], self.sync_dtype, shape, partial.dtype)
            total = sync_value(msg.tensors, self.sync_dtype, shape, partial.dtype)
        except WireError as exc:
            raise CollectiveError(f"the hub sent a bad {msg.kind.name}: {exc}") from None
        return total.to(partial.dtype)

    def _lane_allreduce(self, partial: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """``allreduce`` over the lane: the hub's PARTIAL (two ranks) or REDUCED, as over ZeroMQ."""
        lane = self.lane
        assert lane is not None
        try:
            if effective_sync(self.sync_dtype, shape) == "fp32" and partial.dtype == torch.float32:
                own = partial.contiguous()
                out = torch.empty_like(own)  # (T, d)
                if not lane.exchange_f32(Kind.PARTIAL, self.step, self._seq, own, out, CANCEL_POLL_MS):
                    self._lane_wait(lane)
                    lane.finish_f32(own, out)
                return out
            payload = sync_payload(partial, self.sync_dtype)
            lane.send(Kind.PARTIAL, self.step, self._seq, [t.contiguous() for t in payload])
            got = self._lane_wait(lane)
            received = split_sync_payload(lane.payload(got), lane.format, self.sync_dtype, shape, partial.dtype)
            if lane.kind == Kind.PARTIAL:
                return sum_payloads([received, payload], self.sync_dtype, shape, partial.dtype)
            return sync_value(received, self.sync_dtype, shape, partial.dtype, check=False).to(partial.dtype)
        except lanes.LaneError as exc:
            self._lane_failed(lane, exc)
        except WireError as exc:
            raise CollectiveError(f"the hub sent a bad {_kind_name(lane.kind)}: {exc}") from None

    def _lane_wait(self, lane: lanes.Lane) -> int:
        """The byte count of the hub's answer on the lane, waiting up to the step timeout and
        leaving within ``CANCEL_POLL_MS`` once ``cancelled`` is set."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if self.cancelled.is_set():
                raise CollectiveError("this rank is stopping")
            got = lane.recv(self.step, self._seq, min(left_ms, CANCEL_POLL_MS))
            if got >= 0:
                if lane.kind in (Kind.ABORT, Kind.STOP):
                    raise lanes.LaneError(lanes.CONTROL)
                if lane.kind not in (Kind.PARTIAL, Kind.REDUCED):
                    raise lanes.LaneError(-4)
                return got
        raise CollectiveError("timed out waiting for the hub")

    def hub_connected(self) -> bool:
        """Whether the hub is connected now: a hub whose process died is seen as gone at once, an
        unplugged one after the heartbeat timeout (``HEARTBEAT_TIMEOUT_MS``). Safe from any thread."""
        with self._monitor_lock:
            while self._monitor is not None:
                try:
                    event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._hub_connected = event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            return self._hub_connected and self._monitor is not None

    def close(self) -> None:
        with self._monitor_lock:
            if self._monitor is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self.sock.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
        if self.lane is not None:
            self.lane.close()
            self.lane = None
        self.sock.close(linger=0)
