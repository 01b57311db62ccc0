"""Measure one node for the cost model: compute, memory bandwidth, disk, link, dispatch overhead.

Every measurement is bounded: a fixed amount of work, repeated a few times, best kept (the
best run is the machine's capability; the others saw noise from neighbours).

- ``matmul_gflop_s``: dense (n x n) @ (n x n) in each dtype (prefill is GEMM-bound); int8: fp32
  activations times an int8 weight through ``worker.kernels.quant.linear``.
- ``matvec_gb_s``: a vector times a set of weight matrices larger than the last-level cache,
  as bytes of weights per second (decode at batch 1 is bound by this), at an input width of
  4096; ``matvec_by_width`` also at 512 and 1024 (narrow matrices stream less efficiently).
  Every dtype goes through ``worker.kernels.quant.linear``, so it times the kernel a shard of that dtype
  runs here (the native float32 and int8 kernels where they build).
- ``copy_gb_s``: a large tensor copy (read + write bytes per second), for reference.
- ``layer_overhead_us`` / ``step_overhead_us``: what our own decode step costs beyond its matrix
  work, per layer and per step, measured by running it on tiny random models layer by layer in
  Python; ``native_layer_overhead_us`` the same per layer for the native step (``kernels/step.c``),
  where it runs here.
- ``allreduce_overhead_us``: one 2-rank star allreduce of a small payload over loopback, rank 1
  in its own process (ZeroMQ, CURVE, Python, the real ``worker.comm.collective`` code), minus the
  loopback round trip: the software cost each allreduce adds beyond the wire.
  ``exchange_overhead_us``: the same for the 2-rank exchange (what 2 ranks run), minus half a
  round trip. ``lane_overhead_us``: the star allreduce over a data-plane lane (``serve --lanes``),
  the hub summing in Python (a lossy sync dtype), minus the round trip: what the hub pays per
  worker rank there (absent where lanes cannot be built); ``lane_c_overhead_us`` the same with the
  hub's side in C (``lane_hub_allreduce_f32``, fp32 sync).
- ``disk``: sequential read of a file, with the page cache dropped first
  (``posix_fadvise(POSIX_FADV_DONTNEED)``), so it is a cold read: a hypervisor's own cache
  below a VM is out of reach and can still flatter the figure.
- ``link``: round trip and bandwidth to the coordinator's ``edgellm probe --serve-link``.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from worker.kernels.quant import SCALE_DTYPE, QuantWeight, linear

log = logging.getLogger(__name__)

MATVEC_WIDTHS = (512, 1024, 4096)  # input features of the probed matrices; the last is the headline
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT8 = "int8"  # weight-only int8 (``edgellm shard --quantize int8``), timed through worker.kernels.quant.linear


def _best_seconds(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    """Fastest of up to ``repeats`` calls (at least one), stopping once ``budget_s`` is spent."""
    fn()  # warm-up
    best, start = float("inf"), time.perf_counter()
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def _random_weight(dtype: str, rows: int, cols: int) -> Any:
    """One random (rows, cols) weight as a rank computes with it: a float tensor, or for int8 a
    ``QuantWeight`` (so the probe times the int8 kernel this node runs: native or torch's)."""
    if dtype == INT8:
        return QuantWeight(torch.randint(-127, 128, (rows, cols), dtype=torch.int8),
                           torch.rand(rows).mul_(0.01).to(SCALE_DTYPE), 0)
    return torch.randn(rows, cols).to(DTYPES[dtype])


def matmul_gflop_s(dtype: str, n: int = 1024, repeats: int = 5, budget_s: float = 3.0) -> float:
    """(n x n) @ (n x n) flop/s; int8: n fp32 rows times an int8 (n, n) weight through
    ``worker.kernels.quant.linear``, the kernel a quantized shard's prefill runs on this node."""
    if dtype == INT8:
        x, w = torch.randn(n, n), _random_weight(INT8, n, n)
        seconds = _best_seconds(lambda: linear(x, w), repeats, budget_s)
    else:
        a = torch.randn(n, n).to(DTYPES[dtype])
        b = torch.randn(n, n).to(DTYPES[dtype])
        seconds = _best_seconds(lambda: torch.mm(a, b), repeats, budget_s)
    return 2.0 * n ** 3 / seconds / 1e9


def matvec_pass(dtype: str, total_bytes: int = 256 << 20, cols: int = 4096) -> Callable[[], float]:
    """A function that runs one pass of ``x @ W.T`` over random matrices adding up to
    ``total_bytes`` (allocated once, here) and returns its weight bytes per second, in GB/s."""
    elem = 1 if dtype == INT8 else torch.tensor([], dtype=DTYPES[dtype]).element_size()
    rows = max(1, min(2048, total_bytes // (cols * elem)))
    count = max(1, total_bytes // (rows * cols * elem))
    mats = [_random_weight(dtype, rows, cols) for _ in range(count)]
    x = torch.randn(1, cols).to(torch.float32 if dtype == INT8 else DTYPES[dtype])  # int8 shards compute in fp32

    def one_pass() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for w in mats:
                linear(x, w)
        return count * rows * cols * elem / (time.perf_counter() - start) / 1e9

    return one_pass


def matvec_gb_s(dtype: str, total_bytes: int = 256 << 20, cols: int = 4096, repeats: int = 3,
                budget_s: float = 5.0) -> float:
    """Weight bytes per second of ``x @ W.T`` over matrices adding up to ``total_bytes`` (GB/s,
    the best of ``repeats`` passes after a warm-up, within ``budget_s``)."""
    one_pass = matvec_pass(dtype, total_bytes, cols)
    one_pass()  # warm-up
    best, start = 0.0, time.perf_counter()
    for _ in range(max(1, repeats)):
        best = max(best, one_pass())
        if time.perf_counter() - start > budget_s:
            break
    return best


def copy_gb_s(total_bytes: int = 256 << 20, repeats: int = 3, budget_s: float = 3.0) -> float:
    src = torch.ones(total_bytes // 4)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), repeats, budget_s)
    return 2.0 * total_bytes / seconds / 1e9


def dispatch_overhead_us(steps: int = 30, rounds: int = 3) -> dict[str, float]:
    """Framework cost of our own decode step, measured on two tiny random Llamas (hidden 64) of
    2 and 10 layers at 1 rank, where the matrix work is negligible: ``layer_overhead_us`` is the
    cost of one decoder layer's ops run from Python (norms, RoPE, KV cache, attention, the
    allreduce call...), ``step_overhead_us`` that of the rest of a step (embedding, plan, final
    norm, head); ``native_layer_overhead_us`` a layer's in the native step (the same models, the
    same loaded executor, its native step turned on), where it runs here."""
    from planner.synthetic import write_random_llama
    from worker.comm.collective import StarHub
    from worker.config import ModelConfig
    from worker.rank.executor import Executor
    from worker.rank.runtime import RankSpec
    from worker.rank.step import SeqSpan
    from worker.shards.sharding import plan_shards

    def step_seconds(model_dir: Path) -> tuple[float, float | None]:
        """(a decode step from Python, the same natively or None where the native step is off)."""
        config = ModelConfig.from_dir(model_dir)
        spec = RankSpec(str(model_dir), config, plan_shards(config, [1.0])[0], max_batch=1, max_context=steps + 16)
        executor = Executor(spec, StarHub(1))
        native = executor.model.native_step
        try:
            best: dict[bool, float] = {}
            for _ in range(rounds):
                for on in (False, True) if native is not None else (False,):
                    executor.model.native_step = native if on else None
                    executor.step([[1, 2, 3, 4]], [SeqSpan(0, 0, 4)])
                    times = []
                    for i in range(steps):
                        start = time.perf_counter()
                        executor.step([[5]], [SeqSpan(0, 4 + i, 1)])
                        times.append(time.perf_counter() - start)
                    best[on] = min(best.get(on, float("inf")), statistics.median(times))
            return best[False], best.get(True)
        finally:
            executor.model.native_step = native
            executor.close()

    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                 vocab_size=256, max_position_embeddings=256)
    with tempfile.TemporaryDirectory() as tmp:
        two, two_native = step_seconds(write_random_llama(Path(tmp) / "l2", {**shape, "num_hidden_layers": 2}))
        ten, ten_native = step_seconds(write_random_llama(Path(tmp) / "l10", {**shape, "num_hidden_layers": 10}))
    layer = max((ten - two) / 8, 0.0)
    out = {"layer_overhead_us": round(layer * 1e6, 1), "step_overhead_us": round(max(two - 2 * layer, 0.0) * 1e6, 1)}
    if two_native is not None and ten_native is not None:
        out["native_layer_overhead_us"] = round(max((ten_native - two_native) / 8, 0.0) * 1e6, 1)
    return out


def _probe_rank(address: str, phases: list[tuple[int, int]]) -> None:
    """Rank 1 of the allreduce probe, in its own process as on a real worker: ``phases`` of
    (allreduces, floats each), in the hub's order; this side answers a star or an exchange alike."""
    from worker.comm.collective import StarRank

    torch.set_num_threads(1)
    link = StarRank(1, address, token="probe", timeout_s=30)
    try:
        link.wait_welcome(30)
        link.begin(link.recv())
        for count, numel in phases:
            partial = torch.ones(numel)
            for _ in range(count):
                link.allreduce(partial)
    finally:
        link.close()


PAYLOAD_PROBE_FLOATS = 1 << 16  # 256 KB: a 128-token prefill chunk at width 512, in fp32


def allreduce_overhead_us(iters: int = 200, numel: int = 64) -> dict[str, float]:
    """A 2-rank star allreduce and exchange on loopback (rank 1 in a spawned process) and the
    loopback round trip, each as the mean of its quietest stretch; and the software cost per
    payload byte (ZeroMQ's copies, CURVE's encryption, the sum), from exchanges of 256 KB
    against ``numel`` floats, as MB/s: what a prefill chunk's allreduces pay beyond the wire."""
    import multiprocessing as mp

    from planner.link import LinkServer, measure_link
    from worker.comm.collective import StarHub

    large_iters = max(10, iters // 5)
    # (label, exchange?, allreduces, floats): rank 1 runs the same phases in the same order
    phases = [("star", False, iters, numel), ("exchange", True, iters, numel),
              ("exchange_large", True, large_iters, PAYLOAD_PROBE_FLOATS)]
    hub = StarHub(2, token="probe", timeout_s=60)
    proc = mp.get_context("spawn").Process(target=_probe_rank, args=(hub.address, [(n, f) for _, _, n, f in phases]),
                                           daemon=True)
    proc.start()
    times: dict[str, list[float]] = {}
    try:
        hub.wait_for_ranks(60)
        hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
        for label, exchange, count, floats in phases:
            hub.exchange = exchange
            partial = torch.ones(floats)
            samples = times[label] = []
            for _ in range(count):
                start = time.perf_counter()
                hub.allreduce(partial)
                samples.append(time.perf_counter() - start)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
        hub.close()
    server = LinkServer().start()
    try:
        rtt = measure_link("127.0.0.1", server.port, pings=iters, transfer_bytes=1 << 20)["rtt_us"]
    finally:
        server.stop()
    star_us, exchange_us, large_us = (quiet_mean(times[label][len(times[label]) // 10:]) * 1e6
                                      for label in ("star", "exchange", "exchange_large"))
    extra_bytes = (PAYLOAD_PROBE_FLOATS - numel) * 4
    log.info("probe: star allreduce over a data-plane lane on loopback")
    return lane_overhead_us(iters, numel, rtt) | {"allreduce_loopback_us": round(star_us, 1), "exchange_loopback_us": round(exchange_us, 1),
            "exchange_256kb_loopback_us": round(large_us, 1),
            "loopback_rtt_us": rtt, "allreduce_overhead_us": round(max(star_us - rtt, 0.0), 1),
            "exchange_overhead_us": round(max(exchange_us - rtt / 2, 0.0), 1),
            "allreduce_payload_mb_s": round(extra_bytes / max(large_us - exchange_us, 1.0), 1)}


def lane_overhead_us(iters: int, numel: int, rtt_us: float) -> dict[str, float]:
    """A 2-rank star allreduce over a lane on loopback (rank 1 in a spawned process, as
    ``allreduce_overhead_us``), minus the loopback round trip, the hub summing in Python
    (``lane_overhead_us``) and in C (``lane_c_overhead_us``); {} where lanes do not build."""
    python = _lane_star_us(iters, numel, c_star=False)
    if python is None:
        return {}
    out = {"lane_allreduce_loopback_us": round(python, 1), "lane_overhead_us": round(max(python - rtt_us, 0.0), 1)}
    if (in_c := _lane_star_us(iters, numel, c_star=True)) is not None:
        out |= {"lane_c_allreduce_loopback_us": round(in_c, 1), "lane_c_overhead_us": round(max(in_c - rtt_us, 0.0), 1)}
    return out


def _lane_star_us(iters: int, numel: int, c_star: bool) -> float | None:
    """µs of one 2-rank star allreduce over a lane (the quiet mean), or None where there is no lane."""
    import multiprocessing as mp

    from worker.comm import lane as lanes
    from worker.comm.collective import CollectiveError, StarHub

    if lanes.library() is None:
        return None
    hub = StarHub(2, token="probe", timeout_s=60, exchange=False, lane=True, c_star=c_star)
    proc = mp.get_context("spawn").Process(target=_probe_rank, args=(hub.address, [(iters, numel)]), daemon=True)
    proc.start()
    samples: list[float] = []
    try:
        hub.wait_for_ranks(120)
        hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
        if not hub.on_lanes:
            return None
        partial = torch.ones(numel)
        for _ in range(iters):
            start = time.perf_counter()
            hub.allreduce(partial)
            samples.append(time.perf_counter() - start)
        proc.join(30)
    except CollectiveError as exc:  # the probe's other figures stand without this one
        log.warning("probe: no lane figure (%s); a plan prices ZeroMQ's allreduces", exc)
        return None
    finally:
        if proc.is_alive():
            proc.kill()
        hub.close()
    return quiet_mean(samples[len(samples) // 10:]) * 1e6


def quiet_mean(samples: list[float], batches: int = 5, drop: float = 0.1) -> float:
    """The lowest mean of ``batches`` consecutive batches, each without its slowest ``drop``:
    the figure of the quietest stretch, so neighbours' load on a shared machine does not pass
    for the node's own cost. A mean, not a median, because a decode step's time is the sum of
    its allreduces and their times are skewed (p99 3-5x p50 on loopback here): the median of
    that stretch under-priced a 2-rank step's 16 allreduces by about 2 ms."""
    size = max(1, len(samples) // batches)

    def trimmed(batch: list[float]) -> float:
        kept = sorted(batch)[: max(1, math.ceil(len(batch) * (1 - drop)))]
        return sum(kept) / len(kept)

    return min(trimmed(samples[i:i + size]) for i in range(0, len(samples), size))


def _drop_cache(fd: int) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def disk_read_mb_s(path: str | Path, size_bytes: int = 256 << 20, block: int = 4 << 20) -> dict[str, Any]:
    """Cold sequential read speed of ``path``: a file is read (up to ``size_bytes``); in a
    directory a temporary file of ``size_bytes`` is written, synced, dropped from the cache and read."""
    path = Path(path)
    made = None
    if path.is_dir():
        fd, name = tempfile.mkstemp(prefix=".edgellm-probe-", dir=path)
        made = Path(name)
        chunk = os.urandom(min(block, size_bytes))
        with os.fdopen(fd, "wb") as f:
            left = size_bytes
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
        target = made
    elif path.is_file():
        target = path
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    try:
        fd = os.open(target, os.O_RDONLY)
        try:
            dropped = _drop_cache(fd)
            buf = bytearray(block)
            total, start = 0, time.perf_counter()
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                while total < size_bytes:
                    n = f.readinto(buf)
                    if not n:
                        break
                    total += n
            seconds = time.perf_counter() - start
            _drop_cache(fd)
        finally:
            os.close(fd)
    finally:
        if made is not None:
            made.unlink(missing_ok=True)
    return {"path": str(path), "bytes_read": total, "read_mb_s": round(total / seconds / 1e6, 1),
            "page_cache_dropped": dropped}


class ProbeError(RuntimeError):
    """A target outside this machine (the ``--disk`` path, the coordinator) failed; ``measurements``
    holds what was measured before, so the caller can still show it."""

    def __init__(self, message: str, measurements: dict[str, Any] | None = None):
        super().__init__(message)
        self.measurements = measurements or {}


CONNECT_TIMEOUT_S = 5.0


def check_targets(disk: str | None = None, disk_bytes: int = 256 << 20,
                  coordinator: tuple[str, int] | None = None) -> None:
    """Fail in a second on what would otherwise fail after all the measurements: a ``disk`` path
    that is missing, unwritable (a directory: the probe writes ``disk_bytes`` there), too full or
    unreadable, and a ``coordinator`` that does not accept a connection."""
    if disk is not None:
        path = Path(disk)
        try:
            if path.is_dir():
                try:
                    fd, name = tempfile.mkstemp(prefix=".edgellm-probe-", dir=path)  # as disk_read_mb_s does
                except OSError as exc:
                    raise ProbeError(f"--disk {disk}: cannot write a file there ({exc.strerror or exc})") from None
                os.close(fd)
                os.unlink(name)
                free = shutil.disk_usage(path).free
                if free < disk_bytes:
                    raise ProbeError(f"--disk {disk}: {free >> 20} MiB free, the probe writes {disk_bytes >> 20} MiB")
            elif path.is_file():
                with open(path, "rb"):
                    pass
                if path.stat().st_size == 0:
                    raise ProbeError(f"--disk {disk}: the file is empty (give a large file, or a directory)")
            else:
                what = "not a directory or a regular file" if path.exists() else "no such file or directory"
                raise ProbeError(f"--disk {disk}: {what}")
        except OSError as exc:
            raise ProbeError(f"--disk {disk}: {exc.strerror or exc}") from None
    if coordinator is not None:
        host, port = coordinator
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise ProbeError(f"--coordinator {host}:{port}: cannot connect ({exc.strerror or exc}); "
                             f"run `edgellm probe --serve-link {port}` on the coordinator first") from None


def probe_node(threads: int | None = None, dtypes: tuple[str, ...] = ("float32", "bfloat16", INT8),
               matvec_bytes: int = 256 << 20, matmul_n: int = 1024, disk: str | None = None,
               disk_bytes: int = 256 << 20, coordinator: tuple[str, int] | None = None,
               link_bytes: int = 64 << 20, allreduce_iters: int = 200) -> dict[str, Any]:
    """All measurements of this node as a mapping that ``planner.model.Node.from_dict`` reads."""
    if threads:
        torch.set_num_threads(threads)
    vm = psutil.virtual_memory()
    out: dict[str, Any] = {"name": socket.gethostname(), "machine": platform.machine(), "cpus": os.cpu_count(),
                           "threads": torch.get_num_threads(), "torch": str(torch.__version__),
                           "memory_bytes": int(vm.total), "memory_available_bytes": int(vm.available)}
    start = time.perf_counter()
    log.info("probe: matmul and matvec in %s", ", ".join(dtypes))
    out["matmul_gflop_s"] = {d: round(matmul_gflop_s(d, matmul_n), 2) for d in dtypes}
    widths = {d: {w: round(matvec_gb_s(d, matvec_bytes, cols=w), 3) for w in MATVEC_WIDTHS} for d in dtypes}
    out["matvec_gb_s"] = {d: widths[d][MATVEC_WIDTHS[-1]] for d in dtypes}
    out["matvec_by_width"] = widths
    out["copy_gb_s"] = round(copy_gb_s(matvec_bytes), 3)
    log.info("probe: decode dispatch overhead")
    out.update(dispatch_overhead_us())
    log.info("probe: star allreduce overhead on loopback")
    out.update(allreduce_overhead_us(allreduce_iters))
    if disk:
        log.info("probe: disk read on %s", disk)
        try:
            out["disk"] = disk_read_mb_s(disk, disk_bytes)
        except OSError as exc:
            raise ProbeError(f"disk read on {disk}: {exc.strerror or exc}", out) from None
    if coordinator:
        log.info("probe: link to %s:%d", *coordinator)
        from planner.link import measure_link

        try:
            link = measure_link(coordinator[0], coordinator[1], transfer_bytes=link_bytes)
        except OSError as exc:
            raise ProbeError(f"link to {coordinator[0]}:{coordinator[1]}: {exc.strerror or exc}", out) from None
        out["link"] = {"coordinator": f"{coordinator[0]}:{coordinator[1]}", **link}
    out["probe_seconds"] = round(time.perf_counter() - start, 2)
    return out
