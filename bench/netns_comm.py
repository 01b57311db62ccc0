"""Communication per decoded token in the namespace cluster, against the issue's formula
2L x (payload / bandwidth + round trip), lanes and ZeroMQ, in one run (root only).

    sudo .venv/bin/python bench/netns_comm.py [--rates 100mbit,1gbit] [--worlds 2,4]
        [--planes lanes,lanes_spin0,zeromq] [--burst wire|default] [--rounds 3] [--steps 200]
        [--served] [--tokens 32] [--pin] [--out FILE]

Each (rate, world) gets a fresh ``deploy/netns-cluster.sh`` cluster (prefix ``edgellm-comm``,
removed at the end even on failure): the hub (rank 0) in the coordinator's namespace, worker
rank k in worker k's, every link capped with ``tc tbf`` both ways. Processes enter their
namespace themselves (``setns``) before they open a socket; the script stays in the root one.

``--burst wire`` (default) gives the token bucket 4 KiB, so frames leave at the link's rate
as on a real wire (tbf segments offloaded packets); ``default`` keeps the script's 10 ms
bucket, through which a 2 KB frame passes at once (a decode step never empties it): the
formula's payload / bandwidth only describes the first.

Planes: ``lanes`` (spinning as ``worker.comm.lane.spin_us`` decides: here every emulated host
has the machine's cores, so 2 ranks spin), ``lanes_spin0`` (``EDGELLM_SPIN_US=0``), ``zeromq``;
at 3+ ranks the hub's star sums in C (``lane_hub_allreduce_f32``), and ``lanes_hub_python``
keeps it in Python (``StarHub(c_star=False)``, what a 3+ rank hub ran before).

Measured, per configuration (every loop bounded in count and in time):

- ``rtt_us``: a 1-byte TCP_NODELAY ping-pong between the coordinator and worker 1 (Python
  sockets, p50 of 400): the formula's round trip.
- ``replay``: the communication of a decode step alone: the hub's STEP (batch layout and
  hidden row) and 2L allreduces of a (1, d) float32 row through ``StarHub.allreduce_`` /
  ``StarRank.allreduce_``, exactly as a model's blocks call them, with no compute in between.
  ``comm_ms_per_token`` is the median time per step at the hub. This is the measurement the
  goal is judged on: every rank shares this machine's 2 cores, so in a served run a 3-4 rank
  step waits for the other ranks' compute and cannot be told apart from communication.
- ``--served`` (decode with the model, 2 ranks only): rank 0's Executor decoding ``--tokens``
  greedy tokens with real ``WorkerRank`` processes, against the same shard decoding alone (a
  1-rank hub, no network); ``comm_ms_per_token`` = cluster minus alone, and
  ``in_allreduce_ms_per_token``: the time rank 0 spent inside its allreduce calls.

Formula: payload P = d x 4 bytes (fp32 sync), bandwidth B the cap, N ranks. ``goal_ms`` =
2L x ((N - 1) P / B + rtt) (the hub's link carries N - 1 payloads each way), ``ratio_to_goal`` =
the median over ``--rounds`` (the planes interleaved) / goal (the goal: at most 1.5).
``star_floor_ms`` = 2L x (2 (N - 1) P / B + rtt), the star's floor where a bucket holds less than
one frame (the hub gathers, then sends the sum back); the 4 KiB bucket of ``--burst wire`` holds
two 2 KB frames, so at 3 ranks a star comes in under it.
At N = 2 the exchange's floor is 2L x (P / B + rtt / 2).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit  # noqa: E402

from worker.comm import lane as lanes  # noqa: E402

log = logging.getLogger("bench.netns_comm")

SCRIPT = ROOT / "deploy" / "netns-cluster.sh"
PREFIX = os.environ.get("EDGELLM_BENCH_NETNS", "edgellm-comm")  # two benches at once need two prefixes
SUBNET = "10.77.0"
TOKEN = "netns-comm"
CLONE_NEWNET = 0x40000000
SHAPE: dict[str, Any] = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                             intermediate_size=1536, vocab_size=8000, max_position_embeddings=1024)  # "small"
# the data plane of a measurement: (EDGELLM_LANE, EDGELLM_SPIN_US or None for the default)
PLANES = {"lanes": ("1", None), "lanes_spin0": ("1", "0"), "zeromq": ("0", None), "lanes_hub_python": ("1", None)}
PING_WARMUP, PING_ITERS = 50, 400
STEP_WARMUP = 20
JOIN_S = 180.0  # spawning a rank (torch import) took over a minute on the loaded 2-core machine
BUDGET_S = 60.0  # the most one measurement loop runs
WIRE_BURST = 4096  # bytes: a bucket of a couple of frames


def exit_on_sigterm() -> None:
    """``timeout`` and ``kill`` end the script through its ``finally`` blocks, which remove the
    namespaces (the default SIGTERM would leave them behind)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def skip_reason() -> str:
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs ip and tc (iproute2)"
    if lanes.library() is None:
        return "the lane library cannot be built here"
    return ""


