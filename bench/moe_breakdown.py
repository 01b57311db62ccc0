"""Where a streamed MoE decode token's time goes, against the I/O bound, as JSON.

    .venv/bin/python bench/moe_breakdown.py [--model DIR] [--caches 2x,25%] [--runs on_demand_distance,...]
                                            [--tokens 24] [--prompts 3] [--disk-mbps MB/S] [--out FILE]

One rank in this process, one torch thread, the page cache dropped as in bench/moe_cache.py (the
same shard, text and runs). The decode is timed from outside the cache, by wrapping a few
functions of this process (the bench's instruments, not the code's):

- every piece a reader or the compute thread reads (``ShardFile.read_part``): its start, end and
  bytes. Their union is the time the disk had a read in flight (``disk_busy_ms``), the rest of the
  step it had none (``disk_idle_ms``), and bytes / busy time the MB/s the reads got while busy;
- the compute thread's waits for experts (``expert_stall_seconds``), the experts' products
  (``gated_mlp``), the cache's bookkeeping (``begin_layer``, ``end_layer``, ``prefetch``, ``keep``,
  ``record_prediction``) and the router;
- the same text decoded with every expert resident, so that ``compute_ms`` is what a token costs
  without reads, and the rest of a streamed token is reading, waiting and contention.

Right before and right after each run, bench/moe_cache.py's ``disk_probe`` measures cold reads of
the shard's experts at the run's read size and depth; the bound uses the higher of their mean and
the MB/s the run's reads got while busy (``io_bound_fraction``; ``io_bound_fraction_probe``: the
probes alone), as bench/moe_cache.py does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moe_cache  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from paced_disk import add_disk_arguments, disk_of_speed  # noqa: E402
from page_cache import drop_page_cache  # noqa: E402
from report import emit  # noqa: E402

from worker.comm.collective import StarHub  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.memory import expert_cache  # noqa: E402
from worker.models import moe  # noqa: E402
from worker.rank.executor import Executor  # noqa: E402
from worker.rank.runtime import RankSpec  # noqa: E402
from worker.rank.step import SeqSpan  # noqa: E402
from worker.shards.shard_file import ShardFile  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402
from worker.shards.weights import rank_shard_path  # noqa: E402

PROMPT_TOKENS = moe_cache.PROMPT_TOKENS


class Probe:
    """Wall time spent in wrapped functions (compute thread only) and the intervals of every read."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.reads: list[tuple[float, float, int]] = []
        self.lock = threading.Lock()
        self.main = threading.get_ident()
        self._undo: list[Callable[[], None]] = []

    def time(self, owner: Any, name: str, label: str | None = None) -> None:
        original = getattr(owner, name)
        key = label or name

        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self.main:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
                self.calls[key] = self.calls.get(key, 0) + 1

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def reads_of(self, cls: type[ShardFile]) -> None:
        original = cls.read_part

        def read_part(file: ShardFile, block: str, buffer: torch.Tensor, start: int, stop: int) -> None:
            begin = time.perf_counter()
            original(file, block, buffer, start, stop)
            with self.lock:
                self.reads.append((begin, time.perf_counter(), stop - start))

        cls.read_part = read_part  # type: ignore[method-assign,assignment]
        self._undo.append(lambda: setattr(cls, "read_part", original))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        with self.lock:
            self.reads.clear()

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()


def busy(intervals: list[tuple[float, float, int]], start: float, stop: float) -> tuple[float, float]:
    """Seconds inside ``start:stop`` with at least one read in flight, and with two or more."""
    events = sorted([(max(a, start), 1) for a, b, _ in intervals if b > start and a < stop]
                    + [(min(b, stop), -1) for a, b, _ in intervals if b > start and a < stop])
    one = two = 0.0
    depth, last = 0, start
    for at, step in events:
        if depth >= 1:
            one += at - last
        if depth >= 2:
            two += at - last
        depth, last = depth + step, at
    return one, two


