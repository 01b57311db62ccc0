"""The running cluster as the coordinator sees it: start-up (plan, configure, load, join the
hub), supervision of local worker processes, and repair after a rank fails."""

from __future__ import annotations

import functools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos.edgellm.v1 import control_pb2 as pb
from server.shard_source import serve_shards
from server.workers import ClusterError, LocalWorker, WorkerClient
from worker.comm.collective import CollectiveError, StarHub
from worker.comm.wire import sync_dtype_name
from worker.config import ModelConfig
from worker.rank.executor import Executor
from worker.rank.runtime import RankSpec
from worker.rank.service import DTYPES, shard_to_proto, stats_dict, stats_reply
from worker.shards.shard_fetch import verify_shard_file
from worker.shards.sharding import RankShard, plan_shards
from worker.shards.weights import HUB_FILE, shard_file_name

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (who, layers loaded, total)
SUPERVISE_INTERVAL_S = 0.5

__all__ = ["Cluster", "ClusterError", "ClusterOptions", "advertised_host"]


def _running(future: Future) -> bool:
    """Whether ``future`` still runs; one that failed raises its error (a rank's failed load
    then says why, not only that the rank never joined)."""
    if future.done() and (exc := future.exception()) is not None:
        raise exc
    return not future.done()


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


def ranks_on_host(worker_addresses: list[str]) -> Callable[[int], int]:
    """rank -> how many ranks run on its host, from the workers' addresses (rank r is
    ``worker_addresses[r - 1]``; rank 0, the coordinator, shares the loopback workers' host).
    A lane spins before it sleeps only where its host has a core to spare beyond one per rank
    (``worker.comm.lane.spin_us``)."""
    hosts = ["127.0.0.1"] + [a.rsplit(":", 1)[0].replace("localhost", "127.0.0.1") for a in worker_addresses]
    return lambda rank: hosts.count(hosts[rank]) if 0 <= rank < len(hosts) else 1


@dataclass
class ClusterOptions:
    model_dir: str
    weights: list[float] | None = None
    token: str = ""
    max_batch: int = 8
    max_context: int = 2048
    dtype: str = "float32"
    hub_host: str | None = None  # address workers use to reach the hub (default: derived)
    hub_port: int = 0
    step_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    memory_budget: int | None = None  # rank 0's (workers have their own `--memory-budget`)
    expert_cache: int | None = None  # rank 0's expert cache bytes
    shard_port: int = 0  # ShardSource port for workers that fetch the model (0: any free port)
    ship_shards: bool = False  # every worker fetches its files from us, even if it sees the path
    sync_dtype: str = "fp32"  # allreduce payload dtype of every rank: fp32 (exact), fp16, bf16, int8
    lanes: bool | None = None  # allreduces over lanes (None: yes unless EDGELLM_LANE=0, see worker.comm.lane)
    lane_port: int = 0  # TCP port of the data-plane lanes (0: any free port)
    encrypt: bool = False  # lanes encrypt their payloads (they are always authenticated)


def verify_coordinator_files(model_dir: str, world_size: int) -> None:
    """Check rank 0's shard file and ``hub.safetensors`` against the manifest, as every worker
    checks its own (a no-op for a Hugging Face directory). ``serve`` calls it before it waits for
    its local workers, so a corrupted file fails in seconds, not after they imported torch."""
    for name in (shard_file_name(0, world_size), HUB_FILE):
        verify_shard_file(model_dir, name)