def address(node: int) -> str:
    """Node 0 is the coordinator, node k worker k."""
    return f"{SUBNET}.{node + 1}"


def namespace(node: int) -> str:
    return f"{PREFIX}-coordinator" if node == 0 else f"{PREFIX}-worker{node}"


def rate_bits(rate: str) -> int:
    units = {"gbit": 10 ** 9, "mbit": 10 ** 6, "kbit": 10 ** 3}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * scale)
    raise ValueError(f"rate {rate!r}: use kbit, mbit or gbit")


def _cluster_cmd(*args: str) -> None:
    env = dict(os.environ, EDGELLM_NETNS_PREFIX=PREFIX)
    subprocess.run(["bash", str(SCRIPT), *args], check=True, env=env, capture_output=True, text=True, timeout=120)


@contextmanager
def netns_cluster(workers: int, rate: str, burst: str) -> Iterator[None]:
    """A fresh namespace cluster, removed on the way out whatever happens."""
    try:
        _cluster_cmd("up", str(workers), "--rate", rate, *(["--burst", str(WIRE_BURST)] if burst == "wire" else []))
        yield
    finally:
        _cluster_cmd("down")


def enter(node: int) -> None:
    """Move this process's (main) thread into the node's network namespace; threads and sockets
    made afterwards are there too."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace(node)}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace(node)}")
    finally:
        os.close(fd)


def _in_node(node: int, core: int | None, target: Callable[..., None], *args: Any) -> None:
    enter(node)
    if core is not None:  # a core of its own, as a rank on its own host has
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("worker.comm.collective").setLevel(logging.ERROR)
    target(*args)


def use_plane(plane: str) -> None:
    """Set the environment the spawned ranks of ``plane`` read."""
    lane, spin = PLANES[plane]
    os.environ[lanes.DISABLE_ENV] = lane
    if spin is None:
        os.environ.pop(lanes.SPIN_ENV, None)
    else:
        os.environ[lanes.SPIN_ENV] = spin


def lane_spin(hub: Any) -> int | None:
    """The spin (µs) of the hub's lanes, None on ZeroMQ."""
    return next(iter(hub._lanes.values())).spin_us if hub.on_lanes else None


PIN: list[bool] = [False]  # --pin: node k's process on core k % cores


def spawn(node: int, target: Callable[..., None], *args: Any) -> mp.process.BaseProcess:
    core = node % (os.cpu_count() or 1) if PIN[0] else None
    proc = mp.get_context("spawn").Process(target=_in_node, args=(node, core, target, *args), daemon=True)
    proc.start()
    return proc


def reap(procs: list[mp.process.BaseProcess]) -> None:
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join(5)


# --- round trip -------------------------------------------------------------------------------------

def _pong(port: int) -> None:
    with socket.create_server((address(1), port)) as server:
        server.settimeout(JOIN_S)
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(1):
                conn.sendall(data)


