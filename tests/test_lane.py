"""The data plane's lanes (``worker.comm.lane``): frames that were altered, replayed, cut short or keyed
without the token are never used; the handshake binds a lane to the cluster token; the
allreduce over lanes matches the sum; a lane that encrypts hides its payload."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from worker.comm import lane as lanes
from worker.comm.collective import CollectiveError, StarHub, StarRank
from worker.comm.wire import (
    INT8_BLOCK,
    STEP_ALL_LOGITS,
    STEP_ON_LANES,
    Kind,
    WireError,
    add_sync_payload,
    decode_lane_step,
    lane_step_layout,
    sum_payloads,
    sync_payload,
    sync_value,
)

LIB = lanes.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="the lane library cannot be built here")
KEY_A, KEY_B = bytes(range(32)), bytes(range(32, 64))


def _pair(mode: str = "mac") -> tuple[lanes.Lane, lanes.Lane, socket.socket, socket.socket]:
    """Two lanes joined through a tap: (sender, receiver, tap_in, tap_out): what the sender writes
    arrives on tap_in; what the test writes to tap_out reaches the receiver."""
    assert LIB is not None
    send_sock, tap_in = socket.socketpair()
    tap_out, recv_sock = socket.socketpair()
    code = lanes.MODES[mode]
    sender = lanes.Lane(LIB, send_sock, KEY_A, KEY_B, code, 0)
    receiver = lanes.Lane(LIB, recv_sock, KEY_B, KEY_A, code, 0)
    return sender, receiver, tap_in, tap_out


def _frame(tap: socket.socket, payload_bytes: int) -> bytes:
    want, data = 24 + payload_bytes + 16, b""
    while len(data) < want:
        data += tap.recv(want - len(data))
    return data


def _close(*things: lanes.Lane | socket.socket) -> None:
    for thing in things:
        thing.close()


@pytest.mark.parametrize("mode", ["mac", "encrypt"])
def test_a_frame_arrives_whole_and_only_the_payload_is_hidden_when_encrypting(mode: str) -> None:
    sender, receiver, tap_in, tap_out = _pair(mode)
    try:
        values = torch.arange(64, dtype=torch.float32)
        sender.send(Kind.PARTIAL, 7, 3, [values])
        frame = _frame(tap_in, values.nbytes)
        assert frame[:4] == b"EDL1"
        assert (values.numpy().tobytes() in frame) == (mode == "mac")
        tap_out.sendall(frame)
        assert receiver.recv(7, 3, 1000) == values.nbytes and receiver.kind == Kind.PARTIAL
        assert torch.equal(receiver.payload(values.nbytes).view(torch.float32), values)
    finally:
        _close(sender, receiver, tap_in, tap_out)


@pytest.mark.parametrize("flip", [2, 10, 30, 24 + 256 + 3], ids=["magic", "step", "payload", "tag"])
def test_an_altered_frame_breaks_the_lane_and_is_never_summed(flip: int) -> None:
    sender, receiver, tap_in, tap_out = _pair()
    try:
        own = torch.ones(64)
        sender.send(Kind.PARTIAL, 1, 1, [torch.full((64,), 2.0)])
        frame = bytearray(_frame(tap_in, 256))
        frame[flip] ^= 0x10
        tap_out.sendall(bytes(frame))
        out = torch.full((64,), -1.0)
        with pytest.raises(lanes.LaneError):
            assert receiver.exchange_f32(Kind.PARTIAL, 1, 1, own, out, 1000)
        assert torch.equal(out, torch.full((64,), -1.0))
    finally:
        _close(sender, receiver, tap_in, tap_out)


def test_a_replayed_or_reordered_frame_fails_its_tag() -> None:
    sender, receiver, tap_in, tap_out = _pair()
    try:
        sender.send(Kind.PARTIAL, 1, 1, [torch.ones(8)])
        sender.send(Kind.PARTIAL, 1, 2, [torch.ones(8)])
        first, second = _frame(tap_in, 32), _frame(tap_in, 32)
        tap_out.sendall(first)
        assert receiver.recv(1, 1, 1000) == 32
        tap_out.sendall(first)  # the same bytes again: its nonce (the frame count) has passed
        with pytest.raises(lanes.LaneError, match="authentication tag"):
            receiver.recv(1, 2, 1000)
        del second
    finally:
        _close(sender, receiver, tap_in, tap_out)


def test_a_half_written_frame_times_out_then_fails_when_the_peer_dies_and_is_never_used() -> None:
    sender, receiver, tap_in, tap_out = _pair()
    try:
        sender.send(Kind.PARTIAL, 1, 1, [torch.full((64,), 2.0)])
        frame = _frame(tap_in, 256)
        tap_out.sendall(frame[:100])  # the peer was killed mid-send
        assert receiver.recv(1, 1, 50) == -1  # what came is kept: the next call reads on
        tap_out.close()
        with pytest.raises(lanes.LaneError, match="closed"):
            receiver.recv(1, 1, 1000)
        assert receiver.kind == 0  # no frame was ever taken as received
    finally:
        _close(sender, receiver, tap_in)


def test_frames_of_an_abandoned_step_are_dropped_and_abort_is_returned() -> None:
    sender, receiver, tap_in, tap_out = _pair()
    try:
        sender.send(Kind.PARTIAL, 4, 2, [torch.ones(8)])  # left in flight by step 4
        sender.send(Kind.ABORT, 4, 2)  # step 4's abort, seen only once step 5 runs
        sender.send(Kind.PARTIAL, 5, 1, [torch.full((8,), 3.0)])
        sender.send(Kind.ABORT, 5, 1)
        for nbytes in (32, 0, 32, 0):
            tap_out.sendall(_frame(tap_in, nbytes))
        out = torch.empty(8)
        assert receiver.exchange_f32(Kind.PARTIAL, 5, 1, torch.ones(8), out, 1000)
        assert torch.equal(out, torch.full((8,), 4.0))
        assert receiver.recv(5, 2, 1000) == 0 and receiver.kind == Kind.ABORT
    finally:
        _close(sender, receiver, tap_in, tap_out)


def test_between_steps_a_rank_takes_the_next_step_and_drops_what_earlier_steps_left() -> None:
    sender, receiver, tap_in, tap_out = _pair()
    try:
        sender.send(Kind.PARTIAL, 4, 2, [torch.ones(8)])  # left in flight by step 4, the last begun
        sender.send(Kind.ABORT, 4, 2)  # step 4's abort, which had already ended here
        sender.send(Kind.STEP, 5, 3, [torch.arange(3)])
        sender.send(Kind.STOP, 0, 0)  # a STOP is taken whatever its step
        for nbytes in (32, 0, 24, 0):
            tap_out.sendall(_frame(tap_in, nbytes))
        assert receiver.recv_next(4, 1000) == 24
        assert (receiver.kind, receiver.step, receiver.seq) == (Kind.STEP, 5, 3)
        assert torch.equal(receiver.payload(24).view(torch.int64), torch.arange(3))
        assert receiver.recv_next(5, 1000) == 0 and receiver.kind == Kind.STOP
        assert receiver.recv_next(5, 50) == -1  # nothing more
    finally:
        _close(sender, receiver, tap_in, tap_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_goes_over_the_lane_whole_and_not_over_zeromq(dtype: torch.dtype) -> None:
    hub = StarHub(2, token="t", timeout_s=5, lane=True)
    rank = StarRank(1, hub.address, token="t", timeout_s=5)
    try:
        welcome = threading.Thread(target=rank.wait_welcome, args=(5,))
        welcome.start()
        hub.wait_for_ranks(5)
        welcome.join(5)
        spans, hidden = torch.tensor([[1, 7, 2], [0, 3, 1]]), torch.randn(3, 64).to(dtype)
        hub.start_step(spans, hidden, all_logits=True)
        assert rank.sock.poll(100) == 0  # nothing on ZeroMQ
        msg = rank.recv()
        assert (msg.kind, msg.step) == (Kind.STEP, 1) and msg.seq == STEP_ON_LANES | STEP_ALL_LOGITS
        assert torch.equal(msg.tensors[0], spans) and msg.tensors[1].dtype == dtype
        assert torch.equal(msg.tensors[1], hidden)
        assert rank.lane is not None  # the tensors are copies: the lane's buffer is the step's to reuse
        assert msg.tensors[1].data_ptr() != rank.lane.payload(1).data_ptr() + 7 * 8 + 2 * 24
        rank.begin(msg)
        theirs = torch.full((3, 64), 2.0)
        worker = threading.Thread(target=rank.allreduce_, args=(theirs,))
        worker.start()
        total = hub.allreduce_(torch.ones(3, 64))
        worker.join(5)
        assert torch.equal(total, torch.full((3, 64), 3.0)) and torch.equal(theirs, total)
        hub.stop()
        assert rank.recv().kind == Kind.STOP
    finally:
        rank.close()
        hub.close()


@pytest.mark.parametrize("cut", ["layout", "hidden", "dtype", "count"])
def test_a_step_frame_whose_layout_does_not_fit_its_bytes_is_refused(cut: str) -> None:
    spans, hidden = torch.tensor([[0, 3, 2]]), torch.randn(2, 16)
    raw = torch.frombuffer(bytearray(lane_step_layout(spans, hidden) + hidden.numpy().tobytes()), dtype=torch.uint8)
    got = decode_lane_step(raw.data_ptr(), raw.numel())
    assert torch.equal(got[0], spans) and torch.equal(got[1], hidden)
    nbytes = raw.numel()
    if cut == "layout":
        nbytes = 40
    elif cut == "hidden":
        nbytes -= 4
    elif cut == "dtype":
        raw[8] = 99  # no such dtype code
    else:
        raw[0] = 2  # two spans announced, one sent
    with pytest.raises(WireError):
        decode_lane_step(raw.data_ptr(), nbytes)


def test_a_lane_peer_without_the_token_is_refused_on_both_sides() -> None:
    assert LIB is not None
    listener = lanes.Listener(LIB, "127.0.0.1", 0, "right", 2, False, lambda rank: 1)
    try:
        with pytest.raises(PermissionError, match="did not prove the cluster token"):
            lanes.connect(LIB, "127.0.0.1", listener.port, "wrong", 1, 5)
        # a client that fakes the hub's side: it reads the hub's reply and answers garbage
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as conn:
            conn.sendall(lanes._HELLO.pack(b"EDLH", lanes.VERSION, 1, bytes(32)))
            conn.recv(1024)
            conn.sendall(bytes(32))
            assert conn.recv(1) == b""  # hung up on, no confirmation
        time.sleep(0.2)
        assert listener.take() == {}
        good = lanes.connect(LIB, "127.0.0.1", listener.port, "right", 1, 5)
        (adopted,) = listener.take().values()
        good.send(Kind.PARTIAL, 1, 1, [torch.ones(4)])
        assert adopted.recv(1, 1, 1000) == 16
        _close(good, adopted)
    finally:
        listener.close()


def test_a_rank_number_outside_the_cluster_is_refused() -> None:
    assert LIB is not None
    listener = lanes.Listener(LIB, "127.0.0.1", 0, "t", 2, False, lambda rank: 1)
    try:
        with pytest.raises((PermissionError, ConnectionError)):
            lanes.connect(LIB, "127.0.0.1", listener.port, "t", 5, 5)
        assert listener.take() == {}
    finally:
        listener.close()


def test_hubs_use_lanes_unless_told_not_to(monkeypatch) -> None:
    monkeypatch.delenv(lanes.DISABLE_ENV, raising=False)
    assert lanes.enabled_by_default()
    hub = StarHub(2, token="t", timeout_s=5)
    try:
        assert hub.listener is not None
    finally:
        hub.close()
    monkeypatch.setenv(lanes.DISABLE_ENV, "0")
    assert not lanes.enabled_by_default()
    hub = StarHub(2, token="t", timeout_s=5)
    try:
        assert hub.listener is None
    finally:
        hub.close()


def test_spin_is_on_where_the_host_has_a_core_to_spare_and_the_environment_wins(monkeypatch) -> None:
    monkeypatch.delenv(lanes.SPIN_ENV, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert [lanes.spin_us(n) for n in (1, 3, 4, 5)] == [lanes.DEFAULT_SPIN_US, lanes.DEFAULT_SPIN_US, 0, 0]
    monkeypatch.setenv(lanes.SPIN_ENV, "250")
    assert lanes.spin_us(8) == 250
    monkeypatch.setenv(lanes.SPIN_ENV, "fast")
    with pytest.raises(ValueError, match=lanes.SPIN_ENV):
        lanes.spin_us(1)


@pytest.mark.parametrize("encrypt", [False, True], ids=["mac", "encrypt"])
def test_steps_over_lanes_sum_exactly_and_a_rank_killed_mid_step_is_reported(encrypt: bool) -> None:
    hub = StarHub(2, token="t", timeout_s=5, encrypt=encrypt, lane=True)
    rank = StarRank(1, hub.address, token="t", timeout_s=5)
    try:
        welcome = threading.Thread(target=rank.wait_welcome, args=(5,))
        welcome.start()
        hub.wait_for_ranks(5)
        welcome.join(5)
        for step in range(3):
            hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
            rank.begin(rank.recv())
            assert hub.on_lanes
            sums: list[torch.Tensor] = []
            theirs = torch.full((2, 64), 2.0)
            worker = threading.Thread(target=lambda out=sums, x=theirs: out.append(rank.allreduce_(x)))
            worker.start()
            ours = torch.full((2, 64), float(step))
            # allreduce_ writes the sum into the partial it is given (fp32 on lanes), allreduce does not
            total = hub.allreduce_(ours) if step % 2 else hub.allreduce(ours)
            worker.join(5)
            assert torch.equal(total, torch.full((2, 64), step + 2.0)) and torch.equal(sums[0], total)
            assert sums[0] is theirs and torch.equal(theirs, total)
            assert (total is ours) == bool(step % 2)
        hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
        rank.begin(rank.recv())
        errors: list[str] = []

        def waiting_rank() -> None:
            try:
                rank.allreduce_(torch.ones(2, 64))
            except CollectiveError as exc:
                errors.append(str(exc))

        worker = threading.Thread(target=waiting_rank)
        worker.start()  # the rank waits for the hub's partial, which never comes: the hub aborts
        time.sleep(0.1)
        hub.abort_step()
        worker.join(5)
        assert errors == ["hub sent ABORT during the step"]
        assert rank.lane is not None
        hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
        rank.lane.sock.shutdown(socket.SHUT_RDWR)  # as a killed process's socket: closed mid-step
        with pytest.raises(CollectiveError, match="rank-1's lane"):
            hub.allreduce(torch.ones(2, 64))
        assert not hub.on_lanes  # until the rank joins again
    finally:
        rank.close()
        hub.close()


# --- the star's hub in C (3+ ranks) ------------------------------------------------------------------

def _star(ranks: int, lane: bool = True, timeout_s: float = 5, sync: str = "fp32") -> tuple[StarHub, list[StarRank]]:
    """A hub and its worker ranks (this process, real sockets), joined."""
    hub = StarHub(ranks, token="t", timeout_s=timeout_s, lane=lane, sync_dtype=sync)
    workers = [StarRank(r, hub.address, token="t", timeout_s=timeout_s, sync_dtype=sync) for r in range(1, ranks)]
    joining = [threading.Thread(target=w.wait_welcome, args=(5,)) for w in workers]
    for t in joining:
        t.start()
    hub.wait_for_ranks(5)
    for t in joining:
        t.join(5)
    return hub, workers


def _star_step(hub: StarHub, workers: list[StarRank], partials: list[torch.Tensor],
               in_place: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One step with one allreduce: (the hub's sum, each worker's)."""
    hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
    for w in workers:
        w.begin(w.recv())
    sums: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda w=w, p=p: sums.__setitem__(w.rank, w.allreduce_(p.clone())))
               for w, p in zip(workers, partials[1:], strict=True)]
    for t in threads:
        t.start()
    total = hub.allreduce_(partials[0].clone()) if in_place else hub.allreduce(partials[0].clone())
    for t in threads:
        t.join(10)
    return total, [sums[w.rank] for w in workers]