@dataclass
class Cluster:
    opts: ClusterOptions
    shards: list[RankShard]
    hub_address: str  # as the workers reach it
    shard_source: str  # host:port of our ShardSource, as the workers reach it
    shard_server: grpc.Server
    executor: Executor
    clients: list[WorkerClient]  # rank r is clients[r - 1]
    local: list[LocalWorker] = field(default_factory=list)
    on_progress: Progress | None = None
    missing: set[int] = field(default_factory=set)  # ranks the heartbeat found out of the data plane
    _closing: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, opts: ClusterOptions, clients: list[WorkerClient], local: list[LocalWorker],
              on_progress: Progress | None = None) -> Cluster:
        """Plan the split, configure and load every worker, load rank 0 here, join the hub. The
        caller has checked rank 0's files (``verify_coordinator_files``): none is hashed twice."""
        config = ModelConfig.from_dir(opts.model_dir)
        shards = plan_shards(config, opts.weights or [1.0] * (len(clients) + 1))
        host = opts.hub_host or advertised_host([c.address for c in clients])
        bind_host = "127.0.0.1" if host == "127.0.0.1" else "0.0.0.0"
        hub = StarHub(len(shards), bind=f"tcp://{bind_host}:{opts.hub_port}", token=opts.token,
                      timeout_s=opts.step_timeout_s, sync_dtype=opts.sync_dtype, lane=opts.lanes,
                      lane_port=opts.lane_port,
                      encrypt=opts.encrypt, ranks_on_host=ranks_on_host([c.address for c in clients]))
        hub_address = f"tcp://{host}:{hub.address.rsplit(':', 1)[1]}"
        shard_server, shard_port = serve_shards(opts.model_dir, bind_host, opts.shard_port, opts.token)
        shard_source = f"{host}:{shard_port}"
        try:
            abandoned = threading.Event()  # set when the start fails: no worker is configured or waited for after it
            with ThreadPoolExecutor(max(1, len(clients))) as pool:
                loads = [pool.submit(cls._join, opts, client, shard, hub_address, shard_source, on_progress,
                                     abandoned)
                         for client, shard in zip(clients, shards[1:], strict=True)]
                try:
                    spec = RankSpec(opts.model_dir, config, shards[0], opts.max_batch, opts.max_context,
                                    DTYPES[opts.dtype], memory_budget=opts.memory_budget,
                                    expert_cache_bytes=opts.expert_cache, sync_dtype=hub.sync_dtype)
                    executor = Executor(spec, hub)
                    if on_progress:
                        on_progress("rank 0", config.num_layers, config.num_layers)

                    def still_loading() -> bool:
                        for future in loads:
                            if future.done() and (exc := future.exception()):
                                raise exc
                        return not all(f.done() for f in loads)

                    hub.wait_for_ranks(opts.connect_timeout_s, still_loading)
                    for future in loads:
                        future.result()
                except BaseException:
                    # One rank failed: the others' Loads would wait for a welcome that never comes,
                    # and a _join not yet started would configure a worker for a cluster that is gone.
                    abandoned.set()
                    for client in clients:
                        client.cancel_load()
                    raise
        except Exception:
            hub.close()
            shard_server.stop(grace=None)
            raise
        log.info("cluster ready: %d ranks, split %s", len(shards),
                 json.dumps([[s.kv_heads, s.mlp_columns] for s in shards]))
        cluster = cls(opts, shards, hub_address, shard_source, shard_server, executor, clients, local, on_progress)
        hub.missing_ranks = lambda: cluster.missing
        threading.Thread(target=cluster._supervise, name="supervisor", daemon=True).start()
        return cluster

    @staticmethod
    def _join(opts: ClusterOptions, client: WorkerClient, shard: RankShard, hub_address: str, shard_source: str,
              on_progress: Progress | None, abandoned: threading.Event | None = None) -> None:
        """Configure one worker as ``shard.rank`` and load it (it then says HELLO to the hub).

        A worker without the model directory fetches the files from ``shard_source`` first.
        Once ``abandoned`` is set (another rank failed) it neither configures nor waits."""
        if abandoned is not None and abandoned.is_set():
            raise ClusterError(f"worker {client.address}: not configured, the cluster start was abandoned")
        config_json = (Path(opts.model_dir) / "config.json").read_text()
        client.configure(pb.ConfigureRequest(
            shard=shard_to_proto(shard), config_json=config_json,
            model_dir="" if opts.ship_shards else str(Path(opts.model_dir).resolve()),
            hub_address=hub_address, max_batch=opts.max_batch, max_context=opts.max_context, dtype=opts.dtype,
            shard_source=shard_source, sync_dtype=sync_dtype_name(opts.sync_dtype)))
        report = functools.partial(on_progress, client.address) if on_progress else (lambda i, n: None)
        client.load(report, abandoned)

    def _supervise(self) -> None:
        """Heartbeat every worker over gRPC and restart local worker processes that died.

        A rank that does not answer READY within a second is reported missing (``missing``):
        /health turns 503 and the engine repairs the cluster without waiting for a step to
        time out. An unplugged Pi is found this way in about two seconds.
        """
        while not self._closing.wait(SUPERVISE_INTERVAL_S):
            for worker in self.local:
                worker.restart_if_dead()
            self.missing = {rank for rank, client in enumerate(self.clients, start=1)
                            if not self._closing.is_set() and not client.is_ready(timeout=1.0)}

    def workers_up(self) -> int:
        return sum(client.is_ready() for client in self.clients)

    def recover(self, deadline: float) -> bool:
        """Bring every rank back into the data plane before ``deadline`` (time.monotonic()).

        Ranks still in the data plane only drop the failed step; a rank that is gone is waited
        for (a restarted process at the same address), configured, loaded and joined again.
        The KV caches are rebuilt by the engine, which replays its sequences.
        """
        hub = self.executor.hub
        hub.abort_step()
        for rank, client in enumerate(self.clients, start=1):
            if client.is_ready():
                continue
            log.warning("rank %d (%s) is out of the data plane; waiting for it", rank, client.address)
            try:
                while not self._closing.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    try:
                        client.wait_reachable(min(left, 2.0))
                        break
                    except ClusterError:
                        continue
                with ThreadPoolExecutor(1) as pool:  # its Load ends only once the hub welcomed it
                    joining = pool.submit(self._join, self.opts, client, self.shards[rank], self.hub_address,
                                          self.shard_source, self.on_progress)
                    hub.wait_for_ranks(max(0.1, deadline - time.monotonic()),
                                       functools.partial(_running, joining), ranks=[rank])
                    joining.result()
            except (ClusterError, CollectiveError) as exc:
                log.warning("rank %d not back yet: %s", rank, exc)
                return False
            log.info("rank %d (%s) rejoined", rank, client.address)
        self.missing = set()
        return True

    def stats(self) -> list[dict]:
        """Every rank's numbers, rank 0 (this process) first: ``{"rank", "address", <StatsReply fields>}``;
        an unreachable worker gets only ``rank``, ``address`` and ``"error"``."""
        from worker.rank.service import stats_dict

        out: list[dict] = [{"rank": 0, "address": "coordinator", **self.executor.stats()}]
        for rank, client in enumerate(self.clients, start=1):
            try:
                out.append({"rank": rank, "address": client.address, **stats_dict(client.stats())})
            except ClusterError as exc:
                out.append({"rank": rank, "address": client.address, "error": str(exc)})
        return out

    def rank_stats(self) -> dict[int, dict[str, float]]:
        """Numeric stats of every rank, keyed by rank (for /metrics): rank 0's from this process
        (its memory figures are the coordinator's), the workers' over gRPC, zeros included."""
        own = self.executor.stats() | {"memory_budget_bytes": self.opts.memory_budget or 0}
        out = {0: {name: float(v) for name, v in stats_dict(stats_reply(own)).items()}}
        for rank, client in enumerate(self.clients, start=1):
            try:
                reply = client.stats()
            except ClusterError:
                continue
            out[rank] = {name: float(v) for name, v in stats_dict(reply).items()}
        return out

    def close(self) -> None:
        self._closing.set()
        self.shard_server.stop(grace=None)
        self.executor.close()
        local_addresses = {w.address for w in self.local}
        for client in self.clients:
            if client.address in local_addresses:
                client.shutdown()
            client.close()
        for worker in self.local:
            worker.stop()
