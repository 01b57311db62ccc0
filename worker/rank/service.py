"""The worker's gRPC control service: configure, load (joining the data plane), health,
stats, shutdown. Every call must carry the cluster token in its metadata."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import psutil
import torch

from protos.edgellm.v1 import control_pb2 as pb
from protos.edgellm.v1 import control_pb2_grpc as pb_grpc
from worker.comm.collective import HEARTBEAT_TIMEOUT_MS
from worker.comm.wire import sync_dtype_name
from worker.config import CheckpointError, ModelConfig
from worker.rank.runtime import RankSpec, WorkerRank, freeze_loaded_objects
from worker.shards.shard_fetch import TOKEN_METADATA_KEY, fetch_model, verify_rank_file
from worker.shards.sharding import RankShard

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks the cluster token."""

    def __init__(self, token: str):
        self._token = token.encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing cluster token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        given = dict(details.invocation_metadata or ()).get(TOKEN_METADATA_KEY, "")
        if hmac.compare_digest(str(given).encode(), self._token):
            return continuation(details)
        log.warning("refused %s: wrong or missing cluster token", details.method)
        return self._deny_stream if details.method.endswith(("/Load", "/Fetch")) else self._deny


def shard_from_proto(msg: pb.RankShard, group_size: int) -> RankShard:
    return RankShard(rank=msg.rank, world_size=msg.world_size, kv_heads=(msg.kv_head_start, msg.kv_head_end),
                     mlp_columns=(msg.mlp_start, msg.mlp_end), group_size=group_size,
                     expert_columns=(msg.expert_start, msg.expert_end),
                     shared_columns=(msg.shared_start, msg.shared_end), vocab_rows=(msg.vocab_start, msg.vocab_end))


def shard_to_proto(shard: RankShard) -> pb.RankShard:
    return pb.RankShard(rank=shard.rank, world_size=shard.world_size, kv_head_start=shard.kv_heads[0],
                        kv_head_end=shard.kv_heads[1], mlp_start=shard.mlp_columns[0],
                        mlp_end=shard.mlp_columns[1], expert_start=shard.expert_columns[0],
                        expert_end=shard.expert_columns[1], shared_start=shard.shared_columns[0],
                        shared_end=shard.shared_columns[1], vocab_start=shard.vocab_rows[0],
                        vocab_end=shard.vocab_rows[1])


def process_memory() -> dict[str, float]:
    """RSS now (psutil) and its peak: the kernel's high-water mark, exact where sampling is not."""
    info = psutil.Process().memory_info()
    peak = info.rss
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return {"rss_bytes": info.rss, "peak_rss_bytes": peak, "threads": torch.get_num_threads()}


def stats_reply(numbers: dict[str, float]) -> pb.StatsReply:
    """The reply for a stats dict; integer fields get integers, unknown keys are left out."""
    fields = pb.StatsReply.DESCRIPTOR.fields_by_name
    out: dict[str, Any] = {}
    for key, value in numbers.items():
        if key in fields:
            double = fields[key].type == fields[key].TYPE_DOUBLE
            out[key] = float(value) if double else int(value)
    return pb.StatsReply(**out)


