"""MoE expert cache at a fixed budget: prediction + prefetch against on-demand loading and
against all experts resident, and the distance eviction policy against plain LRU, as JSON.

    .venv/bin/python bench/moe_cache.py [--tokens 32] [--out FILE]

One rank in this process, a random Mixtral-shaped model (8 experts, top-2). The cache holds
2x the active experts of a layer (4 experts; ``--cache-experts N`` for another size). Prefetch
runs use the ``temporal`` predictor unless named ``router``. Reads drop the page cache after use, so misses
really go to disk. Random routers route close to uniformly, which is the hard case for a
cache; real checkpoints have skewed, more predictable routing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from server.executor import Executor  # noqa: E402
from worker.collective import StarHub  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.runtime import RankSpec  # noqa: E402
from worker.shard_writer import write_shards  # noqa: E402
from worker.sharding import plan_shards  # noqa: E402
from worker.step import SeqSpan  # noqa: E402

SHAPE: dict[str, Any] = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=4000, num_local_experts=8, num_experts_per_tok=2,
                             max_position_embeddings=512)
PROMPT = list(range(1, 17))


def build(out: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE)).save_pretrained(out / "hf")
    config = ModelConfig.from_dir(out / "hf")
    return write_shards(out / "hf", plan_shards(config, [1.0]), out / "shards", progress=False)


def run(shard_dir: Path, tokens: int, cache: int | None, policy: str, prefetch: bool,
        predictor: str = "temporal") -> dict[str, Any]:
    config = ModelConfig.from_dir(shard_dir)
    spec = RankSpec(str(shard_dir), config, plan_shards(config, [1.0])[0], 1, 256, expert_cache_bytes=cache,
                    expert_policy=policy, prefetch=prefetch, expert_predictor=predictor)
    executor = Executor(spec, StarHub(1))
    try:
        token = int(executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))])[0].argmax())
        before = executor.rank.stats()
        start = time.perf_counter()
        out = []
        for i in range(tokens):
            token = int(executor.step([[token]], [SeqSpan(0, len(PROMPT) + i, 1)])[0].argmax())
            out.append(token)
        elapsed = time.perf_counter() - start
        after = executor.rank.stats()
    finally:
        executor.close()

    def delta(key: str) -> float:
        return after[key] - before[key]

    lookups = delta("expert_hits") + delta("expert_misses")
    return {"tokens_per_s": tokens / elapsed, "hit_rate": delta("expert_hits") / lookups if lookups else 1.0,
            "recall": after["expert_prediction_recall"], "precision": after["expert_prediction_precision"],
            "bytes_read_per_token": delta("expert_bytes_read") / tokens,
            "stall_ms_per_token": 1000 * delta("expert_stall_seconds") / tokens,
            "late_prefetches": delta("expert_late_prefetches"), "tokens": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--cache-experts", type=int, default=None,
                        help="cache size in experts (default: 2x the active experts of one layer, for the whole "
                             "model; 2x per layer is 2 * top_k * layers)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = build(Path(tmp))
        d, w = SHAPE["hidden_size"], SHAPE["intermediate_size"]
        expert_bytes = 3 * d * w * 4
        cache = (args.cache_experts or 2 * SHAPE["num_experts_per_tok"]) * expert_bytes
        runs = {
            "prefetch_distance": run(shard_dir, args.tokens, cache, "distance", True),  # temporal predictor
            "prefetch_router_distance": run(shard_dir, args.tokens, cache, "distance", True, "router"),
            "prefetch_lru": run(shard_dir, args.tokens, cache, "lru", True),
            "on_demand_distance": run(shard_dir, args.tokens, cache, "distance", False),
            "on_demand_lru": run(shard_dir, args.tokens, cache, "lru", False),
            "all_resident": run(shard_dir, args.tokens, None, "distance", False),
        }
    same = all(r["tokens"] == runs["all_resident"]["tokens"] for r in runs.values())
    for r in runs.values():
        del r["tokens"]
    report = {"shape": SHAPE, "threads": torch.get_num_threads(), "expert_bytes": expert_bytes,
              "cache_bytes": cache, "cache_experts": cache // expert_bytes,
              "page_cache": "posix_fadvise(DONTNEED) after every read", "same_tokens_in_every_run": same,
              "runs": runs,
              "speedup_prefetch_over_on_demand": runs["prefetch_distance"]["tokens_per_s"]
              / runs["on_demand_distance"]["tokens_per_s"]}
    emit(report, args.out)


if __name__ == "__main__":
    main()
