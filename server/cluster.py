"""The coordinator's view of its workers: gRPC clients, spawned local workers, and the
start-up sequence that turns them into a running cluster (configure, load, join the hub)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos.edgellm.v1 import control_pb2 as pb
from protos.edgellm.v1 import control_pb2_grpc as pb_grpc
from server.executor import Executor
from worker.collective import StarHub
from worker.config import ModelConfig
from worker.runtime import RankSpec
from worker.service import TOKEN_METADATA_KEY, shard_to_proto
from worker.sharding import plan_shards

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 10.0


class ClusterError(RuntimeError):
    """The cluster cannot be started; the message names the worker and the reason."""


class WorkerClient:
    def __init__(self, address: str, token: str):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self._meta = ((TOKEN_METADATA_KEY, token),)

    def _call(self, what: str, fn: Callable, request: object, timeout: float | None = RPC_TIMEOUT_S) -> object:
        try:
            return fn(request, metadata=self._meta, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "ERROR"
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise ClusterError(f"worker {self.address}: {what} failed ({code}): {detail}") from None

    def health(self, timeout: float = RPC_TIMEOUT_S) -> pb.HealthReply:
        return self._call("health check", self.stub.Health, pb.HealthRequest(), timeout)  # type: ignore[return-value]

    def wait_reachable(self, timeout_s: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ClusterError(f"worker {self.address} is not reachable (nothing answered within "
                               f"{timeout_s:.0f} s; is `edgellm worker` running there?)") from None
        self.health()

    def configure(self, request: pb.ConfigureRequest) -> None:
        self._call("configure", self.stub.Configure, request)

    def load(self, on_progress: Callable[[int, int], None]) -> None:
        stream = self._call("load", self.stub.Load, pb.LoadRequest(), timeout=None)
        try:
            for update in stream:  # type: ignore[attr-defined]
                on_progress(update.layers_loaded, update.layers_total)
        except grpc.RpcError as exc:
            raise ClusterError(f"worker {self.address}: load failed: {exc.details()}") from None

    def stats(self) -> pb.StatsReply:
        return self._call("stats", self.stub.Stats, pb.StatsRequest())  # type: ignore[return-value]

    def shutdown(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.stub.Shutdown(pb.ShutdownRequest(), metadata=self._meta, timeout=2)

    def close(self) -> None:
        self.channel.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn_local_workers(count: int, token: str, threads: int | None) -> tuple[list[str], list[subprocess.Popen]]:
    """Start ``count`` worker processes on loopback; returns their addresses and processes."""
    addresses, procs = [], []
    env = dict(os.environ, EDGELLM_CLUSTER_TOKEN=token, EDGELLM_PARENT_PID=str(os.getpid()))
    for _ in range(count):
        port = free_port()
        cmd = [sys.executable, "-m", "worker.cli", "--host", "127.0.0.1", "--port", str(port)]
        if threads:
            cmd += ["--threads", str(threads)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=str(Path(__file__).resolve().parents[1])))
        addresses.append(f"127.0.0.1:{port}")
    return addresses, procs


def advertised_host(worker_addresses: list[str]) -> str:
    """The local address the workers can reach us on: the interface that routes to them.

    A UDP ``connect`` only consults the routing table; no packet is sent.
    """
    hosts = {a.rsplit(":", 1)[0] for a in worker_addresses}
    if all(h in ("127.0.0.1", "localhost", "::1") for h in hosts):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((next(iter(hosts)), 9))
        return s.getsockname()[0]


@dataclass
class ClusterOptions:
    model_dir: str
    workers: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    token: str = ""
    max_batch: int = 8
    max_context: int = 2048
    dtype: str = "float32"
    hub_host: str | None = None  # address workers use to reach the hub (default: derived)
    hub_port: int = 0
    step_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0


@dataclass
class Cluster:
    executor: Executor
    clients: list[WorkerClient]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stats(self) -> list[dict]:
        out = []
        for client in self.clients:
            s = client.stats()
            out.append({"address": client.address, "rss_bytes": s.rss_bytes, "weight_bytes": s.weight_bytes,
                        "kv_cache_bytes": s.kv_cache_bytes, "steps": s.steps, "threads": s.threads})
        return out

    def rank_stats(self) -> dict[int, dict[str, float]]:
        """Numeric stats of every worker rank, keyed by rank (for /metrics)."""
        out = {}
        for rank, client in enumerate(self.clients, start=1):
            reply = client.stats()
            out[rank] = {f.name: float(v) for f, v in reply.ListFields() if isinstance(v, (int, float))}
        return out

    def close(self) -> None:
        self.executor.close()
        for client in self.clients:
            if self.processes:
                client.shutdown()
            client.close()
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def check_workers(addresses: list[str], token: str, timeout_s: float) -> list[WorkerClient]:
    """Connect to every worker, failing fast with the address of the first that is missing."""
    clients = [WorkerClient(a, token) for a in addresses]
    with ThreadPoolExecutor(max(1, len(clients))) as pool:
        for future in [pool.submit(c.wait_reachable, timeout_s) for c in clients]:
            future.result()
    return clients


def start_cluster(opts: ClusterOptions, clients: list[WorkerClient],
                  on_progress: Callable[[str, int, int], None] | None = None) -> Executor:
    """Plan the split, configure and load every worker, load rank 0 here, join the hub."""
    from worker.service import DTYPES

    config = ModelConfig.from_dir(opts.model_dir)
    world = len(clients) + 1
    shards = plan_shards(config, opts.weights or [1.0] * world)
    host = opts.hub_host or advertised_host([c.address for c in clients])
    bind_host = "127.0.0.1" if host == "127.0.0.1" else "0.0.0.0"
    hub = StarHub(world, bind=f"tcp://{bind_host}:{opts.hub_port}", token=opts.token,
                  timeout_s=opts.step_timeout_s)
    port = hub.address.rsplit(":", 1)[1]
    config_json = (Path(opts.model_dir) / "config.json").read_text()
    try:
        for client, shard in zip(clients, shards[1:], strict=True):
            client.configure(pb.ConfigureRequest(
                shard=shard_to_proto(shard), model_dir=str(Path(opts.model_dir).resolve()),
                config_json=config_json, hub_address=f"tcp://{host}:{port}",
                max_batch=opts.max_batch, max_context=opts.max_context, dtype=opts.dtype))

        def report(who: str, loaded: int, total: int) -> None:
            if on_progress:
                on_progress(who, loaded, total)

        with ThreadPoolExecutor(max(1, len(clients))) as pool:
            loads = [pool.submit(c.load, functools.partial(report, c.address)) for c in clients]
            spec = RankSpec(opts.model_dir, config, shards[0], opts.max_batch, opts.max_context,
                            DTYPES[opts.dtype])
            executor = Executor(spec, hub)
            report("rank 0", config.num_layers, config.num_layers)

            def still_loading() -> bool:
                for future in loads:
                    if future.done() and future.exception():
                        raise future.exception()  # type: ignore[misc]
                return not all(f.done() for f in loads)

            hub.wait_for_ranks(opts.connect_timeout_s, still_loading)
            for future in loads:
                future.result()
    except Exception:
        hub.close()
        raise
    log.info("cluster ready: %d ranks, split %s", world,
             json.dumps([[s.kv_heads, s.mlp_columns] for s in shards]))
    return executor


def wait_for_exit(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
