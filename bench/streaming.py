"""Dense weight streaming: a rank whose shard is ~4x its memory budget, against the same rank
resident, as JSON.

    .venv/bin/python bench/streaming.py [--tokens 32] [--out FILE]

One rank in this process (no network). Reads drop the page cache after use
(``posix_fadvise(DONTNEED)``), so the streamed figures are cold-cache figures. The goal of the
issue is ``streamed step <= 1.15 x max(resident step, disk read per step)``.
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

from worker.comm.collective import StarHub  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.rank.executor import Executor  # noqa: E402
from worker.rank.runtime import RankSpec  # noqa: E402
from worker.rank.step import SeqSpan  # noqa: E402
from worker.shards.shard_writer import write_shards  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402

SHAPE: dict[str, Any] = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=4000, max_position_embeddings=512)
PROMPT = list(range(1, 17))


def build(out: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(out / "hf")
    config = ModelConfig.from_dir(out / "hf")
    return write_shards(out / "hf", plan_shards(config, [1.0]), out / "shards", progress=False)


def decode(shard_dir: Path, tokens: int, budget: int | None) -> dict[str, Any]:
    config = ModelConfig.from_dir(shard_dir)
    spec = RankSpec(str(shard_dir), config, plan_shards(config, [1.0])[0], 1, 256, memory_budget=budget)
    executor = Executor(spec, StarHub(1))
    try:
        logits = executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))])
        before = executor.rank.stats()
        token = int(logits[0].argmax())
        start = time.perf_counter()
        for i in range(tokens):
            token = int(executor.step([[token]], [SeqSpan(0, len(PROMPT) + i, 1)])[0].argmax())
        elapsed = time.perf_counter() - start
        after = executor.stats()
    finally:
        executor.close()
    read_s = after["io_read_seconds"] - before["io_read_seconds"]
    stall_s = after["io_stall_seconds"] - before["io_stall_seconds"]
    return {"tokens_per_s": tokens / elapsed, "step_ms": 1000 * elapsed / tokens,
            "disk_read_ms_per_step": 1000 * read_s / tokens, "stall_ms_per_step": 1000 * stall_s / tokens,
            "overlap_ratio": 1.0 - stall_s / read_s if read_s > 0 else 1.0,
            "bytes_read_per_token": (after["weight_bytes_read"] - before["weight_bytes_read"]) / tokens,
            "window_slots": after["window_slots"], "weight_bytes": after["weight_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = build(Path(tmp))
        shard_bytes = sum(p.stat().st_size for p in shard_dir.glob("rank-*.safetensors"))
        budget = shard_bytes // 4
        streamed = decode(shard_dir, args.tokens, budget)  # first, so the resident run can't warm its cache
        resident = decode(shard_dir, args.tokens, None)
    bound = max(resident["step_ms"], streamed["disk_read_ms_per_step"])
    report = {"shape": SHAPE, "threads": torch.get_num_threads(), "shard_bytes": shard_bytes, "budget_bytes": budget,
              "page_cache": "posix_fadvise(DONTNEED) after every read", "resident": resident, "streamed": streamed,
              "streamed_over_bound": streamed["step_ms"] / bound,
              "bound": "max(resident step (compute + comm), disk read per step)"}
    emit(report, args.out)


if __name__ == "__main__":
    main()