def _rank_order_sum(partials: list[torch.Tensor]) -> torch.Tensor:
    total = partials[0].clone()
    for p in partials[1:]:
        total.add_(p)  # float32, rank order: what the Python star does (wire.add_sync_payload)
    return total


@pytest.mark.parametrize("ranks", [3, 4])
def test_the_hubs_c_star_has_the_bits_of_the_python_star_and_of_zeromq(ranks: int) -> None:
    """Partials of very different magnitudes: float addition does not associate, so a sum in
    any other order than rank order has other bits (checked), and every rank holds the hub's."""
    gen = torch.Generator().manual_seed(ranks)
    partials = [torch.randn(3, 256, generator=gen) * 10.0 ** (3 * (r % 3)) for r in range(ranks)]
    expected = _rank_order_sum(partials)
    assert not torch.equal(_rank_order_sum(partials[::-1]), expected), "the data cannot tell the order apart"
    got = {}
    for lane in (True, False):
        hub, workers = _star(ranks, lane=lane)
        try:
            for in_place in (True, False):
                total, theirs = _star_step(hub, workers, partials, in_place)
                assert hub.on_lanes == lane and (hub._star is not None) == lane
                assert torch.equal(total, expected)
                assert all(torch.equal(t, expected) for t in theirs)
                got[lane, in_place] = total
        finally:
            for w in workers:
                w.close()
            hub.close()
    assert len(got) == 4


