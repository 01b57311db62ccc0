"""Time to first token by prompt length, scaling from 1 to 2 ranks, memory per rank, and the
fp32 decode speed of the 1.1B shape against its memory-bandwidth bound, as JSON.

    .venv/bin/python bench/latency.py [--prompts 32,256,1024] [--tokens 16] [--big] [--out FILE]

- TTFT: the random Llama 512 x 8 layers (8 heads, 4 KV heads, intermediate 1536, vocab 8000),
  one prefill step of each prompt length, best of ``--rounds`` after a warm-up; 1 rank, and
  2 ranks on loopback (rank 1 a real ``WorkerRank`` process), 1 thread per rank.
- Scaling: decode tokens/s of the same model at 1 and 2 ranks, 1 thread per rank.
- Memory: each rank's resident set (psutil, read from outside the worker process). Rank 0 is
  this bench process, which also ran the configurations before it: its figure is an upper bound.
- ``--big``: the 1.1B shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632,
  vocab 32000) at 1 rank, fp32, ``--threads`` threads: measured decode tokens/s beside the bound
  weight bytes per token / measured matvec bandwidth (``planner.probe.matvec_pass``, through
  ``worker.kernels.quant.linear``: the kernel the decode runs). One probe pass and one decode step
  alternate 72 times; each round gives a fraction of the bound, and the median is reported
  (``big_model_bound`` says why). Writing the 4.4 GB checkpoint takes about a minute.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner_check import BIG, SMALL, cluster, measure, prefill, resident_bytes  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from report import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from planner.probe import matvec_pass  # noqa: E402
from planner.synthetic import write_random_llama  # noqa: E402
from worker.rank.step import SeqSpan  # noqa: E402

log = logging.getLogger("bench.latency")
MIB = 1 << 20


def decode_weight_bytes(shape: dict[str, Any], bytes_per_param: int = 4) -> int:
    """Weight bytes one decode step reads: every decoder layer's matrices and the LM head
    (the embedding is a row lookup, norms are negligible)."""
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    per_layer = d * (2 * d + 2 * kv) + 3 * d * f  # q, o, k, v; gate, up, down
    return (shape["num_hidden_layers"] * per_layer + v * d) * bytes_per_param


def small_model_series(model_dir: Path, prompts: list[int], tokens: int, rounds: int) -> dict[str, Any]:
    """TTFT per prompt length, decode tokens/s and resident memory per rank, at 1 and 2 ranks."""
    out: dict[str, Any] = {}
    for ranks in (1, 2):
        series: dict[str, Any] = {"ttft_ms": {}, "decode_tok_s": {}}
        for prompt in prompts:
            log.info("small model, %d rank(s), prompt %d", ranks, prompt)
            rss: list[int] = []
            tps, ttft = measure(model_dir, ranks, 1, prompt, tokens, rounds, prompt + tokens + 8, rss_out=rss)
            series["ttft_ms"][str(prompt)] = round(ttft * 1e3, 1)
            series["decode_tok_s"][str(prompt)] = round(tps, 1)
            series["rss_mib_per_rank"] = [round(r / MIB, 1) for r in rss]
        out[f"{ranks}_rank{'s' if ranks > 1 else ''}"] = series
    one, two = out["1_rank"], out["2_ranks"]
    out["speedup_2_over_1"] = {
        "decode": {p: round(two["decode_tok_s"][p] / one["decode_tok_s"][p], 2) for p in one["decode_tok_s"]},
        "ttft": {p: round(one["ttft_ms"][p] / two["ttft_ms"][p], 2) for p in one["ttft_ms"]},
    }
    return out


def big_model_bound(model_dir: Path, threads: int, tokens: int, pairs: int = 9) -> dict[str, Any]:
    """fp32 1.1B decode at 1 rank against weight bytes / measured matvec bandwidth.

    This machine's memory bandwidth drifts by 20-40% from minute to minute, and within a second
    too: a bound probed once and a decode timed apart do not compare. So probe passes and decode
    steps alternate one by one, ``pairs * tokens`` times, over 2 GiB of probe matrices allocated
    once (an earlier version re-allocated them for each of nine pairs of a best-of-3 probe and 8
    steps, about 1.5 s apart: its per-pair fractions spread from 0.80 to 1.34). Each round, a
    probe pass and the decode step right after it, ~0.2 s in all, gives a fraction of the bound;
    the median is reported, and the best step against the best pass beside it."""
    torch.set_num_threads(threads)
    weight_bytes = decode_weight_bytes(BIG)
    probe = matvec_pass("float32", total_bytes=2048 * MIB)
    fractions, probes, steps = [], [], []
    with cluster(model_dir, 1, threads, 32 + pairs * tokens + 8) as (executor, pids):
        logits, ttft = prefill(executor, 32)
        position = 32
        probe()  # warm-up: the probe's matrices and the decode's weights each streamed once
        logits = executor.step([[int(logits[0].argmax())]], [SeqSpan(0, position, 1)])
        position += 1
        for _ in range(pairs * tokens - 1):
            bandwidth = probe()
            token = int(logits[0].argmax())
            start = time.perf_counter()
            logits = executor.step([[token]], [SeqSpan(0, position, 1)])
            step = time.perf_counter() - start
            position += 1
            probes.append(bandwidth)
            steps.append(step)
            fractions.append(weight_bytes / step / (bandwidth * 1e9))
        rss = resident_bytes(pids)
    return {"threads": threads, "rounds": len(steps),
            "weight_mib_per_token": round(weight_bytes / MIB),
            "matvec_gb_s_quartiles": [round(q, 2) for q in statistics.quantiles(probes, n=4)],
            "fraction_of_bound_quartiles": [round(q, 3) for q in statistics.quantiles(fractions, n=4)],
            "fraction_of_bound": round(statistics.median(fractions), 3),
            "fraction_best_step_vs_best_pass": round(weight_bytes / min(steps) / (max(probes) * 1e9), 3),
            "bound_tok_s": round(statistics.median(probes) * 1e9 / weight_bytes, 2),
            "measured_tok_s": round(1 / statistics.median(steps), 2),
            "best_tok_s": round(1 / min(steps), 2),
            "decode_gb_s": round(weight_bytes / statistics.median(steps) / 1e9, 2),
            "ttft_ms_32": round(ttft * 1e3, 1), "rss_mib": round(rss[0] / MIB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="32,256,1024", help="prompt lengths for time to first token")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after a warm-up; best kept")
    parser.add_argument("--big", action="store_true", help="also the 1.1B shape against its bandwidth bound")
    parser.add_argument("--threads", type=int, default=2, help="threads of the --big run")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    prompts = [int(p) for p in args.prompts.split(",")]
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        small = write_random_llama(Path(tmp) / "small", SMALL | {"max_position_embeddings": max(prompts) + 64})
        result["small_llama_512x8"] = small_model_series(small, prompts, args.tokens, args.rounds)
        if args.big:
            log.info("writing the 1.1B shape")
            big = write_random_llama(Path(tmp) / "big", BIG)
            result["llama_1.1B_fp32"] = big_model_bound(big, args.threads, max(8, args.tokens // 2))
    emit(result, args.out)


if __name__ == "__main__":
    main()
