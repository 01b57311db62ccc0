"""What the expert cache adds to an on-demand read: per layer of ``depth`` missed experts, the time
from "the router names them" to "the last is usable", against bare reads of the same bytes, as JSON.

    .venv/bin/python bench/expert_reads.py [--hidden 256] [--width 512] [--expert-bits 8]
                                           [--depths 1,2,4] [--steps 24] [--repeats 3] [--code DIR]
                                           [--workdir DIR] [--out FILE]

A random Mixtral of the given shape (8 layers, 8 experts; the default is the trained tiny MoE's,
whose fp32 experts are 1.57 MB) is written as a one-rank shard. Every read is cold: the file is
opened as the cache opens it (``POSIX_FADV_RANDOM``) and each read's pages are dropped after it
(``ShardFile``). Per depth, three ways of reading the same layers, interleaved ``--repeats``
times:

- ``bare_serial``: the compute thread reads the layer's experts one after the other
  (``ShardFile.read_into``), no cache;
- ``bare_parallel``: the compute thread and ``depth - 1`` threads of a pool each read one
  (a thread hand-off included);
- ``cache``: an ``ExpertCache`` of ``2 * depth`` buffers, as the MoE layer drives it:
  ``begin_layer`` with the layer's experts (all missing), then ``get`` each, in the order
  ``begin_layer`` returns (the given order where it returns none). No compute.

``overhead_ms_per_read`` is (cache - bare) / depth, against the faster bare way. ``--code DIR``
measures the cache of another checkout (its ``worker`` package; the shard format must be the
same), e.g. main's, for a before/after in one run; run it once per checkout, interleaving the
calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def build(out: Path, hidden: int, width: int, expert_bits: int | None) -> Path:
    """A random 8-layer, 8-expert Mixtral of this shape, written as a one-rank shard."""
    import transformers

    from worker.config import ModelConfig
    from worker.kernels.quant import QuantSpec
    from worker.shards.shard_writer import write_shards
    from worker.shards.sharding import plan_shards

    torch.manual_seed(0)
    model = out / "hf"
    transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=hidden, intermediate_size=width, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64)).save_pretrained(model)
    config = ModelConfig.from_dir(model)
    quant = QuantSpec(bits=None, expert_bits=expert_bits) if expert_bits else None
    return write_shards(model, plan_shards(config, [1.0]), out / "shards", progress=False, quant=quant)


def layers(depth: int, steps: int) -> list[tuple[int, list[int]]]:
    """``steps`` layer visits of ``depth`` experts each, cycling over layers and experts so that no
    expert comes back within 8 visits (every read misses a cache of ``2 * depth`` buffers)."""
    out = []
    for step in range(steps):
        layer = step % 8
        first = (step // 8 * depth) % 8
        out.append((layer, [(first + i) % 8 for i in range(depth)]))
    return out


def bare_serial(file: Any, visits: list[tuple[int, list[int]]], buffers: list[torch.Tensor]) -> list[float]:
    from worker.shards.weights import expert_block

    times = []
    for layer, experts in visits:
        start = time.perf_counter()
        for i, expert in enumerate(experts):
            file.read_into(expert_block(layer, expert), buffers[i])
        times.append(time.perf_counter() - start)
    return times


def bare_parallel(file: Any, visits: list[tuple[int, list[int]]], buffers: list[torch.Tensor],
                  pool: ThreadPoolExecutor) -> list[float]:
    from worker.shards.weights import expert_block

    times = []
    for layer, experts in visits:
        start = time.perf_counter()
        futures = [pool.submit(file.read_into, expert_block(layer, e), buffers[i]) for i, e in enumerate(experts[1:], 1)]
        file.read_into(expert_block(layer, experts[0]), buffers[0])
        for future in futures:
            future.result()
        times.append(time.perf_counter() - start)
    return times


def cached(cache: Any, visits: list[tuple[int, list[int]]]) -> list[float]:
    times = []
    for layer, experts in visits:
        start = time.perf_counter()
        order = cache.begin_layer(layer, experts) or experts
        for expert in order:
            with cache.get(layer, expert):
                pass
        cache.end_layer()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=512, help="one expert's intermediate size")
    parser.add_argument("--expert-bits", type=int, choices=(4, 8), default=None)
    parser.add_argument("--depths", default="1,2,4")
    parser.add_argument("--steps", type=int, default=24, help="layer visits per depth and way, per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose worker package is measured")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="write the model here, or reuse the one written there before (default: a temporary dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    sys.path.insert(1, str(REPO / "bench"))
    from page_cache import drop_page_cache
    from report import emit

    from worker.config import ModelConfig
    from worker.memory.expert_cache import ExpertCache
    from worker.shards.shard_file import ShardFile
    from worker.shards.sharding import plan_shards
    from worker.shards.weights import expert_block, rank_shard_path

    torch.set_num_threads(1)
    depths = [int(d) for d in args.depths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        shard_dir = work / "shards" if (work / "shards").exists() else build(work, args.hidden, args.width,
                                                                               args.expert_bits)
        config = ModelConfig.from_dir(shard_dir)
        path = rank_shard_path(shard_dir, plan_shards(config, [1.0])[0])
        drop_page_cache(path)  # written just now: dirty pages would not drop after each read
        file = ShardFile(path, random_access=True)
        nbytes = max(file.block_bytes(expert_block(m, e)) for m in range(8) for e in range(8))
        buffers = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(max(depths))]
        ms: dict[str, dict[str, list[float]]] = {str(d): {"bare_serial": [], "bare_parallel": [], "cache": []}
                                                for d in depths}
        pool = ThreadPoolExecutor(max(1, max(depths) - 1))
        try:
            for _ in range(args.repeats):
                for depth in depths:
                    visits = layers(depth, args.steps)
                    out = ms[str(depth)]
                    out["bare_serial"] += bare_serial(file, visits, buffers)
                    out["bare_parallel"] += bare_parallel(file, visits, buffers, pool)
                    cache = ExpertCache(ShardFile(path, random_access=True), 8, 8, 2 * depth, nbytes)
                    try:
                        out["cache"] += cached(cache, visits)
                    finally:
                        cache.close()
        finally:
            pool.shutdown()
            file.close()
    report: dict[str, Any] = {"code": str(args.code), "expert_bytes": nbytes, "expert_bits": args.expert_bits or 32,
                              "depths": {}}
    for key, ways in ms.items():
        median = {way: 1000 * statistics.median(times) for way, times in ways.items()}
        bare = min(median["bare_serial"], median["bare_parallel"])
        report["depths"][key] = {f"{way}_ms_per_layer": round(v, 3) for way, v in median.items()} | {
            "overhead_ms_per_read": round((median["cache"] - bare) / int(key), 3),
            "cache_ms_per_read": round(median["cache"] / int(key), 3)}
    emit(report, args.out)


if __name__ == "__main__":
    main()
