"""``edgellm probe`` (measure this node) and ``edgellm plan`` (predict a cluster and choose its split)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from worker.arguments import port_number, positive_int

log = logging.getLogger(__name__)


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk", default=None, metavar="PATH",
                   help="measure cold sequential reads here (a directory: a temporary file is written; a file: read)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="measure the link to a coordinator running `edgellm probe --serve-link PORT --host 0.0.0.0`")
    p.add_argument("--serve-link", type=port_number, default=None, metavar="PORT",
                   help="run the link echo/sink for workers' probes instead of probing (until Ctrl-C)")
    p.add_argument("--host", default="127.0.0.1", help="interface of --serve-link (default: 127.0.0.1)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtypes", default="float32,bfloat16,int8",
                   help="weight dtypes to measure: float32, bfloat16, float16, int8 (an int8 shard's kernel)")
    p.add_argument("--size-mib", type=positive_int, default=256, help="matvec/copy/disk working set (default: 256)")
    p.add_argument("--out", default=None, help="also write the YAML here (node.yaml)")


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"--coordinator must be HOST:PORT, got {text!r}")
    return host, int(port)


def run_probe(args: argparse.Namespace) -> int:
    if args.serve_link is not None:
        from planner.link import LinkServer

        try:
            server = LinkServer(args.host, args.serve_link).start()
        except OSError as exc:  # the port is taken, the host is not this machine's, ...
            raise SystemExit(f"--serve-link: cannot listen on {args.host}:{args.serve_link}: {exc.strerror or exc}") from None
        log.info("link probe sink on %s:%d; workers run: edgellm probe --coordinator HOST:%d",
                 args.host, server.port, server.port)
        if args.host.startswith("127.") or args.host in ("localhost", "::1"):
            log.warning("listening on loopback only: other machines cannot reach it; add --host 0.0.0.0")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.stop()
        return 0
    from planner.probe import DTYPES, INT8, ProbeError, check_targets, probe_node

    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    if unknown := [d for d in dtypes if d not in DTYPES and d != INT8]:
        raise SystemExit(f"--dtypes: unknown {', '.join(unknown)}; known: {', '.join([*DTYPES, INT8])}")
    if not dtypes:  # a node file with no matvec figure, which `edgellm plan` then refuses
        raise SystemExit(f"--dtypes: name at least one of {', '.join([*DTYPES, INT8])}")
    size = args.size_mib << 20
    coordinator = _host_port(args.coordinator) if args.coordinator else None
    # everything that can fail from outside is checked before ~15 s of measurements
    if args.out:
        _check_writable(args.out)
    try:
        check_targets(args.disk, size, coordinator)
        result = probe_node(threads=args.threads, dtypes=dtypes, matvec_bytes=size, disk=args.disk,
                            disk_bytes=size, coordinator=coordinator)
    except ProbeError as exc:
        if exc.measurements:  # a late failure: show what was measured rather than lose it
            print(yaml.safe_dump(exc.measurements, sort_keys=False), end="")
            log.error("%s; the measurements above are incomplete%s", exc,
                      f" and were not written to {args.out}" if args.out else "")
            return 2
        raise SystemExit(str(exc)) from None
    text = yaml.safe_dump(result, sort_keys=False)
    print(text, end="")
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as exc:
            log.error("--out %s: %s (the measurements are above)", args.out, exc.strerror or exc)
            return 2
    return 0


def _check_writable(path: str) -> None:
    """``--out`` must be writable before the probe starts, not after it measured for 15 s."""
    out = Path(path)
    existed = out.exists()
    try:
        with open(out, "a"):
            pass
    except OSError as exc:
        raise SystemExit(f"--out {path}: {exc.strerror or exc}") from None
    if not existed:
        out.unlink()


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    from planner.model import BYTES_PER_PARAM
    from planner.shapes import NAMED_SHAPES

    p.add_argument("--model", required=True,
                   help=f"a checkpoint or config.json-only directory, or a shape: {', '.join(NAMED_SHAPES)}")
    p.add_argument("--nodes", required=True, help="nodes.yaml (probe outputs / profiles; the first is the coordinator)")
    p.add_argument("--weight-dtype", default="float32", choices=sorted(BYTES_PER_PARAM),
                   help="what the shards store (default: float32)")
    p.add_argument("--kv-dtype", default=None,
                   help="KV cache dtype (default: the weight dtype, float32 if integer: what a rank allocates, "
                        "worker.rank.loader.new_kv_cache)")
    p.add_argument("--lm-head", default="int8", choices=("int8", "float"),
                   help="the LM head's dtype in int8/int4 shards, as `edgellm shard --lm-head` (default: int8)")
    p.add_argument("--weights", default=None, help="price this split (e.g. 2,1,1) instead of choosing one")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together (default: 1)")
    p.add_argument("--context", type=positive_int, default=512, help="tokens in the KV cache while decoding (default: 512)")
    p.add_argument("--prompt", type=positive_int, default=128, help="prompt tokens for the time to first token")
    p.add_argument("--prefill-chunk", type=positive_int, default=256,
                   help="prompt tokens per prefill step, as serve's --prefill-chunk (default: 256)")
    p.add_argument("--max-batch", type=positive_int, default=1,
                   help="KV-cache slots the budgets hold, as serve's --max-batch (default: 1; serve's is 8)")
    p.add_argument("--max-context", type=positive_int, default=2048, help="tokens per slot (memory; default: 2048)")
    p.add_argument("--json", action="store_true", help="print only the JSON (the table goes to stderr otherwise)")


def _table(plan: dict[str, Any]) -> str:
    pred = plan["prediction"]
    lines = [f"tokens/s {pred['tokens_per_s']:.3g}  (decode step {pred['decode_ms']:.1f} ms: comm "
             f"{pred['comm_ms']:.1f} ms, hub {pred['hub_ms']:.1f} ms)  time to first token {pred['ttft_ms']:.0f} ms",
             # the budgets hold the KV cache of --max-batch x --max-context: serve with the same
             f"serve with: --weights {plan['weights_arg']} --sync-dtype {plan['sync_dtype']} "
             f"--max-batch {plan['max_batch']} --max-context {plan['max_context']}{'' if plan['lanes'] else ' --no-lanes'}",
             f"{'rank':>4}  {'node':<14} {'kv':>3} {'mlp cols':>8} {'weights MiB':>11} {'memory MiB':>10} "
             f"{'budget MiB':>10} {'compute ms':>10} {'disk ms':>8}"]
    for r, budget in zip(pred["ranks"], plan["memory_budgets_mib"], strict=True):
        lines.append(f"{r['rank']:>4}  {r['node']:<14} {r['kv_heads']:>3} {r['mlp_columns']:>8} "
                     f"{r['weight_bytes'] / 2**20:>11.0f} {r['memory_bytes'] / 2**20:>10.0f} {budget:>10} "
                     f"{r['compute_ms']:>10.2f} {r['disk_ms']:>8.1f}{'  (streams)' if r['streams'] else ''}")
    lines.append(f"coordinator also holds the embedding: {plan['hub_bytes'] / 2**20:.0f} MiB (each rank holds its "
                 f"rows of the LM head, counted in its memory)")
    speeds = ", ".join(f"{k} {v:.3g}" for k, v in plan["sync_tokens_per_s"].items())
    lines.append(f"sync dtype: {plan['sync_dtype']} (tokens/s by sync dtype: {speeds}; a lossy one is chosen at "
                 f"5% faster than float32, int8 for int8/int4 weights of dense models only)")
    lines += [f"why: {reason}" for reason in pred["reasons"]]
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    from planner.model import PlanError, Workload
    from planner.nodes import load_nodes
    from planner.plan import make_plan
    from planner.shapes import load_shape
    from worker.shards.sharding import parse_weights

    config = load_shape(args.model)
    try:
        nodes = load_nodes(args.nodes)
    except PlanError as exc:
        log.error("%s", exc)
        return 2
    integer = args.weight_dtype.startswith("int")
    head = "int8" if integer and args.lm_head == "int8" else ("float32" if integer else args.weight_dtype)
    work = Workload(weight_dtype=args.weight_dtype, head_dtype=head,
                    kv_dtype=args.kv_dtype or ("float32" if integer else args.weight_dtype),
                    batch=args.batch, context=args.context, prompt_tokens=args.prompt,
                    prefill_chunk=args.prefill_chunk, max_batch=max(args.max_batch, args.batch),
                    max_context=args.max_context)
    try:
        weights = parse_weights(args.weights, len(nodes)) if args.weights else None
        plan = make_plan(config, nodes, work, weights).as_dict()
    except PlanError as exc:
        log.error("%s", exc)
        return 2
    plan = {"model": args.model, "nodes": [n.name for n in nodes], "weight_dtype": args.weight_dtype,
            "max_batch": work.max_batch, "max_context": work.max_context, **plan}
    print(json.dumps(plan, indent=2))
    if not args.json:
        print(_table(plan), file=sys.stderr)  # stdout stays one JSON document
    return 0