# --- int8 payloads summed in C (kernels/lane.c) with the bits of wire.py's Python ---------------

def _every_kind_of_block() -> torch.Tensor:
    """(8, 256): blocks from 1e-40 (subnormal: the scale's floor) to 1e4, an all-zero row, rows
    of exact ties (block absmax 127: scale 1, values k + 0.5 round to even), one NaN and one
    infinity in their own blocks."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 256, generator=gen) * torch.tensor([1e-40, 1e-3, 1.0, 1e4, 0.0, 1.0, 1.0, 1.0])[:, None]
    ties = torch.arange(INT8_BLOCK, dtype=torch.float32) - 15.5  # -15.5 .. 15.5
    ties[0] = 127.0
    x[5] = ties.repeat(256 // INT8_BLOCK)
    x[6] = -x[5]
    x[7, 40], x[7, 100] = float("nan"), float("inf")
    return x


def test_the_c_int8_quantizer_has_the_bits_of_wire_sync_payload() -> None:
    assert LIB is not None
    x = _every_kind_of_block()
    values, scales = torch.empty(x.shape, dtype=torch.int8), torch.empty(8, 256 // INT8_BLOCK)
    LIB.lane_quantize_q8(x.data_ptr(), x.numel(), values.data_ptr(), scales.data_ptr())
    want_values, want_scales = sync_payload(x, "int8")
    finite = torch.isfinite(want_scales)
    assert finite.sum() == finite.numel() - 2 and torch.equal(torch.isfinite(scales), finite)
    assert torch.equal(scales[finite], want_scales[finite])
    blocks = finite.repeat_interleave(INT8_BLOCK, dim=1)  # (8, 256): the values of finite blocks
    assert torch.equal(values[blocks], want_values[blocks])
    assert values[5, 1:5].tolist() == [-14, -14, -12, -12]  # -14.5 -13.5 -12.5 -11.5: ties to even


def _int8_sums(partials: list[torch.Tensor]) -> torch.Tensor:
    """What every rank must hold after an int8 allreduce, from wire.py alone: at two ranks both
    partials rounded and added (the exchange), else rank 0's exact partial plus the workers'
    rounded ones in rank order, rounded once more (the star's REDUCED)."""
    shape = tuple(partials[0].shape)
    if len(partials) == 2:
        return sum_payloads([sync_payload(p, "int8") for p in partials], "int8", shape, torch.float32)
    total = partials[0].clone()
    for p in partials[1:]:
        add_sync_payload(total, sync_payload(p, "int8"), "int8")
    return sync_value(sync_payload(total, "int8"), "int8", shape, torch.float32, check=False)


@pytest.mark.parametrize("late", [None, "hub", "worker"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_int8_allreduces_in_c_have_the_bits_of_the_python_ones(ranks: int, late: str | None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """In place (one C call: lane_allreduce_q8, lane_hub_allreduce_q8), through Python on the
    lanes, and over ZeroMQ: the same bits on every rank. Each C call waits 1 ms; a side 50 ms
    late makes the other's call return to Python, which finishes it (lane_finish_q8, or the
    hub's star called again)."""
    from worker.comm import collective

    monkeypatch.setattr(collective, "LIVENESS_POLL_MS", 1)
    monkeypatch.setattr(collective, "CANCEL_POLL_MS", 1)
    gen = torch.Generator().manual_seed(ranks)
    partials = [torch.randn(3, 256, generator=gen) * 10.0 ** (2 * (r % 3) - 1) for r in range(ranks)]
    expected = _int8_sums(partials)
    assert not torch.equal(expected, _rank_order_sum(partials)), "the data cannot tell int8 from fp32"
    names = {"lane_allreduce_q8", "lane_hub_allreduce_q8"}
    for lane in (True, False):
        hub, workers = _star(ranks, lane=lane, sync="int8")
        try:
            if late is not None:
                side = hub if late == "hub" else workers[-1]
                on_time = side.allreduce_

                def slow(partial: torch.Tensor, on_time=on_time) -> torch.Tensor:
                    time.sleep(0.05)
                    return on_time(partial)

                side.allreduce_ = slow  # type: ignore[method-assign]
            for in_place in (True, False):
                total, theirs = _star_step(hub, workers, partials, in_place)
                assert (hub._fast is not None and hub._fast.func.__name__ in names) == lane  # type: ignore[attr-defined]
                assert torch.equal(total, expected), (total - expected).abs().max()
                assert all(torch.equal(t, expected) for t in theirs)
        finally:
            for w in workers:
                w.close()
            hub.close()


def test_an_int8_partial_with_a_bad_scale_or_size_is_refused_by_the_c_star() -> None:
    with _hub_star(3) as (star, workers, taps):
        star.begin(1, 1000)
        allreduce = star.allreduce_in_place("int8")
        own = torch.ones(64)
        good = sync_payload(torch.randn(1, 64), "int8")
        nan_scale = [good[0], torch.full_like(good[1], float("nan"))]
        for seq, (first, second) in enumerate([(good, nan_scale), (good, [good[0][:, :32], good[1][:, :1]]),
                                               (good, [torch.randn(1, 64)])], start=1):
            for worker, tensors in zip(workers, (first, second), strict=True):
                worker.send(Kind.PARTIAL, 1, seq, [t.contiguous() for t in tensors])
            for k in (0, 2):
                taps[k + 1].sendall(taps[k].recv(1 << 16))
            assert allreduce(own.data_ptr(), 64, seq) == lanes.FORMAT
            assert star.failed() == 2 and torch.equal(own, torch.ones(64)), "summed a refused partial"


@contextlib.contextmanager
def _hub_star(ranks: int) -> Iterator[tuple[lanes.StarLanes, list[lanes.Lane], list[socket.socket]]]:
    """A C star over socketpair lanes, the test playing its workers: (star, worker lanes, taps),
    all closed on exit. Worker r's frames go to taps[2 (r - 1)]; what the test writes to
    taps[2 (r - 1) + 1] reaches the hub's lane of rank r, and what that lane sends comes out there."""
    assert LIB is not None
    hub_side, worker_side, taps = {}, [], []
    for r in range(1, ranks):
        w_sock, tap_in = socket.socketpair()
        tap_out, h_sock = socket.socketpair()
        worker_side.append(lanes.Lane(LIB, w_sock, KEY_A, KEY_B, lanes.MODES["mac"], 0))
        hub_side[r] = lanes.Lane(LIB, h_sock, KEY_B, KEY_A, lanes.MODES["mac"], 0)
        taps += [tap_in, tap_out]
    star = lanes.StarLanes(LIB, hub_side)
    try:
        yield star, worker_side, taps
    finally:
        star.close()
        for lane in (*worker_side, *hub_side.values()):
            lane.close()
        _close(*taps)


def test_the_hubs_c_star_waits_for_a_half_written_frame_and_refuses_a_bad_one() -> None:
    with _hub_star(3) as (star, workers, taps):
        star.begin(1, 20)
        allreduce = star.allreduce_in_place()
        own = torch.full((64,), 1.0)
        workers[0].send(Kind.PARTIAL, 1, 1, [torch.full((64,), 2.0)])
        workers[1].send(Kind.PARTIAL, 1, 1, [torch.full((64,), 4.0)])
        first, second = _frame(taps[0], 256), _frame(taps[2], 256)
        taps[1].sendall(first)
        taps[3].sendall(second[:100])  # rank 2 killed mid-send, for now
        assert allreduce(own.data_ptr(), 64, 1) == lanes.TIMEOUT
        assert torch.equal(own, torch.full((64,), 1.0)), "summed before every partial was in"
        assert star.pending() == {2} and star.failed() is None
        taps[3].sendall(second[100:])  # the rest: the next call goes on from what it read
        assert allreduce(own.data_ptr(), 64, 1) == 0
        assert torch.equal(own, torch.full((64,), 7.0)) and star.pending() == {1, 2}
        for tap in (taps[1], taps[3]):  # both got the sum (the hub's side of each pair)
            reduced = _frame(tap, 256)
            assert reduced[4] == Kind.REDUCED
            assert torch.equal(torch.frombuffer(bytearray(reduced[24:24 + 256]), dtype=torch.float32),
                               torch.full((64,), 7.0))
        # seq 2: rank 1's frame altered in flight
        workers[0].send(Kind.PARTIAL, 1, 2, [torch.full((64,), 2.0)])
        workers[1].send(Kind.PARTIAL, 1, 2, [torch.full((64,), 4.0)])
        bad = bytearray(_frame(taps[0], 256))
        bad[40] ^= 0x10
        taps[1].sendall(bytes(bad))
        taps[3].sendall(_frame(taps[2], 256))
        own = torch.full((64,), 1.0)
        assert allreduce(own.data_ptr(), 64, 2) == -3  # the tag
        assert star.failed() == 1 and torch.equal(own, torch.full((64,), 1.0))


def test_the_hubs_c_star_refuses_a_partial_of_the_wrong_size_or_kind() -> None:
    with _hub_star(3) as (star, workers, taps):
        star.begin(1, 1000)
        allreduce = star.allreduce_in_place()
        own = torch.full((64,), 1.0)
        workers[0].send(Kind.PARTIAL, 1, 1, [torch.full((64,), 2.0)])
        workers[1].send(Kind.PARTIAL, 1, 1, [torch.full((63,), 4.0)])
        taps[1].sendall(_frame(taps[0], 256))
        taps[3].sendall(_frame(taps[2], 252))
        assert allreduce(own.data_ptr(), 64, 1) == lanes.FORMAT
        assert star.failed() == 2 and torch.equal(own, torch.full((64,), 1.0))
        workers[0].send(Kind.LOGITS, 1, 2, [torch.full((64,), 2.0)])
        taps[1].sendall(_frame(taps[0], 256))
        assert allreduce(own.data_ptr(), 64, 2) == lanes.FORMAT
        assert star.failed() == 1 and torch.equal(own, torch.full((64,), 1.0))


def test_a_late_worker_makes_the_hubs_c_star_return_to_python_which_resumes_it(monkeypatch) -> None:
    """Each C call waits 1 ms; rank 2 sends 50 ms late: the hub's allreduce returns to Python
    (which looks at the heartbeats) and calls again, and the sum is the same. Then a rank the
    heartbeat finds gone ends the wait, and the next step sums exactly again."""
    from worker.comm import collective

    monkeypatch.setattr(collective, "LIVENESS_POLL_MS", 1)
    hub, workers = _star(3)
    resumed: list[int] = []
    real = StarHub._star_failed

    def counting(self: StarHub, rc: int, partial: torch.Tensor, sync: str) -> None:
        resumed.append(rc)
        real(self, rc, partial, sync)

    monkeypatch.setattr(StarHub, "_star_failed", counting)
    try:
        partials = [torch.randn(2, 64) for _ in range(3)]
        late = workers[1].allreduce_

        def slow(partial: torch.Tensor) -> torch.Tensor:
            time.sleep(0.05)
            return late(partial)

        workers[1].allreduce_ = slow  # type: ignore[method-assign]
        total, theirs = _star_step(hub, workers, partials)
        assert resumed and set(resumed) == {lanes.TIMEOUT}
        assert torch.equal(total, _rank_order_sum(partials)) and all(torch.equal(t, total) for t in theirs)
        # rank 2 never sends; the heartbeat says it is gone
        del workers[1].allreduce_
        hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
        for w in workers:
            w.begin(w.recv())
        hub.missing_ranks = lambda: {2}
        errors: list[str] = []

        def rank_1() -> None:
            try:
                workers[0].allreduce_(torch.ones(2, 64))
            except CollectiveError as exc:
                errors.append(str(exc))

        waiting = threading.Thread(target=rank_1)
        waiting.start()
        with pytest.raises(CollectiveError, match="rank-2 stopped answering heartbeats mid-step"):
            hub.allreduce_(torch.ones(2, 64))
        hub.abort_step()
        waiting.join(5)
        assert errors == ["hub sent ABORT during the step"]
        assert [w.recv().kind for w in workers] == [Kind.ABORT, Kind.ABORT]  # as the worker loop skips it
        hub.missing_ranks = set
        assert hub.on_lanes
        total, theirs = _star_step(hub, workers, partials)  # rank 1's stale partial is dropped
        assert torch.equal(total, _rank_order_sum(partials)) and all(torch.equal(t, total) for t in theirs)
    finally:
        for w in workers:
            w.close()
        hub.close()


def test_a_worker_killed_mid_step_breaks_only_its_lane_of_the_c_star() -> None:
    hub, workers = _star(3)
    try:
        hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
        for w in workers:
            w.begin(w.recv())
        lane = workers[1].lane
        assert lane is not None
        lane.sock.shutdown(socket.SHUT_RDWR)  # as a killed process's socket
        with pytest.raises(CollectiveError, match="rank-2's lane: the peer closed the connection"):
            hub.allreduce_(torch.ones(2, 64))
        assert not hub.on_lanes and 1 in hub._lanes and hub._star is None
    finally:
        for w in workers:
            w.close()
        hub.close()
