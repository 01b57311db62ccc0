"""The planner's predictions against measured runs on this machine, as JSON.

    .venv/bin/python bench/planner_check.py [--tokens 32] [--prompt 128] [--passes 3] [--big] [--out FILE]

``--passes`` times (default 3), steps 1 and 2; the median error of each configuration is the result
(this machine's speed drifts by 20-40% between minutes, and one pass's probe and measurement can
fall in different minutes):

1. Probe this machine (``planner.probe``) at 1 thread and at each ``--threads`` count.
2. For each configuration, predict decode tokens/s and time to first token with
   ``planner.model.predict`` and measure them with the real code:
   - the random Llama 512 x 8 layers (8 heads, 4 KV heads, intermediate 1536, vocab 8000), 1 rank,
     at each ``--threads`` count (``worker.rank.executor.Executor``, as in bench/decode_and_allreduce.py);
   - the same model as an int8 shard (``edgellm shard --quantize int8``: LM head in int8 too), 1
     rank, at the largest ``--threads`` count, predicted from the probe's int8 matvec rate;
   - the same model on 2 ranks on loopback: rank 0 here and rank 1 a real ``WorkerRank`` in a
     spawned process, 1 thread each. Both ranks share this machine, so each rank's node is the
     1-thread probe with its matvec bandwidth capped at half the 2-thread figure (they stream
     weights at the same moments; measured even when ``--threads`` is 1), and its link is loopback;
   - with ``--big`` (once, after the passes, priced with the last pass's probe): the 1.1B shape
     (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab 32000) at 1 rank,
     fp32, at the largest ``--threads`` count.
3. Print predicted vs measured and the relative error (predicted / measured - 1).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from planner.model import Node, Workload, predict  # noqa: E402
from planner.probe import MATVEC_WIDTHS, matvec_gb_s, probe_node  # noqa: E402
from planner.synthetic import write_random_llama  # noqa: E402
from worker.comm.collective import StarHub  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.kernels.quant import QuantSpec  # noqa: E402
from worker.rank.executor import Executor  # noqa: E402
from worker.rank.runtime import RankSpec, WorkerRank  # noqa: E402
from worker.rank.step import SeqSpan  # noqa: E402
from worker.shards.shard_writer import write_shards  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402

log = logging.getLogger("bench.planner_check")

SMALL: dict[str, Any] = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                             intermediate_size=1536, vocab_size=8000, max_position_embeddings=1024)
BIG: dict[str, Any] = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
TOKEN = "planner-check"


def prefill(executor: Executor, prompt_len: int) -> tuple[torch.Tensor, float]:
    """(logits, seconds) of one synthetic prompt of ``prompt_len`` tokens in slot 0."""
    prompt = [(7 * i) % 97 + 3 for i in range(prompt_len)]
    start = time.perf_counter()
    logits = executor.step([prompt], [SeqSpan(0, 0, prompt_len)])
    return logits, time.perf_counter() - start


def decode_round(executor: Executor, prompt_len: int, tokens: int) -> tuple[float, float]:
    """(decode tokens/s, prefill seconds) of one prompt of ``prompt_len`` then ``tokens`` greedy steps."""
    logits, ttft = prefill(executor, prompt_len)
    start = time.perf_counter()
    for i in range(tokens):
        token = int(logits[0].argmax())
        logits = executor.step([[token]], [SeqSpan(0, prompt_len + i, 1)])
    return tokens / (time.perf_counter() - start), ttft


def _decode(executor: Executor, prompt_len: int, tokens: int, rounds: int) -> tuple[float, float]:
    """(best decode tokens/s, best prefill seconds) over ``rounds``; a first round warms up."""
    decode_round(executor, prompt_len, tokens)
    runs = [decode_round(executor, prompt_len, tokens) for _ in range(rounds)]
    return max(tps for tps, _ in runs), min(ttft for _, ttft in runs)


def _worker_process(spec: RankSpec, address: str, threads: int) -> None:
    torch.set_num_threads(threads)
    worker = WorkerRank(spec, address, TOKEN)
    worker.start()
    while worker.running:
        time.sleep(0.1)
    worker.stop()


@contextmanager
def cluster(model_dir: Path, ranks: int, threads: int, max_context: int,
            sync: str = "fp32") -> Iterator[tuple[Executor, list[int]]]:
    """(rank 0's executor, the pid of every rank, rank 0 first): rank 0 in this process, the
    other ranks real ``WorkerRank`` processes on loopback, ``threads`` threads each, their
    allreduces in ``sync``."""
    config = ModelConfig.from_dir(model_dir)
    shards = plan_shards(config, [1.0] * ranks)
    specs = [RankSpec(str(model_dir), config, s, max_batch=1, max_context=max_context, sync_dtype=sync)
             for s in shards]
    torch.set_num_threads(threads)
    hub = StarHub(ranks, token=TOKEN, timeout_s=120, sync_dtype=sync)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_process, args=(spec, hub.address, threads), daemon=True) for spec in specs[1:]]
    for p in procs:
        p.start()
    executor = Executor(specs[0], hub)
    try:
        hub.wait_for_ranks(120)
        yield executor, [os.getpid(), *(p.pid for p in procs if p.pid is not None)]
    finally:
        executor.close()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def resident_bytes(pids: list[int]) -> list[int]:
    """Each process's resident set, read with psutil from outside the worker processes."""
    import psutil

    return [psutil.Process(pid).memory_info().rss for pid in pids]


def measure(model_dir: Path, ranks: int, threads: int, prompt: int, tokens: int, rounds: int,
            max_context: int, rss_out: list[int] | None = None) -> tuple[float, float]:
    """(best decode tokens/s, best time to first token s) over ``rounds``; ``rss_out`` gets each
    rank's resident bytes (rank 0 first) after the runs."""
    with cluster(model_dir, ranks, threads, max_context) as (executor, pids):
        measured = _decode(executor, prompt, tokens, rounds)
        if rss_out is not None:
            rss_out[:] = resident_bytes(pids)
        return measured


def machine_matvec_by_width(probes: dict[int, dict[str, Any]], matvec_bytes: int) -> dict[int, float]:
    """fp32 matvec GB/s by input width with 2 threads (the cores two co-located ranks share):
    from the 2-thread probe when there is one, else measured now."""
    if 2 in probes:
        return probes[2]["matvec_by_width"]["float32"]
    torch.set_num_threads(2)
    log.info("probe: fp32 matvec with 2 threads (the cores 2 ranks share)")
    return {w: matvec_gb_s("float32", matvec_bytes, cols=w) for w in MATVEC_WIDTHS}


def node_of(probe: dict[str, Any], name: str) -> Node:
    return Node.from_dict({**probe, "name": name})


def check(name: str, config: ModelConfig, nodes: list[Node], work: Workload, measured: tuple[float, float]
          ) -> dict[str, Any]:
    shards = plan_shards(config, [1.0] * len(nodes))
    pred = predict(config, shards, nodes, work)
    tps, ttft = measured
    return {"config": name, "ranks": len(nodes),
            "predicted_tok_s": round(pred.tokens_per_s, 2), "measured_tok_s": round(tps, 2),
            "tok_s_error": round(pred.tokens_per_s / tps - 1, 3),
            "predicted_ttft_ms": round(pred.ttft_s * 1e3, 2), "measured_ttft_ms": round(ttft * 1e3, 2),
            "ttft_error": round(pred.ttft_s / ttft - 1, 3),
            "predicted_breakdown_ms": {"rank_compute": [round(r.compute_s * 1e3, 3) for r in pred.ranks],
                                       "comm": round(pred.comm_s * 1e3, 3), "hub": round(pred.hub_s * 1e3, 3)}}


def probe_this_machine(threads: list[int], probe_mib: int) -> tuple[dict[int, dict[str, Any]], list[Node]]:
    """The probes at each thread count, and the two co-located 1-thread rank nodes.

    Two ranks on this machine, 1 thread each, stream weights at the same moments: each gets at
    most half of what the machine gives with both cores, measured here whatever ``threads`` says."""
    probes = {}
    for t in threads:
        log.info("probe: %d thread(s)", t)
        probes[t] = probe_node(threads=t, dtypes=("float32", "int8"), matvec_bytes=probe_mib << 20)
    whole = machine_matvec_by_width(probes, probe_mib << 20)
    torch.set_num_threads(1)
    alone = probes[1]["matvec_by_width"]["float32"]
    shared = {w: min(alone[w], whole[w] / 2) for w in alone}
    half = node_of({**probes[1], "matvec_by_width": {"float32": shared},
                    "matvec_gb_s": {"float32": max(shared.values())}}, "rank0")
    return probes, [half, replace(half, name="rank1", rtt_us=probes[1]["loopback_rtt_us"])]


def one_pass(args: argparse.Namespace, threads: list[int], small: Path, int8_dir: Path, work: Workload
             ) -> dict[str, Any]:
    """Probe this machine, then measure every small-model configuration against its prediction."""
    probes, colocated = probe_this_machine(threads, args.probe_mib)
    config = ModelConfig.from_dir(small)
    checks = []
    for t in threads:
        log.info("measure: small, 1 rank, %d thread(s)", t)
        m = measure(small, 1, t, args.prompt, args.tokens, args.rounds, work.max_context)
        checks.append(check(f"llama-512x8, 1 rank, {t} thread(s)", config, [node_of(probes[t], "this-vm")], work, m))
    t = max(threads)
    log.info("measure: small, int8 shard, 1 rank, %d thread(s)", t)
    m = measure(int8_dir, 1, t, args.prompt, args.tokens, args.rounds, work.max_context)
    checks.append(check(f"llama-512x8 int8, 1 rank, {t} thread(s)", config,
                        [node_of(probes[t], "this-vm")], replace(work, weight_dtype="int8"), m))
    log.info("measure: small, 2 ranks, 1 thread each")
    m = measure(small, 2, 1, args.prompt, args.tokens, args.rounds, work.max_context)
    checks.append(check("llama-512x8, 2 ranks on loopback, 1 thread each", config, colocated, work, m))
    return {"probes": {str(t): p for t, p in probes.items()}, "checks": checks,
            "colocated_rank_matvec_gb_s": {str(w): round(gb, 3)
                                           for w, gb in colocated[0].matvec_by_width["float32"].items()}}


def summarize(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: every pass's predicted / measured tokens/s and error, and the median error."""
    rows = []
    for i, first in enumerate(passes[0]["checks"]):
        runs = [p["checks"][i] for p in passes]
        errors = [c["tok_s_error"] for c in runs]
        rows.append({"config": first["config"], "tok_s_errors": errors,
                     "predicted_tok_s": [c["predicted_tok_s"] for c in runs],
                     "measured_tok_s": [c["measured_tok_s"] for c in runs],
                     "median_tok_s_error": statistics.median(errors),
                     "ttft_errors": [c["ttft_error"] for c in runs]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (time to first token)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="timed rounds after a warm-up; the best is kept (the quietest, as the probe keeps its quietest stretch)")
    parser.add_argument("--passes", type=int, default=3,
                        help="independent passes of probe then measure; each configuration's median error is reported")
    parser.add_argument("--threads", default="1",
                        help="thread counts of the 1-rank runs, e.g. 1,2 (on a shared 2-core machine 2 threads "
                             "suffer from neighbours; 1 is the default)")
    parser.add_argument("--big", action="store_true", help="also the 1.1B shape at 1 rank (4.4 GB fp32, ~2 min)")
    parser.add_argument("--probe-mib", type=int, default=256, help="matvec/copy probe size")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")

    threads = sorted({int(t) for t in args.threads.split(",")} | {1})
    max_context = args.prompt + args.tokens + 8
    work = Workload(context=args.prompt + args.tokens // 2, prompt_tokens=args.prompt, prefill_chunk=args.prompt,
                    max_context=max_context)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        small = write_random_llama(Path(tmp) / "small", SMALL)
        config = ModelConfig.from_dir(small)
        int8_dir = Path(tmp) / "small-int8"
        write_shards(small, plan_shards(config, [1.0]), int8_dir, torch.float32, progress=False, quant=QuantSpec(8))
        passes = []
        for i in range(args.passes):
            log.info("pass %d of %d", i + 1, args.passes)
            passes.append(one_pass(args, threads, small, int8_dir, work))
        result["passes"] = passes
        result["summary"] = summarize(passes)
        if args.big:
            log.info("writing the 1.1B shape")
            big = write_random_llama(Path(tmp) / "big", BIG)
            t = max(threads)
            probe = passes[-1]["probes"][str(t)]
            log.info("measure: 1.1B, 1 rank, %d thread(s)", t)
            m = measure(big, 1, t, args.prompt, max(8, args.tokens // 4), 1, max_context)
            result["big"] = check(f"llama-1.1B shape, 1 rank, {t} thread(s)", ModelConfig.from_dir(big),
                                  [node_of(probe, "this-vm")], work, m)
    errors = [abs(row["median_tok_s_error"]) for row in result["summary"]]
    if "big" in result:
        errors.append(abs(result["big"]["tok_s_error"]))
    result["max_abs_median_tok_s_error"] = max(errors)
    result["within_25_percent"] = all(e <= 0.25 for e in errors)
    emit(result, args.out)

if __name__ == "__main__":
    main()
