"""Allreduce latency on loopback: our star (each sync dtype) against torch.distributed gloo and a
ring (reduce-scatter + allgather over ZeroMQ), every rank in its own process, all in one run.

    .venv/bin/python bench/allreduce.py [--worlds 2,3,4] [--sizes-kb 16,64,256,1024]
        [--dtypes fp32,fp16,bf16,int8] [--iters 300] [--seconds 2] [--rounds 3] [--out FILE]

A payload of S KB is S*256 float32 values shaped (rows, 1024) like a batch of hidden states;
a sync dtype other than fp32 puts fewer bytes on the wire (``wire_bytes``: one rank's message).
Rank r contributes ``base * (r + 1)``; every result is checked against the known sum (fp32
paths tightly, reduced dtypes within their format's error). Latency is rank 0's (the hub's)
time per allreduce after a warm-up, at most ``--iters`` samples or ``--seconds`` per
configuration. ``--rounds`` more back-to-back pairs of the fp32 star and gloo (the order flipped
each round) give ``star_fp32_vs_gloo_paired``: each pair's ratio and their median, the
comparison least at the mercy of one busy moment. The star runs CURVE-encrypted as in serving; gloo and ``ring`` are plaintext,
``ring_curve`` is the ring with CURVE on every link. At two ranks the star is the exchange
(``worker.comm.collective``: both partials cross at once, one hop); ``star_two_hop_fp32`` is the
two-hop star it replaced, for comparison. The star's ranks spin 300 µs on their
socket before they sleep when every rank has a core of its own (``star_spin_us``; what
``EDGELLM_SPIN_US`` does in a deployment with one rank per device), and not when they share.
This machine is noisy and small: compare numbers of one run, not across runs.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import zmq
import zmq.utils.z85

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from worker.comm.collective import CollectiveError, StarHub, StarRank  # noqa: E402
from worker.comm.wire import SYNC_DTYPES, Kind, sync_payload  # noqa: E402

log = logging.getLogger("bench.allreduce")

ROW = 1024  # values per row of a payload
WARMUP = 10
JOIN_S = 60.0
SPIN_S = 300e-6  # star spin where each rank has its own core (see star_spin_s)


def base_payload(numel: int) -> torch.Tensor:
    """The values every rank scales by (rank + 1): a (rows, ROW) float32 ramp in [-1, 1]."""
    return torch.linspace(-1.0, 1.0, numel).view(-1, min(numel, ROW))


def _check(total: torch.Tensor, numel: int, world: int, atol: float) -> None:
    expected = base_payload(numel) * (world * (world + 1) / 2)
    err = (total.float() - expected).abs().max().item()
    if err > atol:
        raise AssertionError(f"allreduce of {numel} values on {world} ranks is off by {err} (allowed {atol})")


def _tolerance(sync: str, world: int) -> float:
    """Worst error of the sum of ``world`` payloads of absmax <= world, in this sync dtype."""
    peak = world * (world + 1) / 2
    return {"fp32": 1e-5 * peak, "fp16": 2 * peak * 2.0 ** -11, "bf16": 2 * peak * 2.0 ** -8,
            "int8": 2 * peak / 127}[sync]


def percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    return {"p50_us": round(pick(0.50), 1), "p99_us": round(pick(0.99), 1), "samples": len(ordered)}


def _timed(fn: Callable[[], torch.Tensor], iters: int, seconds: float) -> tuple[list[float], torch.Tensor]:
    """Warm up, then call ``fn`` at most ``iters`` times or until ``seconds`` are spent."""
    result = fn()
    for _ in range(WARMUP - 1):
        result = fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < iters and time.perf_counter() < deadline:
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def _agreed_count(times: list[float], iters: int, seconds: float) -> int:
    """Iterations that fit in the time budget, judged from the warm-up (rank 0 decides)."""
    per_iter = max(sum(times) / max(len(times), 1), 1e-6)
    return max(1, min(iters, int(seconds / per_iter)))


# --- star (the project's collective) ---------------------------------------------------------

def star_spin_s(world: int) -> float:
    """The spin before a star receive sleeps (``worker.comm.collective.default_spin_wait_s``): as a
    deployment sets it, on (300 µs) when every rank has a core of its own, off when they share."""
    return SPIN_S if world <= (os.cpu_count() or 1) else 0.0


def _star_rank(rank: int, address: str, spin_s: float) -> None:
    """A worker rank: each STEP names a configuration (numel, sync dtype); ABORT ends it."""
    torch.set_num_threads(1)
    logging.getLogger("worker.comm.collective").setLevel(logging.ERROR)
    link = StarRank(rank, address, token="bench", timeout_s=JOIN_S, spin_wait_s=spin_s)
    link.wait_welcome(JOIN_S)
    names = list(SYNC_DTYPES)
    try:
        while True:
            msg = link.recv()
            if msg.kind == Kind.STOP:
                return
            if msg.kind != Kind.STEP:
                continue
            numel, sync = (int(v) for v in msg.tensors[0][0, :2])
            link.begin(msg)
            link.sync_dtype = names[sync]
            partial = base_payload(numel) * (rank + 1)
            try:
                while True:
                    link.allreduce(partial)
            except CollectiveError:
                pass  # the hub moved on to the next configuration
    finally:
        link.close()


def bench_star(world: int, sizes: list[int], dtypes: list[str], iters: int, seconds: float,
               exchange: bool = True) -> dict[str, Any]:
    """{"<sync>": {"<KB>": percentiles + wire_bytes}} for one star of ``world`` ranks (at two
    ranks the exchange unless ``exchange`` is False)."""
    hub = StarHub(world, token="bench", timeout_s=JOIN_S, spin_wait_s=star_spin_s(world), exchange=exchange)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_star_rank, args=(r, hub.address, hub.spin_wait_s), daemon=True)
             for r in range(1, world)]
    for p in procs:
        p.start()
    out: dict[str, Any] = {}
    try:
        hub.wait_for_ranks(JOIN_S)
        for sync in dtypes:
            hub.sync_dtype = sync
            for kb in sizes:
                numel = kb * 256
                layout = torch.tensor([[numel, list(SYNC_DTYPES).index(sync), 0]], dtype=torch.int64)
                hub.start_step(layout, torch.zeros(0))
                partial = base_payload(numel)
                times, total = _timed(lambda: hub.allreduce(partial), iters, seconds)  # noqa: B023
                hub.abort_step()
                _check(total, numel, world, _tolerance(sync, world))
                wire = sum(t.numel() * t.element_size() for t in sync_payload(partial, sync))
                out.setdefault(sync, {})[str(kb)] = {**percentiles(times), "wire_bytes": wire}
        hub.stop()
        for p in procs:
            p.join(JOIN_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        hub.close()
    return out


# --- gloo -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, sizes: list[int], iters: int, seconds: float,
               out: mp.Queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = {}
    for kb in sizes:
        numel = kb * 256
        partial = base_payload(numel) * (rank + 1)

        def once() -> torch.Tensor:
            tensor = partial.clone()  # gloo reduces in place  # noqa: B023
            dist.all_reduce(tensor)
            return tensor

        warm, _ = _timed(once, WARMUP, 1e9)
        count = torch.tensor([_agreed_count(warm, iters, seconds) if rank == 0 else 0])
        dist.all_reduce(count)
        times, total = _timed(once, int(count), 1e9)
        _check(total, numel, world, _tolerance("fp32", world))
        result[str(kb)] = percentiles(times)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def bench_gloo(world: int, sizes: list[int], iters: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_rank, args=(r, world, port, sizes, iters, seconds, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        return results.get(timeout=JOIN_S + len(sizes) * (seconds + 30))
    finally:
        _reap(procs)


def _reap(procs: Sequence[BaseProcess]) -> None:
    """Join every rank process, killing any still alive after ``JOIN_S``."""
    for p in procs:
        p.join(JOIN_S)
        if p.is_alive():
            p.kill()


# --- ring -------------------------------------------------------------------------------------

class Ring:
    """Ring allreduce (reduce-scatter, then allgather) over ZeroMQ PUSH/PULL on loopback.

    Each rank pushes to its right neighbour and pulls from its left; each of the 2(N-1) steps
    moves 1/N of the tensor, so every link carries 2(N-1)/N of it (the star's hub link carries
    2(N-1) times it). Chunks of 64 KB and more are sent zero-copy and tracked, so a chunk is
    never overwritten while ZeroMQ may still read it. ``curve``: every link CURVE-encrypted as
    the star's are (one bench key, no token check), to compare like with like.
    """

    def __init__(self, rank: int, world: int, curve: bool = False):
        self.rank, self.world = rank, world
        self._ctx = zmq.Context()
        self.pull = self._ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.push = self._ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        if curve:
            secret = zmq.utils.z85.encode(hashlib.sha256(b"edgellm/bench/ring").digest())
            self.pull.curve_server = True
            self.pull.curve_secretkey = secret
            self.push.curve_serverkey = zmq.curve_public(secret)
            self.push.curve_publickey, self.push.curve_secretkey = zmq.curve_keypair()
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._trackers: list[zmq.MessageTracker] = []

    def connect(self, right: str) -> None:
        self.push.connect(right)

    def _send(self, chunk: torch.Tensor) -> None:
        data = chunk.numpy().data  # a memoryview of the chunk
        if chunk.nbytes >= zmq.COPY_THRESHOLD:
            self._trackers.append(self.push.send(data, copy=False, track=True))
        else:
            self.push.send(data)

    def _recv(self, like: torch.Tensor) -> torch.Tensor:
        if not self.pull.poll(int(JOIN_S * 1000)):
            raise TimeoutError("ring neighbour went quiet")
        frame = self.pull.recv(copy=False)
        if len(frame.buffer) != like.nbytes:
            raise ValueError(f"ring chunk of {len(frame.buffer)} bytes, expected {like.nbytes}")
        return torch.frombuffer(frame.buffer, dtype=like.dtype) if like.nbytes else like

    def _flush(self) -> None:
        for tracker in self._trackers:
            tracker.wait(JOIN_S)
        self._trackers.clear()

    def allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``tensor`` (a new tensor; the input is left alone)."""
        flat = tensor.reshape(-1).clone()
        chunks = list(flat.tensor_split(self.world))
        r, n = self.rank, self.world
        for s in range(n - 1):  # reduce-scatter: afterwards chunk (r + 1) % n holds the full sum
            self._send(chunks[(r - s) % n])
            target = chunks[(r - s - 1) % n]
            target.add_(self._recv(target))
        self._flush()  # the allgather overwrites chunks the reduce-scatter sent
        for s in range(n - 1):
            self._send(chunks[(r - s + 1) % n])
            target = chunks[(r - s) % n]
            target.copy_(self._recv(target))
        self._flush()  # the caller owns the result; no send may still read it
        return flat.view(tensor.shape)

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)
        self._ctx.term()


