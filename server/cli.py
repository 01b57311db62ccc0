"""The ``edgellm`` command: ``serve`` (coordinator), ``worker`` (a rank), ``shard`` (split a checkpoint),
``probe`` (measure this node) and ``plan`` (predict a cluster's speed)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from worker.arguments import non_negative_int, port_number, positive_float, positive_int, worker_addresses

if TYPE_CHECKING:
    from types import FrameType

    from worker.config import ModelConfig
    from worker.kernels.quant import QuantSpec

log = logging.getLogger("edgellm")

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
LOCAL_WORKER_START_S = 60.0  # a local worker process imports torch and opens its gRPC port in this time


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="Hugging Face checkpoint directory or `edgellm shard` output (default: the embedded model)")
    p.add_argument("--workers", type=worker_addresses, default=[],
                   help="comma-separated host:port of running `edgellm worker`s")
    p.add_argument("--local-workers", type=non_negative_int, default=0, help="spawn K worker processes on loopback")
    p.add_argument("--weights", default=None, help="per-rank split weights, rank 0 first, e.g. 2,1,1")
    p.add_argument("--host", default="127.0.0.1", help="HTTP interface (default: 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--cluster-token", default=os.environ.get("EDGELLM_CLUSTER_TOKEN"),
                   help="shared secret of the cluster (default: $EDGELLM_CLUSTER_TOKEN; random for local workers)")
    p.add_argument("--model-name", default=None, help="name clients use in `model` (default: the directory name)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together (default: 8)")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="tokens per sequence, prompt included (default: min(2048, the model's limit))")
    p.add_argument("--prefill-chunk", type=positive_int, default=256,
                   help="prompt tokens prefilled per step, so long prompts don't stall streams (default: 256)")
    p.add_argument("--max-queue", type=non_negative_int, default=64, help="requests waiting for a slot before 503 (default: 64)")
    p.add_argument("--max-queued-tokens", type=positive_int, default=65536,
                   help="prompt tokens waiting for a slot before 503 (default: 65536)")
    p.add_argument("--request-timeout", type=positive_float, default=None,
                   help="seconds after which a request is abandoned (default: none)")
    p.add_argument("--api-key", default=os.environ.get("EDGELLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $EDGELLM_API_KEY; none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="what every rank computes in (default: float32; bfloat16 halves the memory; a streamed "
                        "or MoE shard must be written in it)")
    _quant_arguments(p)  # serve: a checkpoint is quantized once into --cache-dir, then served from there
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where `--quantize` keeps the quantized shards of a checkpoint between starts "
                        "(default: $EDGELLM_CACHE or ~/.cache/edgellm)")
    p.add_argument("--sync-dtype", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "float32", "float16",
                                                            "bfloat16"],
                   help="allreduce payload dtype of the whole cluster: fp32 exact; fp16/bf16 half the bytes; "
                        "int8 a quarter, with a scale per token (default: fp32)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads of this process and of each local worker (default: cores / processes)")
    p.add_argument("--hub-host", default=None, help="address workers use to reach this coordinator's hub")
    p.add_argument("--hub-port", type=port_number, default=0, help="ZeroMQ hub port (default: any free port)")
    p.add_argument("--lanes", action=argparse.BooleanOptionalAction, default=None,
                   help="allreduces over data-plane lanes (one authenticated TCP socket per worker, driven by "
                        "the computing thread); --no-lanes (or EDGELLM_LANE=0) sends them over the ZeroMQ "
                        "hub instead (default: lanes, where every rank can build them)")
    p.add_argument("--lane-port", type=port_number, default=0,
                   help="TCP port of the data-plane lanes the allreduces use (default: any free port)")
    p.add_argument("--data-plane-encryption", action="store_true",
                   help="encrypt the lanes' payloads (ChaCha20-Poly1305); by default every frame is "
                        "authenticated but travels in the clear")
    p.add_argument("--ship-shards", action="store_true",
                   help="workers fetch their files from the coordinator (sha256-checked, cached) even when "
                        "the model's path exists on their disk (default: only when it does not)")
    p.add_argument("--shard-port", type=port_number, default=0,
                   help="gRPC port from which workers without the model fetch its files (default: any free port)")
    p.add_argument("--connect-timeout", type=positive_float, default=10.0,
                   help="seconds to wait for each worker (default: %(default)g); local workers get at least "
                        f"{LOCAL_WORKER_START_S:g} s to start")
    p.add_argument("--recovery-wait", type=positive_float, default=30.0,
                   help="seconds running requests wait for a failed rank to rejoin before they fail (default: 30)")
    p.add_argument("--step-timeout", type=positive_float, default=30.0,
                   help="seconds a step waits for a rank before the request fails (default: 30)")
    from worker.memory.budget import size_argument

    p.add_argument("--memory-budget", type=size_argument, default=None, metavar="SIZE",
                   help="weights + KV cache bytes of rank 0 and of each --local-workers rank, e.g. 2GiB; "
                        "a larger shard streams from disk (default: all resident)")
    p.add_argument("--expert-cache", type=size_argument, default=None, metavar="SIZE",
                   help="routed-expert cache bytes of rank 0 and each local worker (MoE; default: all resident)")


def _shard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--ranks", type=positive_int, required=True, help="number of ranks (coordinator included)")
    p.add_argument("--weights", default=None, help="per-rank split weights, e.g. 2,1,1")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="what the float weights are stored in (default: float32); serve the shards in it")
    _quant_arguments(p)
    p.add_argument("--expert-budget", default="25%",
                   help="--expert-bits auto: the routed experts' size on disk, as a share of their float32 bytes "
                        "(25%%: about all int8) or a size (e.g. 300MB); between the int4 and the int8 size, the "
                        "experts that matter most get int8 (default: 25%%)")
    p.add_argument("--expert-calibration", default=None, metavar="FILE",
                   help="--expert-bits auto: a text whose routing weighs each expert by how often it is used "
                        "(the checkpoint is loaded whole in transformers for it); without one, each expert's "
                        "quantization error alone decides")


def _quant_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                   help="weight matrices in int8 (per output channel) or int4 (per group); norms, routers "
                        "and the embedding stay in --dtype (default: none)")
    p.add_argument("--group-size", type=int, default=64, help="inputs per int4 group: 32, 64, 128 or 256 (default: 64)")
    p.add_argument("--expert-bits", type=_expert_bits, default=None,
                   help="bits of routed MoE experts, 8 or 4, or (edgellm shard) 'auto': int8 for the experts that "
                        "matter most, int4 for the rest, within --expert-budget (default: as --quantize)")
    p.add_argument("--lm-head", default="int8", choices=["int8", "float"],
                   help="the LM head of a quantized shard: int8 per output row, or --dtype (default: int8; "
                        "without --quantize it stays in --dtype)")


def _expert_bits(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--expert-bits takes 8, 4 or auto, not {text!r}") from None


def _quant_spec(args: argparse.Namespace) -> QuantSpec | None:
    from worker.kernels.quant import (
        QuantSpec,  # lazily: it imports torch, which `edgellm --help` does not need
    )

    bits = {"none": None, "int8": 8, "int4": 4}[args.quantize]
    lm_head_bits = 8 if args.lm_head == "int8" and bits else None  # as --lm-head says: float without --quantize
    expert_bits = None if args.expert_bits == "auto" else args.expert_bits  # auto: a width per expert, at shard time
    return QuantSpec(bits, args.group_size, expert_bits, lm_head_bits) if bits or expert_bits else None


def _warn_moe_options(config: ModelConfig, **options: object) -> None:
    """Options that only a mixture-of-experts model uses do nothing on a dense one: say so."""
    if not config.is_moe:
        for name, value in options.items():
            if value is not None:
                log.warning("--%s has no effect: %s is not a mixture-of-experts model",
                            name.replace("_", "-"), config.architecture)


def _check_shard_dir_split(model: str, plan: list, weights: list[float], remote: int, local: int) -> None:
    """A shard directory serves only the split it was written for: say which, before any rank
    finds its file missing or different."""
    from worker.config import CheckpointError
    from worker.shards.sharding import RankShard
    from worker.shards.weights import check_quant_format, is_shard_dir, read_manifest

    if not is_shard_dir(model):
        return
    check_quant_format(model, read_manifest(model))
    stored = [RankShard.from_dict(s) for s in read_manifest(model).get("shards", [])]
    if len(stored) != len(plan):
        raise CheckpointError(f"{model} holds shards for {len(stored)} ranks, but this cluster has {len(plan)} "
                              f"(the coordinator, {remote} --workers, {local} --local-workers); serve it with "
                              f"{len(stored)} ranks, or re-run `edgellm shard --ranks {len(plan)}`")
    if stored != plan:
        widths = ", ".join(str(s.mlp_columns[1] - s.mlp_columns[0]) for s in stored)
        written = read_manifest(model).get("weights")
        if written and [float(w) for w in written] == [float(w) for w in weights]:
            raise CheckpointError(f"{model} was written by an earlier edgellm that split the MLP columns "
                                  f"differently (per rank: {widths}); re-run `edgellm shard` on the checkpoint")
        given = f"--weights {_weights_text(written)}" if written else "the --weights it was written with"
        raise CheckpointError(f"{model} was sharded with another split (MLP columns per rank: {widths}); pass "
                              f"{given}, or re-run `edgellm shard` with these")


def _weights_text(weights: list[float]) -> str:
    return ",".join(f"{w:g}" for w in weights)


def _split_weights(model: str, text: str | None, world: int) -> list[float]:
    """``--weights``, or for a shard directory served without it the split it was written with
    (recorded in its manifest), so `serve --model SHARDS` needs no flag `edgellm shard` had."""
    from worker.shards.sharding import parse_weights
    from worker.shards.weights import is_shard_dir, read_manifest

    if not text and is_shard_dir(model):
        written = read_manifest(model).get("weights")
        if written and len(written) == world:
            log.info("--weights %s: the split %s was written with", _weights_text(written), model)
            return [float(w) for w in written]
    return parse_weights(text, world)


def _auto_expert_bits(args: argparse.Namespace) -> dict[tuple[int, int], int]:
    """``--expert-bits auto``: measure every expert's int4/int8 error, weigh it by its routing
    frequency on ``--expert-calibration`` if given, and plan the widths within ``--expert-budget``."""
    from worker.memory.budget import BudgetError
    from worker.shards.expert_bits import measure_experts, parse_budget, plan_expert_bits, router_frequency

    measured = measure_experts(args.model, args.group_size)
    float_bytes = sum(m[32][0] for m in measured.values())
    try:
        budget = parse_budget(args.expert_budget, float_bytes)
        frequency = (router_frequency(args.model, Path(args.expert_calibration).read_text())
                     if args.expert_calibration else None)
        return plan_expert_bits(measured, budget, frequency)
    except (ValueError, BudgetError, OSError) as exc:
        raise SystemExit(f"edgellm shard: {exc}") from None


def run_shard(args: argparse.Namespace) -> int:
    from worker.config import ModelConfig
    from worker.rank.service import DTYPES
    from worker.shards.shard_writer import write_shards
    from worker.shards.sharding import parse_weights, plan_shards

    quant = _quant_spec(args)
    config = ModelConfig.from_dir(args.model)
    _warn_moe_options(config, expert_bits=args.expert_bits)
    if not (Path(args.model) / "tokenizer.json").is_file():
        log.warning("%s has no tokenizer.json: `edgellm serve` of the shards will need one copied in", args.model)
    weights = parse_weights(args.weights, args.ranks)
    shards = plan_shards(config, weights)
    expert_bits = _auto_expert_bits(args) if args.expert_bits == "auto" and config.is_moe else None
    out = write_shards(args.model, shards, args.out, DTYPES[args.dtype], quant=quant, weights=weights,
                       expert_bits=expert_bits)
    for s in shards:
        log.info("rank %d: kv heads [%d, %d), mlp columns [%d, %d)", s.rank, *s.kv_heads, *s.mlp_columns)
    others = args.ranks - 1
    how = f" --local-workers {others} (or --workers with {others} address{'es' if others > 1 else ''})" if others else ""
    log.info("shards written to %s; serve them on %d rank%s with: edgellm serve --model %s%s", out, args.ranks,
             "s" if args.ranks > 1 else "", out, how)
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    from server.workers import ClusterError

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ClusterError(f"cannot serve HTTP on {host}:{port}: {exc.strerror}") from None


def _quantized_model(args: argparse.Namespace, weights: list[float], quant: QuantSpec) -> Path:
    """``serve --quantize``: the checkpoint's quantized shards for this split (cached, see
    ``server.quantized_cache``)."""
    from server.quantized_cache import quantized_shards
    from worker.config import CheckpointError
    from worker.rank.service import DEFAULT_CACHE_DIR, DTYPES
    from worker.shards.weights import is_shard_dir

    if is_shard_dir(args.model):
        raise CheckpointError(f"{args.model} is already sharded (its quantization was chosen by `edgellm shard`): "
                              f"serve it without --quantize, or pass the original checkpoint")
    return quantized_shards(args.model, weights, quant, DTYPES[args.dtype], args.cache_dir or DEFAULT_CACHE_DIR)


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from server.app import create_app
    from server.cluster import Cluster, ClusterOptions, verify_coordinator_files
    from server.engine import Engine, EngineLimits
    from server.state import ServerState
    from server.tokenizer import TextTokenizer
    from server.workers import ClusterError, LocalWorker, check_workers
    from worker.config import ModelConfig
    from worker.rank.runtime import freeze_loaded_objects
    from worker.shards.sharding import plan_shards

    # the coordinator and its local workers share this machine's cores: oversubscribing them
    # (each process taking every core) made batched steps 4-25x slower in the load tests
    threads = args.threads or max(1, (os.cpu_count() or 1) // (1 + args.local_workers))
    torch.set_num_threads(threads)
    name = args.model_name or Path(args.model).absolute().name
    config = ModelConfig.from_dir(args.model)
    _warn_moe_options(config, expert_bits=args.expert_bits, expert_cache=args.expert_cache)
    remote: list[str] = args.workers
    if duplicated := sorted({w for w in remote if remote.count(w) > 1}):
        raise ClusterError(f"--workers names {', '.join(duplicated)} more than once; one worker serves one rank")
    world = 1 + len(remote) + args.local_workers
    weights = _split_weights(args.model, args.weights, world)
    _check_shard_dir_split(args.model, plan_shards(config, weights), weights, len(remote), args.local_workers)
    # (planned now: a bad split fails here, not after spawning anything)
    if args.expert_bits == "auto":
        raise SystemExit("edgellm serve: --expert-bits auto is chosen at `edgellm shard` time; shard the checkpoint "
                         "with it and serve that directory")
    if quant := _quant_spec(args):
        args.model = str(_quantized_model(args, weights, quant))
    tokenizer = TextTokenizer(args.model)
    max_context = min(args.max_context or 2048, config.max_position_embeddings)
    if args.max_context and args.max_context > max_context:
        log.warning("--max-context %d is more than the model's %d positions (max_position_embeddings); "
                    "serving %d", args.max_context, max_context, max_context)
    token = args.cluster_token or (secrets.token_hex(16) if not remote else "")
    opts = ClusterOptions(model_dir=args.model, weights=weights, token=token, max_batch=args.max_batch,
                          max_context=max_context, dtype=args.dtype, hub_host=args.hub_host,
                          hub_port=args.hub_port, shard_port=args.shard_port, ship_shards=args.ship_shards, connect_timeout_s=args.connect_timeout,
                          step_timeout_s=args.step_timeout, memory_budget=args.memory_budget,
                          expert_cache=args.expert_cache, sync_dtype=args.sync_dtype, lanes=args.lanes,
                          lane_port=args.lane_port,
                          encrypt=args.data_plane_encryption)
    _check_port_free(args.host, args.port)
    clients = check_workers(remote, token, args.connect_timeout)
    budgets = [*(["--memory-budget", str(args.memory_budget)] if args.memory_budget else []),
               *(["--expert-cache", str(args.expert_cache)] if args.expert_cache else [])]
    local = [LocalWorker(token, threads, budgets) for _ in range(args.local_workers)]
    state = ServerState(model_name=name, max_context=max_context, api_key=args.api_key)
    limits = EngineLimits(max_batch=args.max_batch, max_context=max_context, prefill_chunk=args.prefill_chunk,
                          max_waiting=args.max_queue, max_waiting_tokens=args.max_queued_tokens,
                          request_timeout_s=args.request_timeout, recovery_wait_s=args.recovery_wait)

    class Server(uvicorn.Server):
        """uvicorn, telling the engine first when a signal asks it to exit: open streams then end
        with a ``shutting_down`` error event and ``[DONE]`` instead of being cut off."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            for worker in local:
                worker.shutting_down = True
            if state.engine is not None:
                state.engine.begin_shutdown()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(create_app(state), host=args.host, port=args.port,
                                   log_level="info", timeout_graceful_shutdown=3))
    cluster: list[Cluster] = []
    failed: list[str] = []

    def load() -> None:
        try:
            # a corrupted file of ours fails now, not after the local workers have imported torch
            verify_coordinator_files(opts.model_dir, world)
            # a slower machine (or one under emulation) asks for more with --connect-timeout
            all_clients = clients + check_workers([w.address for w in local], token,
                                                  max(LOCAL_WORKER_START_S, args.connect_timeout),
                                                  "to start (local workers; --connect-timeout)")
            cluster.append(Cluster.start(opts, all_clients, local,
                                         lambda who, i, n: log.info("%s: %d/%d layers", who, i, n)))
            state.metrics.workers_up.set(len(all_clients))
            state.metrics.watch_ranks(cluster[0].rank_stats)
            engine = Engine(cluster[0].executor, tokenizer, limits, state.metrics, recover=cluster[0].recover,
                            missing_ranks=lambda: cluster[0].missing)
            engine.start()
            freeze_loaded_objects()
            state.engine, state.tokenizer = engine, tokenizer
            state.status, state.detail = "ready", f"{world} ranks"
            # 0.0.0.0 and :: listen everywhere, but are no address to send a request to
            host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(args.host, args.host)
            url = f"http://{host}:{args.port}"
            log.info("ready: %d ranks serving %r at %s", world, name, url)
            print(f"\nedgellm is serving {name!r} on {world} ranks at {url}\n  try:\n"
                  f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
                  f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
                  f"\"max_tokens\": 40}}'\n", flush=True)
        except Exception as exc:
            log.error("could not start the cluster: %s", exc)
            failed.append(str(exc))
            state.status, state.detail = "failed", str(exc)
            server.should_exit = True

    threading.Thread(target=load, name="cluster-load", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it handled
        pass
    finally:
        if state.engine:
            state.engine.stop()
        if cluster:
            cluster[0].close()
        else:
            for client in clients:
                client.close()
            for worker in local:
                worker.stop()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="edgellm", description=__doc__.replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_arguments(sub.add_parser("serve", help="run the coordinator and the HTTP API"))
    from worker.cli import add_arguments as worker_arguments

    worker_arguments(sub.add_parser("worker", help="run a worker rank"))
    _shard_arguments(sub.add_parser("shard", help="write one shard file per rank"))
    from planner.cli import add_plan_arguments, add_probe_arguments

    add_probe_arguments(sub.add_parser("probe", help="measure this node for the planner"))
    add_plan_arguments(sub.add_parser("plan", help="predict a cluster's speed and choose its split"))
    args = parser.parse_args(argv)
    from server.workers import ClusterError
    from worker.config import CheckpointError
    from worker.shards.sharding import ShardingError

    try:
        if args.command == "serve":
            return run_serve(args)
        if args.command == "shard":
            return run_shard(args)
        if args.command in ("probe", "plan"):
            from planner.cli import run_plan, run_probe

            return run_probe(args) if args.command == "probe" else run_plan(args)
        from worker.cli import run as run_worker

        return run_worker(args)
    except (CheckpointError, ShardingError, ClusterError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while starting, sharding or probing: no traceback
        log.info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
