"""The star allreduce's sync dtypes: format error bounds, a real multi-process allreduce for each,
malformed payloads refused, and a served cluster with ``--sync-dtype fp16``."""

from __future__ import annotations

import multiprocessing as mp
import threading

import httpx
import pytest
import torch
import zmq

from tests.processes import served
from worker.comm.collective import (
    SPIN_ENV,
    CollectiveError,
    StarHub,
    StarRank,
    _recv_frames,
    default_spin_wait_s,
)
from worker.comm.wire import (
    INT8_BLOCK,
    INT8_LEVELS,
    LOSSY_MIN_WIDTH,
    SYNC_DTYPES,
    Header,
    Kind,
    WireError,
    decode_message,
    decode_tensor,
    encode_message,
    sync_dtype_name,
    sync_payload,
    sync_value,
)

UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}  # half a unit in the last place, relative
SUBNORMAL_HALF_STEP = {"fp16": 2.0 ** -25, "bf16": 2.0 ** -134}


def _rows_of_every_magnitude() -> torch.Tensor:
    """(6, 256): rows from 1e-3 to 1e2 in scale, one all-zero row, signs mixed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 256, generator=g) * torch.tensor([1e-3, 1e-1, 1.0, 10.0, 100.0, 0.0])[:, None]
    return x


def _round_trip(x: torch.Tensor, sync: str) -> torch.Tensor:
    return sync_value(sync_payload(x, sync), sync, tuple(x.shape), x.dtype).float()


def test_received_tensors_view_the_frame_without_a_copy() -> None:
    partial = torch.randn(4, 256)
    frames = [zmq.Frame(bytes(f)) for f in encode_message(Kind.PARTIAL, [partial], step=1, seq=1)]
    (tensor,) = decode_message(frames).tensors
    assert torch.equal(tensor, partial)
    assert tensor.data_ptr() == torch.frombuffer(frames[1].buffer, dtype=torch.uint8).data_ptr()
    misaligned = memoryview(bytearray(1 + partial.nbytes))[1:]
    misaligned[:] = partial.numpy().tobytes()
    copied = decode_tensor(Header(Kind.PARTIAL, dtype=torch.float32, shape=(4, 256)), misaligned)
    assert torch.equal(copied, partial) and copied.data_ptr() % 4 == 0


def test_fp32_is_exact_and_sends_the_tensor_itself() -> None:
    x = _rows_of_every_magnitude()
    (payload,) = sync_payload(x, "fp32")
    assert payload is x  # no conversion, no copy
    assert torch.equal(_round_trip(x, "fp32"), x)


@pytest.mark.parametrize("sync", ["fp16", "bf16"])
def test_half_formats_round_within_half_an_ulp(sync: str) -> None:
    x = _rows_of_every_magnitude()
    (payload,) = sync_payload(x, sync)
    assert payload.dtype == SYNC_DTYPES[sync] and payload.element_size() == 2
    bound = x.abs() * UNIT_ROUNDOFF[sync] + SUBNORMAL_HALF_STEP[sync]
    assert torch.all((_round_trip(x, sync) - x).abs() <= bound)


def _block_amax(x: torch.Tensor) -> torch.Tensor:
    """Each value's block absmax: (..., d) -> (..., d), constant over each block of INT8_BLOCK."""
    blocks = x.abs().view(*x.shape[:-1], -1, INT8_BLOCK)  # (..., d / 32, 32)
    return blocks.amax(-1, keepdim=True).expand(blocks.shape).reshape(x.shape)


def test_int8_error_is_bounded_by_each_blocks_scale() -> None:
    x = _rows_of_every_magnitude()
    x[2, :INT8_BLOCK] *= 1e4  # an outlier block: the row's other blocks keep their own scale
    values, scale = sync_payload(x, "int8")
    assert values.dtype == torch.int8 and scale.shape == (6, 256 // INT8_BLOCK) and scale.dtype == torch.float32
    step = _block_amax(x) / INT8_LEVELS  # the scale: one quantization step per block
    err = (_round_trip(x, "int8") - x).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-5))
    assert err[2, INT8_BLOCK:].max() < x[2, :INT8_BLOCK].abs().max() / INT8_LEVELS / 1e3, "one scale for the row"
    assert torch.all(_round_trip(x, "int8")[5] == 0)  # the zero row stays exactly zero
    block_max = values.view(6, -1, INT8_BLOCK).abs().amax(dim=-1)[:5]
    assert torch.equal(block_max, torch.full_like(block_max, INT8_LEVELS))