def _ring_rank(rank: int, world: int, curve: bool, addresses: mp.Queue, ring_order: mp.Queue, sizes: list[int],
               iters: int, seconds: float, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    ring = Ring(rank, world, curve)
    addresses.put((rank, ring.address))
    everyone = ring_order.get(timeout=JOIN_S)
    ring.connect(everyone[(rank + 1) % world])
    result = {}
    try:
        for kb in sizes:
            numel = kb * 256
            partial = base_payload(numel) * (rank + 1)
            warm, _ = _timed(lambda: ring.allreduce(partial), WARMUP, 1e9)  # noqa: B023
            agreed = torch.zeros(world)
            agreed[0] = _agreed_count(warm, iters, seconds) if rank == 0 else 0
            count = int(ring.allreduce(agreed)[0])
            times, total = _timed(lambda: ring.allreduce(partial), count, 1e9)  # noqa: B023
            _check(total, numel, world, _tolerance("fp32", world))
            result[str(kb)] = percentiles(times)
        if rank == 0:
            out.put(result)
    finally:
        ring.close()


def bench_ring(world: int, sizes: list[int], iters: int, seconds: float, curve: bool = False) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    addresses, results = ctx.Queue(), ctx.Queue()
    orders = [ctx.Queue() for _ in range(world)]
    procs = [ctx.Process(target=_ring_rank, args=(r, world, curve, addresses, orders[r], sizes, iters, seconds,
                                                  results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        found = dict(addresses.get(timeout=JOIN_S) for _ in range(world))
        for q in orders:
            q.put([found[r] for r in range(world)])
        return results.get(timeout=JOIN_S + len(sizes) * (seconds + 30))
    finally:
        _reap(procs)


# --- the report -------------------------------------------------------------------------------

def paired_rounds(world: int, sizes: list[int], rounds: int, iters: int, seconds: float) -> dict[str, Any]:
    """The fp32 star against gloo in ``rounds`` back-to-back pairs, the order flipped every round
    (star first, then gloo first, ...), so a busy minute of a shared machine falls on both sides
    of a pair rather than on one method's only run. Per size: each round's p50s and ratio, and
    the median ratio, the figure to compare with a goal."""
    out: dict[str, Any] = {"rounds": []}
    for r in range(rounds):
        order = ("star", "gloo") if r % 2 == 0 else ("gloo", "star")
        p50: dict[str, dict[str, float]] = {}
        for method in order:
            by_size = (bench_star(world, sizes, ["fp32"], iters, seconds)["fp32"] if method == "star"
                       else bench_gloo(world, sizes, iters, seconds))
            p50[method] = {kb: by_size[kb]["p50_us"] for kb in by_size}
        out["rounds"].append({"first": order[0], "star_p50_us": p50["star"], "gloo_p50_us": p50["gloo"],
                              "ratio": {kb: round(p50["star"][kb] / p50["gloo"][kb], 2) for kb in p50["star"]}})
    out["median_ratio"] = {str(kb): statistics.median(r["ratio"][str(kb)] for r in out["rounds"]) for kb in sizes}
    return out


def compare(world: int, sizes: list[int], dtypes: list[str], iters: int, seconds: float,
            methods: tuple[str, ...] = ("star", "gloo", "ring", "ring_curve"), rounds: int = 1) -> dict[str, Any]:
    """Every method at every size for one world size, with star/gloo p50 ratios; with
    ``rounds`` > 1 also the fp32 star and gloo in that many more pairs (``paired_rounds``)."""
    entry: dict[str, Any] = {}
    if "star" in methods:
        log.info("%d ranks: star %s", world, ",".join(dtypes))
        for sync, by_size in bench_star(world, sizes, dtypes, iters, seconds).items():
            entry[f"star_{sync}"] = by_size
        if world == 2:  # what the exchange saves: the two-hop star it replaces
            log.info("2 ranks: two-hop star fp32")
            entry["star_two_hop_fp32"] = bench_star(world, sizes, ["fp32"], iters, seconds, exchange=False)["fp32"]
        entry["star_spin_us"] = round(star_spin_s(world) * 1e6)
    if "gloo" in methods:
        log.info("%d ranks: gloo", world)
        entry["gloo"] = bench_gloo(world, sizes, iters, seconds)
    for name in ("ring", "ring_curve"):
        if name in methods:
            log.info("%d ranks: %s", world, name)
            entry[name] = bench_ring(world, sizes, iters, seconds, curve=name == "ring_curve")
    if "gloo" in entry:
        ratios = {}
        for name, by_size in entry.items():
            if name not in ("gloo", "star_spin_us"):
                ratios[name] = {kb: round(by_size[kb]["p50_us"] / entry["gloo"][kb]["p50_us"], 2) for kb in by_size}
        entry["p50_over_gloo"] = ratios
    if rounds > 1 and "star" in methods and "gloo" in methods:
        log.info("%d ranks: star fp32 and gloo, %d more rounds in pairs", world, rounds)
        entry["star_fp32_vs_gloo_paired"] = paired_rounds(world, sizes, rounds, iters, seconds)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,3,4", help="rank counts (default: 2,3,4)")
    parser.add_argument("--sizes-kb", default="16,64,256,1024", help="fp32 payload sizes in KB")
    parser.add_argument("--dtypes", default=",".join(SYNC_DTYPES), help="star sync dtypes (default: all)")
    parser.add_argument("--methods", default="star,gloo,ring,ring_curve",
                        help="which of star,gloo,ring,ring_curve to run (default: all)")
    parser.add_argument("--iters", type=int, default=300, help="most samples per configuration")
    parser.add_argument("--seconds", type=float, default=2.0, help="most seconds per configuration")
    parser.add_argument("--rounds", type=int, default=3,
                        help="extra back-to-back pairs of the fp32 star and gloo whose median ratio is "
                             "reported (1: none)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("worker.comm.collective").setLevel(logging.ERROR)  # stale partials after each ABORT
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes_kb.split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d]
    methods = tuple(m for m in args.methods.split(",") if m)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()},
        "settings": {"sizes_kb": sizes, "row": ROW, "iters": args.iters, "seconds": args.seconds},
    }
    for world in (int(w) for w in args.worlds.split(",")):
        result[f"{world}_ranks"] = compare(world, sizes, dtypes, args.iters, args.seconds, methods, args.rounds)
    emit(result, args.out)


if __name__ == "__main__":
    main()