def stats_dict(reply: pb.StatsReply) -> dict[str, float]:
    """Every numeric field of a reply, zeros included."""
    return {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, token: str, on_shutdown: Callable[[], None], memory_budget: int | None = None,
                 expert_cache_bytes: int | None = None, cache_dir: Path = DEFAULT_CACHE_DIR):
        self.token = token
        self.cache_dir = cache_dir
        self._shard_source = ""  # set when the model must be fetched from the coordinator
        self.memory_budget = memory_budget
        self.expert_cache_bytes = expert_cache_bytes
        self._on_shutdown = on_shutdown
        self._lock = threading.Lock()
        self._spec: RankSpec | None = None
        self._hub = ""
        self._rank: WorkerRank | None = None
        self._state: pb.HealthReply.State = pb.HealthReply.IDLE
        self._detail = "waiting for a coordinator"

    def _set(self, state: pb.HealthReply.State, detail: str) -> None:
        self._state, self._detail = state, detail

    def Configure(self, request: pb.ConfigureRequest, context: grpc.ServicerContext) -> pb.ConfigureReply:
        try:
            config = ModelConfig.from_dict(json.loads(request.config_json))
            if os.path.isdir(request.model_dir):
                local = ModelConfig.from_dir(request.model_dir)
                if local != config:
                    raise CheckpointError(f"{request.model_dir} on this worker holds a different model")
            elif not request.shard_source:
                raise CheckpointError(f"model directory {request.model_dir!r} does not exist on this worker")
            if request.dtype not in DTYPES:
                raise CheckpointError(f"unknown dtype {request.dtype!r}")
            sync_dtype = sync_dtype_name(request.sync_dtype or "fp32")
        except (CheckpointError, ValueError) as exc:  # JSONDecodeError is a ValueError
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        with self._lock:
            if (self._rank is not None and request.hub_address != self._hub
                    and self._rank.serving_a_live_hub()):
                # another coordinator would silently take this rank from a cluster that is serving
                log.warning("refused a configure for hub %s: serving the coordinator at %s", request.hub_address,
                            self._hub)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"this worker serves rank {self._rank.spec.shard.rank} of a running cluster (hub "
                              f"{self._hub}); stop that coordinator first. A coordinator that died is let go "
                              f"within {HEARTBEAT_TIMEOUT_MS / 1000:.0f} s")
            self._release()
            shard = shard_from_proto(request.shard, config.group_size)
            self._spec = RankSpec(request.model_dir, config, shard, request.max_batch, request.max_context,
                                  DTYPES[request.dtype], memory_budget=self.memory_budget,
                                  expert_cache_bytes=self.expert_cache_bytes, sync_dtype=sync_dtype)
            self._hub = request.hub_address
            self._shard_source = "" if os.path.isdir(request.model_dir) else request.shard_source
            self._set(pb.HealthReply.CONFIGURED, f"rank {shard.rank} of {shard.world_size}")
        log.info("configured as rank %d of %d, hub %s, sync dtype %s", shard.rank, shard.world_size, self._hub,
                 sync_dtype)
        return pb.ConfigureReply()

    def Load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> Iterator[pb.LoadProgress]:
        spec = self._spec
        if spec is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Configure first")
        assert spec is not None
        rank_spec: RankSpec = spec
        self._set(pb.HealthReply.LOADING, "loading weights")
        progress: list[pb.LoadProgress] = []
        done = threading.Event()
        failure: list[str] = []
        source = self._shard_source

        def load() -> None:
            spec = rank_spec
            hashed: dict[str, str] = {}
            try:
                if source:
                    self._set(pb.HealthReply.LOADING, f"fetching the model from {source}")
                    local, hashed = fetch_model(
                        source, self.token, spec.shard.rank, spec.shard.world_size, self.cache_dir,
                        lambda d, t: progress.append(pb.LoadProgress(bytes_fetched=d, bytes_total=t)))
                    if ModelConfig.from_dir(local) != spec.config:
                        raise CheckpointError(f"the files fetched from {source} hold a different model")
                    spec = replace(spec, model_dir=str(local))
                verify_rank_file(spec.model_dir, spec.shard.rank, spec.shard.world_size, hashed)
                rank = WorkerRank(spec, self._hub, self.token,
                                  lambda i, n: progress.append(pb.LoadProgress(layers_loaded=i, layers_total=n)))
                rank.start()
                with self._lock:
                    self._rank = rank
                freeze_loaded_objects()
                self._set(pb.HealthReply.READY, f"rank {spec.shard.rank} in the data plane")
            except Exception as exc:  # reported to the coordinator, not raised into gRPC's pool
                log.error("load failed: %s", exc)
                failure.append(str(exc))
                self._set(pb.HealthReply.FAILED, str(exc))
            finally:
                done.set()

        threading.Thread(target=load, daemon=True).start()
        sent = 0
        total = spec.config.num_layers
        while not done.wait(0.2) or sent < len(progress):
            while sent < len(progress):
                yield progress[sent]
                sent += 1
        if failure:
            context.abort(grpc.StatusCode.INTERNAL, f"rank {spec.shard.rank} failed to load: {failure[0]}")
        yield pb.LoadProgress(layers_loaded=total, layers_total=total, ready=True)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        rank = self._spec.shard.rank if self._spec else 0
        if self._rank is not None and not self._rank.running:
            self._set(pb.HealthReply.IDLE, "the coordinator stopped the data plane")
        return pb.HealthReply(state=self._state, detail=self._detail, rank=rank)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        rank = self._rank
        numbers = process_memory() | (rank.stats() if rank else {})
        numbers["memory_budget_bytes"] = self.memory_budget or 0
        return stats_reply(numbers)

    def Shutdown(self, request: pb.ShutdownRequest, context: grpc.ServicerContext) -> pb.ShutdownReply:
        log.info("shutdown requested")
        with self._lock:
            self._release()
        threading.Timer(0.2, self._on_shutdown).start()
        return pb.ShutdownReply()

    def _release(self) -> None:
        if self._rank is not None:
            self._rank.stop()
            self._rank = None


def serve(host: str, port: int, token: str, memory_budget: int | None = None,
          expert_cache_bytes: int | None = None, cache_dir: Path = DEFAULT_CACHE_DIR) -> None:
    """Run the worker until Shutdown or a signal."""
    stopped = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[TokenInterceptor(token)])
    service = WorkerService(token, stopped.set, memory_budget, expert_cache_bytes, cache_dir)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    log.info("edgellm worker listening on %s:%d", host, bound)
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        service._release()
        server.stop(grace=1)