@pytest.mark.parametrize("sync", ["fp16", "bf16", "int8"])
def test_narrow_payloads_stay_exact(sync: str) -> None:
    stats = torch.randn(5, 2) * 1e6  # OLMoE's sums of squares: out of fp16's range
    assert LOSSY_MIN_WIDTH > 2
    assert sync_payload(stats, sync) == [stats]
    assert torch.equal(_round_trip(stats, sync), stats)


def test_sync_dtype_names() -> None:
    assert [sync_dtype_name(n) for n in ("fp32", "float32", "bfloat16", "int8")] == ["fp32", "fp32", "bf16", "int8"]
    with pytest.raises(ValueError, match="unknown sync dtype"):
        sync_dtype_name("fp8")


def _bad(sync: str, shape: tuple[int, ...] = (3, 64)) -> list[list[torch.Tensor]]:
    """Payloads a rank must never get away with when the cluster agreed on ``sync``."""
    x = torch.randn(shape)
    values, scale = sync_payload(x, "int8")
    cases = {
        "fp32": [[x.half()], [x[:2]], [x, x]],
        "fp16": [[x], [x.bfloat16()], [x.half()[:, :32]]],
        "bf16": [[x.half()], [x]],
        "int8": [
            [values],  # no scale
            [x, scale],  # float values where int8 was agreed
            [values, scale.half()],  # scale of the wrong dtype
            [values, scale.view(-1)],  # scale of the wrong shape
            [values, torch.ones(shape[0], shape[1] // INT8_BLOCK + 1)],  # one scale too many per row
            [values, torch.full_like(scale, float("nan"))],  # non-finite scale
        ],
    }
    return cases[sync]


@pytest.mark.parametrize("sync", list(SYNC_DTYPES))
def test_malformed_payloads_are_refused_by_the_codec(sync: str) -> None:
    for tensors in _bad(sync):
        with pytest.raises(WireError):
            sync_value(tensors, sync, (3, 64), torch.float32)


def _join(hub: StarHub, rank: StarRank) -> None:
    """The hub welcomes the rank while the rank waits for it (and opens its lane) in a thread."""
    welcome = threading.Thread(target=rank.wait_welcome, args=(60,))
    welcome.start()
    hub.wait_for_ranks(60)
    welcome.join(60)


def _start(hub: StarHub, rank: StarRank) -> None:
    hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
    rank.begin(rank.recv())


def _same_bytes(tensors: list[torch.Tensor], valid: list[torch.Tensor]) -> bool:
    """Whether a lane frame of ``tensors`` reads as ``valid``'s: a lane carries the first tensor's
    dtype and the bytes, not the shapes (the step fixes those), so a scale of shape (3,) for
    (3, 1) is the same payload there."""
    return (tensors[0].dtype == valid[0].dtype
            and sum(t.nbytes for t in tensors) == sum(t.nbytes for t in valid))


def _send_partial(rank: StarRank, tensors: list[torch.Tensor], lane: bool) -> None:
    if lane:
        assert rank.lane is not None
        rank.lane.send(Kind.PARTIAL, rank.step, 1, [t.contiguous() for t in tensors])
    else:
        rank.sock.send_multipart(encode_message(Kind.PARTIAL, tensors, step=rank.step, seq=1))


@pytest.mark.parametrize("lane", [False, True], ids=["zeromq", "lane"])
@pytest.mark.parametrize("sync", ["fp16", "int8"])
def test_hub_refuses_a_partial_that_breaks_the_agreed_sync_dtype_and_goes_on(sync: str, lane: bool) -> None:
    hub = StarHub(2, token="t", timeout_s=60, sync_dtype=sync, lane=lane)
    rank = StarRank(1, hub.address, token="t", timeout_s=60, sync_dtype=sync)
    try:
        _join(hub, rank)
        valid = sync_payload(torch.randn(3, 64), sync)
        cases = [t for t in _bad(sync) if not (lane and _same_bytes(t, valid))]
        assert len(cases) >= 2
        for tensors in cases:
            _start(hub, rank)
            assert hub.on_lanes == lane and (rank.lane is not None) == lane
            _send_partial(rank, tensors, lane)
            with pytest.raises(CollectiveError, match="rank-1 sent a bad partial"):
                hub.allreduce(torch.zeros(3, 64))
            hub.abort_step()
            # at two ranks the hub sent its own partial before it waited for ours (the exchange)
            if lane:
                assert rank.lane is not None
                kinds = [rank.lane.recv(rank.step, 1, 1000) >= 0 and rank.lane.kind for _ in range(2)]
                assert kinds == [Kind.PARTIAL, Kind.ABORT]
                assert rank.recv().kind == Kind.ABORT  # told on ZeroMQ too
            else:
                assert [rank.recv().kind for _ in range(2)] == [Kind.PARTIAL, Kind.ABORT]
        _start(hub, rank)  # the next step is served normally
        partial = torch.ones(3, 64)
        _send_partial(rank, sync_payload(partial * 2, sync), lane)
        assert torch.equal(hub.allreduce(partial), partial * 3)  # 3 is exact in every format
    finally:
        rank.close()
        hub.close()


@pytest.mark.parametrize("lane", [False, True], ids=["zeromq", "lane"])
@pytest.mark.parametrize("kind", [Kind.REDUCED, Kind.PARTIAL])
def test_rank_refuses_a_sum_or_partial_in_the_wrong_dtype(kind: Kind, lane: bool) -> None:
    hub = StarHub(2, token="t", timeout_s=60, sync_dtype="fp16", lane=lane)
    rank = StarRank(1, hub.address, token="t", timeout_s=60, sync_dtype="fp16")
    try:
        _join(hub, rank)
        _start(hub, rank)
        # float32 although fp16 was agreed, already queued when the rank asks
        if lane:
            (hub_lane,) = hub._lanes.values()
            hub_lane.send(kind, rank.step, 1, [torch.ones(3, 64)])
        else:
            hub.sock.send_multipart([b"rank-1", *encode_message(kind, [torch.ones(3, 64)], step=rank.step, seq=1)])
        with pytest.raises(CollectiveError, match=f"the hub sent a bad {kind.name}"):
            rank.allreduce(torch.ones(3, 64))
    finally:
        rank.close()
        hub.close()


def test_spin_wait_comes_from_the_environment_and_a_bad_value_is_refused(monkeypatch) -> None:
    monkeypatch.delenv(SPIN_ENV, raising=False)
    assert default_spin_wait_s() == 0.0  # off unless a deployment turns it on
    monkeypatch.setenv(SPIN_ENV, "250")
    assert default_spin_wait_s() == pytest.approx(250e-6)
    monkeypatch.setenv(SPIN_ENV, "fast")
    with pytest.raises(CollectiveError, match=SPIN_ENV):
        default_spin_wait_s()


def test_a_spinning_star_sums_exactly_and_still_times_out() -> None:
    hub = StarHub(2, token="t", timeout_s=60, spin_wait_s=0.005)
    rank = StarRank(1, hub.address, token="t", timeout_s=60, spin_wait_s=0.005)
    try:
        _join(hub, rank)
        for step in range(3):
            _start(hub, rank)
            sums: list[torch.Tensor] = []
            worker = threading.Thread(target=lambda out=sums: out.append(rank.allreduce(torch.full((2, 64), 2.0))))
            worker.start()  # the rank spins on its socket while the hub waits for its partial
            total = hub.allreduce(torch.full((2, 64), float(step)))
            worker.join(60)
            assert torch.equal(total, torch.full((2, 64), step + 2.0)) and torch.equal(sums[0], total)
        assert _recv_frames(rank.sock, 50, spin_s=0.005) is None  # nothing comes: spin, then poll, then give up
    finally:
        rank.close()
        hub.close()


# --- a real star across processes: rank r contributes arange * (r + 1) ------------------------

SHAPE = (4, 256)


def _contribution(rank: int) -> torch.Tensor:
    """Signed ramp rows of different ranges (int8 block scales differ), times rank + 1."""
    ramp = torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).view(SHAPE) - 300.0
    return ramp * (rank + 1)


def _rank_process(rank: int, address: str, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    link = StarRank(rank, address, token="arange", timeout_s=120)
    try:
        link.wait_welcome(300)
        for sync in SYNC_DTYPES:
            link.sync_dtype = sync
            link.begin(link.recv())
            totals = [link.allreduce(_contribution(rank)) for _ in range(2)]
            results.put((rank, sync, [t.tolist() for t in totals]))  # plain lists: the process may exit first
    finally:
        link.close()


def _bound(sync: str, world: int) -> torch.Tensor:
    """Worst error of the star's sum in ``sync``: each worker's rounding plus the sum's rounding,
    or at two ranks (the exchange) both partials' rounding and no rounded sum."""
    exchange = world == 2
    exact = sum(_contribution(r) for r in range(world))
    assert isinstance(exact, torch.Tensor)
    rounded_ranks = range(0 if exchange else 1, world)
    if sync == "fp32":
        return torch.zeros(SHAPE)
    if sync in UNIT_ROUNDOFF:
        rounded = sum(_contribution(r).abs() for r in rounded_ranks) + (0 if exchange else exact.abs())
        return rounded * UNIT_ROUNDOFF[sync] * (1 + 1e-3)
    steps = sum(_block_amax(_contribution(r)) for r in rounded_ranks)
    if not exchange:
        steps = steps + _block_amax(exact) * (1 + 1e-3)  # the sum's requantization
    return steps / INT8_LEVELS / 2 * (1 + 1e-3)


@pytest.mark.parametrize("lane", [False, True], ids=["zeromq", "lane"])
@pytest.mark.parametrize("world", [2, 3], ids=["exchange", "star"])
def test_multi_process_star_allreduce_for_every_sync_dtype(world: int, lane: bool) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    hub = StarHub(world, token="arange", timeout_s=30, lane=lane)
    procs = [ctx.Process(target=_rank_process, args=(r, hub.address, results), daemon=True)
             for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        hub.wait_for_ranks(300)  # spawned processes import torch first: a minute on a busy machine
        exact = sum(_contribution(r) for r in range(world))
        for sync in SYNC_DTYPES:
            hub.sync_dtype = sync
            hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
            assert hub.on_lanes == lane
            totals = [hub.allreduce(_contribution(0)) for _ in range(2)]
            got = {}
            for _ in range(world - 1):
                rank, their_sync, theirs = results.get(timeout=120)
                got[rank] = theirs
                assert their_sync == sync
            for total in totals:
                assert total.dtype == torch.float32
                err = (total - exact).abs()
                assert torch.all(err <= _bound(sync, world)), f"{sync}: error {err.max().item()}"
                if sync == "fp32":
                    assert torch.equal(total, exact)
            for theirs in got.values():  # every rank decodes the very value the hub kept
                assert all(torch.equal(torch.tensor(a), b) for a, b in zip(theirs, totals, strict=True))
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        hub.close()


@pytest.mark.cluster
def test_served_cluster_generates_with_fp16_sync(checkpoints, tmp_path) -> None:
    log_path = tmp_path / "serve.log"
    with served(checkpoints("llama"), "--local-workers", "2", "--sync-dtype", "fp16", "--model-name", "m",
                log_path=log_path) as url:
        reply = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "The quick brown fox",
                                                          "max_tokens": 8, "temperature": 0, "ignore_eos": True},
                           timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 8
    log = log_path.read_text()
    assert log.count("sync dtype fp16") == 2, "each worker is configured with the cluster's sync dtype"
    assert "Traceback" not in log


@pytest.mark.cluster
def test_worker_refuses_an_unknown_sync_dtype_at_configure() -> None:
    from protos.edgellm.v1 import control_pb2 as pb
    from server.cli import DEFAULT_MODEL
    from server.workers import ClusterError, WorkerClient
    from tests.processes import edgellm, free_port, stop

    port = free_port()
    worker = edgellm("worker", "--host", "127.0.0.1", "--port", str(port), "--cluster-token", "t")
    client = WorkerClient(f"127.0.0.1:{port}", "t")
    try:
        client.wait_reachable(30)
        request = pb.ConfigureRequest(shard=pb.RankShard(rank=1, world_size=2, kv_head_end=2, mlp_end=384),
                                      config_json=(DEFAULT_MODEL / "config.json").read_text(),
                                      model_dir=str(DEFAULT_MODEL), hub_address="tcp://127.0.0.1:1", max_batch=1,
                                      max_context=16, dtype="float32", sync_dtype="fp8")
        with pytest.raises(ClusterError, match="FAILED_PRECONDITION.*unknown sync dtype 'fp8'"):
            client.configure(request)
        assert client.health().state == pb.HealthReply.IDLE
    finally:
        client.close()
        stop(worker)