def _ping(port: int, out: Any) -> None:
    deadline = time.monotonic() + JOIN_S
    while True:
        try:
            sock = socket.create_connection((address(1), port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    with sock:
        stop = time.monotonic() + BUDGET_S
        for i in range(PING_WARMUP + PING_ITERS):
            start = time.perf_counter()
            sock.sendall(b"x")
            sock.recv(1)
            if i >= PING_WARMUP:
                times.append(time.perf_counter() - start)
            if time.monotonic() > stop:
                break
    out.put(statistics.median(times) * 1e6)


def round_trip_us() -> float:
    port = 47000 + os.getpid() % 1000
    results = mp.get_context("spawn").Queue()
    procs = [spawn(1, _pong, port), spawn(0, _ping, port, results)]
    try:
        return float(results.get(timeout=JOIN_S + BUDGET_S))
    finally:
        reap(procs)


# --- the step's communication alone -------------------------------------------------------------------

def _replay_rank(rank: int, hub_address: str, allreduces: int, rows: int, d: int) -> None:
    from worker.comm.collective import CollectiveError, StarRank
    from worker.comm.wire import Kind

    link = StarRank(rank, hub_address, token=TOKEN, timeout_s=JOIN_S)
    try:
        link.wait_welcome(JOIN_S)
        deadline = time.monotonic() + 10 * BUDGET_S
        while time.monotonic() < deadline:
            msg = link.recv()
            if msg.kind == Kind.STOP:
                return
            if msg.kind != Kind.STEP:
                continue
            link.begin(msg)
            try:
                for _ in range(allreduces):
                    link.allreduce_(torch.ones(rows, d))  # (rows, d), given up as a block does
            except CollectiveError:
                continue  # an ABORT
    finally:
        link.close()


def _replay_hub(world: int, plane: str, allreduces: int, rows: int, d: int, steps: int, warmup: int, addresses: Any,
                out: Any) -> None:
    from worker.comm.collective import StarHub

    hub = StarHub(world, bind=f"tcp://{address(0)}:0", token=TOKEN, timeout_s=JOIN_S, lane=plane != "zeromq",
                  c_star=plane != "lanes_hub_python")
    try:
        addresses.put(hub.address)
        hub.wait_for_ranks(JOIN_S)
        spans = torch.tensor([[0, 0, 1]], dtype=torch.int64)  # (S=1, 3): slot, start, length
        hidden = torch.zeros(1, d)  # (T=1, d)
        times: list[float] = []
        total = torch.zeros(0)
        stop = time.monotonic() + BUDGET_S
        for i in range(warmup + steps):
            partials = [torch.ones(rows, d) for _ in range(allreduces)]  # (rows, d) each, made before the clock
            start = time.perf_counter()
            hub.start_step(spans, hidden)
            for partial in partials:
                total = hub.allreduce_(partial)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            if time.monotonic() > stop:
                break
        if not torch.equal(total, torch.full((rows, d), float(world))):
            raise AssertionError(f"the replayed allreduce summed to {total[0, :4].tolist()}, expected {world}")
        hub.stop()
        out.put({"on_lanes": hub.on_lanes, "spin_us": lane_spin(hub), "steps": len(times),
                 "comm_ms_per_token": round(statistics.median(times) * 1e3, 3),
                 "p90_ms": round(sorted(times)[int(0.9 * len(times))] * 1e3, 3)})
    finally:
        hub.close()


def replay(world: int, plane: str, allreduces: int, d: int, steps: int, rows: int = 1,
           warmup: int = STEP_WARMUP) -> dict[str, Any]:
    """The hub's time per step of one STEP and ``allreduces`` allreduces of (rows, d) float32."""
    ctx = mp.get_context("spawn")
    addresses, results = ctx.Queue(), ctx.Queue()
    use_plane(plane)
    procs = [spawn(0, _replay_hub, world, plane, allreduces, rows, d, steps, warmup, addresses, results)]
    try:
        hub_address = addresses.get(timeout=JOIN_S)
        for rank in range(1, world):
            procs.append(spawn(rank, _replay_rank, rank, hub_address, allreduces, rows, d))
        return dict(results.get(timeout=2 * JOIN_S + BUDGET_S))
    finally:
        reap(procs)


# --- served decode, 2 ranks -------------------------------------------------------------------------

def _served_worker(spec: Any, hub_address: str) -> None:
    from worker.rank.runtime import WorkerRank

    worker = WorkerRank(spec, hub_address, TOKEN)
    worker.start(JOIN_S)
    deadline = time.monotonic() + 10 * BUDGET_S
    while worker.running and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.stop()


def _decode(executor: Any, tokens: int) -> tuple[float, float]:
    """(median s per token, median s inside allreduces per token) of ``tokens`` greedy steps."""
    from worker.rank.step import SeqSpan

    prompt = [3, 5, 7, 11]
    logits = executor.step([prompt], [SeqSpan(0, 0, len(prompt))])
    step_s, inside_s = [], []
    stop = time.monotonic() + BUDGET_S
    for i in range(tokens):
        start = time.perf_counter()
        logits = executor.step([[int(logits[0].argmax())]], [SeqSpan(0, len(prompt) + i, 1)])
        step_s.append(time.perf_counter() - start)
        inside_s.append(sum(executor.allreduce_seconds))
        if time.monotonic() > stop:
            break
    return statistics.median(step_s), statistics.median(inside_s)


def _served_hub(model_dir: str, plane: str, tokens: int, runs: int, specs_out: Any, addresses: Any,
                out: Any) -> None:
    from worker.comm.collective import StarHub
    from worker.config import ModelConfig
    from worker.rank.executor import Executor
    from worker.rank.runtime import RankSpec
    from worker.shards.sharding import plan_shards

    config = ModelConfig.from_dir(Path(model_dir))
    shards = plan_shards(config, [1.0, 1.0])
    specs = [RankSpec(model_dir, config, s, max_batch=1, max_context=tokens + 16) for s in shards]
    alone = Executor(specs[0], StarHub(1, bind="tcp://127.0.0.1:0", token=TOKEN))
    hub = StarHub(2, bind=f"tcp://{address(0)}:0", token=TOKEN, timeout_s=JOIN_S, lane=plane != "zeromq")
    specs_out.put(specs[1])
    addresses.put(hub.address)
    executor = Executor(specs[0], hub)
    try:
        hub.wait_for_ranks(JOIN_S)
        _decode(executor, tokens)
        _decode(alone, tokens)  # warm-ups
        cluster, inside, solo = [], [], []
        for _ in range(runs):  # interleaved: each cluster run between two runs alone
            solo.append(_decode(alone, tokens)[0])
            step, allreduce = _decode(executor, tokens)
            cluster.append(step)
            inside.append(allreduce)
        solo.append(_decode(alone, tokens)[0])
        per_token, alone_s = statistics.median(cluster), statistics.median(solo)
        out.put({"on_lanes": hub.on_lanes, "spin_us": lane_spin(hub), "ms_per_token": round(per_token * 1e3, 3),
                 "alone_ms_per_token": round(alone_s * 1e3, 3),
                 "comm_ms_per_token": round((per_token - alone_s) * 1e3, 3),
                 "in_allreduce_ms_per_token": round(statistics.median(inside) * 1e3, 3)})
    finally:
        executor.close()
        alone.close()


def served(model_dir: Path, plane: str, tokens: int, runs: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    specs, addresses, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    use_plane(plane)
    procs = [spawn(0, _served_hub, str(model_dir), plane, tokens, runs, specs, addresses, results)]
    try:
        spec = specs.get(timeout=JOIN_S)
        procs.append(spawn(1, _served_worker, spec, addresses.get(timeout=JOIN_S)))
        return dict(results.get(timeout=JOIN_S + 4 * BUDGET_S * (runs + 1)))
    finally:
        reap(procs)


# --- the formula --------------------------------------------------------------------------------------

def formula(world: int, layers: int, d: int, rate: str, rtt_us: float) -> dict[str, float]:
    seconds_per_payload = d * 4 * 8 / rate_bits(rate)
    rtt = rtt_us * 1e-6
    goal = 2 * layers * ((world - 1) * seconds_per_payload + rtt)
    floor = (2 * layers * (seconds_per_payload + rtt / 2) if world == 2
             else 2 * layers * (2 * (world - 1) * seconds_per_payload + rtt))
    return {"payload_bytes": d * 4, "payload_over_bandwidth_us": round(seconds_per_payload * 1e6, 1),
            "goal_ms": round(goal * 1e3, 3), "goal_x1_5_ms": round(1.5 * goal * 1e3, 3),
            "star_floor_ms": round(floor * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="100mbit,1gbit")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--planes", default=",".join(PLANES), help="of " + ", ".join(PLANES))
    parser.add_argument("--burst", choices=("wire", "default"), default="wire")
    parser.add_argument("--steps", type=int, default=200, help="replayed decode steps per configuration")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every plane, interleaved")
    parser.add_argument("--served", action="store_true", help="also decode with the model (2 ranks)")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per served run")
    parser.add_argument("--runs", type=int, default=1, help="served runs per round (each beside a run alone)")
    parser.add_argument("--models", type=Path, default=Path("/tmp/edgellm-netns-comm"))
    parser.add_argument("--pin", action="store_true", help="node k's process on core k %% cores (a core per rank "
                        "where ranks <= cores: what separate hosts have)")
    parser.add_argument("--out")
    args = parser.parse_args()
    PIN[0] = args.pin
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if reason := skip_reason():
        emit({"skipped": reason}, args.out)
        return
    exit_on_sigterm()
    layers, d = SHAPE["num_hidden_layers"], SHAPE["hidden_size"]
    model_dir = args.models / "small"
    if args.served and not (model_dir / "config.json").exists():
        from planner.synthetic import write_random_llama

        write_random_llama(model_dir, SHAPE)
    result: dict[str, Any] = {"machine": {"cores": os.cpu_count()}, "pinned": args.pin, "loadavg_start": os.getloadavg(),
                              "shape": SHAPE, "burst": args.burst, "steps": args.steps, "configs": []}
    for rate in args.rates.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            with netns_cluster(world - 1, rate, args.burst):
                rtt = round_trip_us()
                entry: dict[str, Any] = {"rate": rate, "world": world, "rtt_us": round(rtt, 1),
                                         **formula(world, layers, d, rate, rtt)}
                planes = args.planes.split(",")
                rounds: list[dict[str, Any]] = []
                for r in range(args.rounds):  # the planes interleaved, the order flipped every round
                    row: dict[str, Any] = {}
                    for plane in planes if r % 2 == 0 else planes[::-1]:
                        row[f"replay_{plane}"] = replay(world, plane, 2 * layers, d, args.steps)
                        log.info("%s, %d ranks, %s: %s", rate, world, plane, row[f"replay_{plane}"])
                        if args.served and world == 2:
                            row[f"served_{plane}"] = served(model_dir, plane, args.tokens, args.runs)
                            log.info("%s, %d ranks, %s, served: %s", rate, world, plane, row[f"served_{plane}"])
                    rounds.append(row)
                entry["rounds"] = rounds
                entry["median_comm_ms_per_token"] = {
                    key: statistics.median(row[key]["comm_ms_per_token"] for row in rounds) for key in rounds[0]}
                entry["ratio_to_goal"] = {key: round(ms / entry["goal_ms"], 2)
                                          for key, ms in entry["median_comm_ms_per_token"].items()}
                entry["loadavg"] = os.getloadavg()[0]
            result["configs"].append(entry)
    result["loadavg_end"] = os.getloadavg()
    use_plane("lanes")
    emit(result, args.out)


if __name__ == "__main__":
    main()