def decode(shard_dir: Path, sequences: list[list[int]], cache: int | None, config: tuple[str, bool, str, bool],
           probe: Probe) -> dict[str, Any]:
    """``moe_cache.run``'s decode, with the probe's figures per token."""
    policy, prefetch, predictor, gated = config
    cfg = ModelConfig.from_dir(shard_dir)
    spec = RankSpec(str(shard_dir), cfg, plan_shards(cfg, [1.0])[0], 1, 256, expert_cache_bytes=cache,
                    expert_policy=policy, prefetch=prefetch, expert_predictor=predictor)
    expert_cache.GATED = gated
    try:
        executor = Executor(spec, StarHub(1))
    finally:
        expert_cache.GATED = True
    elapsed = busy_s = two_s = 0.0
    tokens = 0
    stats: dict[str, float] = {}
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    nbytes = pieces = 0
    try:
        for seq in sequences:
            executor.step([seq[:PROMPT_TOKENS]], [SeqSpan(0, 0, PROMPT_TOKENS)])
            drop_page_cache(rank_shard_path(shard_dir, spec.shard))
            before = executor.rank.stats()
            probe.reset()
            start = time.perf_counter()
            for pos in range(PROMPT_TOKENS, len(seq)):
                executor.step([[seq[pos]]], [SeqSpan(0, pos, 1)])
            stop = time.perf_counter()
            elapsed += stop - start
            tokens += len(seq) - PROMPT_TOKENS
            one, two = busy(probe.reads, start, stop)
            busy_s, two_s = busy_s + one, two_s + two
            nbytes += sum(n for _, _, n in probe.reads)
            pieces += len(probe.reads)
            after = executor.rank.stats()
            for key, value in after.items():
                if isinstance(value, int | float):
                    stats[key] = stats.get(key, 0.0) + value - before.get(key, 0)
            for key, value in probe.seconds.items():
                seconds[key] = seconds.get(key, 0.0) + value
                calls[key] = calls.get(key, 0) + probe.calls[key]
    finally:
        executor.close()
    ms = 1000 / tokens
    return {"ms_per_token": elapsed * ms, "tokens_per_s": tokens / elapsed,
            "disk_busy_ms": busy_s * ms, "disk_idle_ms": (elapsed - busy_s) * ms,
            "disk_two_or_more_in_flight_ms": two_s * ms,
            "read_mb_per_s_while_busy": nbytes / busy_s / 1e6 if busy_s else None,
            "read_mb_per_token": nbytes / tokens / 1e6, "pieces_per_token": pieces / tokens,
            "mean_piece_kb": nbytes / pieces / 1e3 if pieces else None,
            "needed_mb_per_token": stats.get("expert_fetched_bytes", 0.0) / tokens / 1e6,
            "stall_ms": stats.get("expert_stall_seconds", 0.0) * ms,
            "misses_per_token": stats.get("expert_misses", 0.0) / tokens,
            "ms": {key: value * ms for key, value in sorted(seconds.items())},
            "calls_per_token": {key: value / tokens for key, value in sorted(calls.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--caches", default="2x,25%")
    parser.add_argument("--runs", default="on_demand_distance,prefetch_adaptive_distance")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--shards", type=Path, default=None, help="an existing shard dir (else built in a tmp dir)")
    parser.add_argument("--out", default=None)
    add_disk_arguments(parser)
    args = parser.parse_args()
    moe_cache.require_model(args.model)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with moe_cache.scratch(args.shards) as tmp, disk_of_speed(Path(tmp), args.disk_mbps, args.disk_model, ShardFile):
        shard_dir = args.shards or moe_cache.build(tmp, args.model, None)
        config = ModelConfig.from_dir(shard_dir)
        sequences = moe_cache.texts(args.model or moe_cache.TOKENIZER, args.prompts, args.tokens)
        moe_layers = sum(config.is_moe_layer(layer) for layer in range(config.num_layers))
        path = rank_shard_path(shard_dir, plan_shards(config, [1.0])[0])
        expert_bytes = moe_cache.largest_expert(shard_dir, config)
        probe = Probe()
        probe.reads_of(ShardFile)  # inside the paced disk's wrapper: a read is busy until the paced disk is done
        probe.time(moe, "gated_mlp", "expert_and_dense_mlp")
        probe.time(moe, "route")
        for name in ("begin_layer", "end_layer", "prefetch", "keep", "record_prediction"):
            probe.time(expert_cache.ExpertCache, name)
        for name in ("predict", "predict_at_input", "observe"):
            probe.time(moe.Predictor, name, f"predictor.{name}")
        probe.time(expert_cache.ExpertCache, "prefetch_starved")
        report: dict[str, Any] = {"model": str(args.model) if args.model else "random", "expert_bytes": expert_bytes,
                                  "disk_cap_mb_per_s": args.disk_mbps,
                                  "disk_model": args.disk_model if args.disk_mbps else None, "runs": {}}
        try:
            drop_page_cache(path)
            report["resident"] = decode(shard_dir, sequences, None, moe_cache.RUNS["all_resident"], probe)
            for choice in args.caches.split(","):
                experts = moe_cache.cache_experts(choice, config, moe_layers)
                for name in args.runs.split(","):
                    before = moe_cache.disk_probe(shard_dir, config)
                    drop_page_cache(path)
                    result = decode(shard_dir, sequences, experts * expert_bytes, moe_cache.RUNS[name], probe)
                    after = moe_cache.disk_probe(shard_dir, config)
                    probed = (before["mb_per_s"] + after["mb_per_s"]) / 2
                    mb_per_s = max(probed, result["read_mb_per_s_while_busy"] or 0.0)  # as bench/moe_cache.py
                    bound_ms = result["needed_mb_per_token"] / mb_per_s * 1000
                    result |= {"disk_before": before, "disk_after": after, "io_bound_ms_per_token": bound_ms,
                               "io_bound_fraction": bound_ms / result["ms_per_token"],
                               "io_bound_fraction_probe": result["needed_mb_per_token"] / probed * 1000
                               / result["ms_per_token"]}
                    report["runs"][f"{name}@{choice}"] = result
        finally:
            probe.undo()
    emit(report, args.out)


if __name__ == "__main__":
    main()
