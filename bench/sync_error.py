"""What a reduced-precision allreduce payload (``--sync-dtype``) costs in accuracy, as JSON.

    .venv/bin/python bench/sync_error.py [--model server/default_model] [--ranks 3] [--tokens 200]
        [--out FILE]

A cluster of ``--ranks`` ranks in this process (rank 0's executor and hub, the others as
``WorkerRank`` threads on loopback) first decodes ``--tokens`` greedy tokens with fp32 sync.
Then, for each reduced sync dtype:

- teacher-forced on the fp32 tokens: ``max_abs_logit_diff`` against fp32's logits over every
  position, and ``greedy_agreement``, the share of positions whose argmax equals fp32's token;
- free-running greedy: ``first_divergence``, the index of the first token that differs from
  fp32's generation (``tokens`` when none does).

``wire_bytes_per_row`` is what one token's partial costs on the wire in each sync dtype.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from server.tokenizer import TextTokenizer  # noqa: E402
from worker.comm.collective import StarHub  # noqa: E402
from worker.comm.wire import SYNC_DTYPES, sync_payload  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.rank.executor import Executor  # noqa: E402
from worker.rank.runtime import RankSpec, WorkerRank  # noqa: E402
from worker.rank.step import SeqSpan  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402

log = logging.getLogger("bench.sync_error")

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "server" / "default_model"
PROMPT = "Once upon a time, there was a little girl who"
TOKEN = "sync-error"


class LocalCluster:
    """``ranks`` ranks in one process, all with the same sync dtype (threads, real sockets: lanes)."""

    def __init__(self, model_dir: Path, ranks: int, sync: str, max_context: int):
        config = ModelConfig.from_dir(model_dir)
        specs = [RankSpec(str(model_dir), config, shard, max_batch=1, max_context=max_context, sync_dtype=sync)
                 for shard in plan_shards(config, [1.0] * ranks)]
        hub = StarHub(ranks, token=TOKEN, sync_dtype=sync)
        self.workers = [WorkerRank(spec, hub.address, TOKEN) for spec in specs[1:]]
        self.executor = Executor(specs[0], hub)
        # a worker's start waits for the hub's welcome (and its lane): start them while the hub waits
        joining = [threading.Thread(target=worker.start) for worker in self.workers]
        for thread in joining:
            thread.start()
        hub.wait_for_ranks(60)
        for thread in joining:
            thread.join()

    def run(self, prompt: list[int], feed: list[int] | None, tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and the (tokens, V) logits that chose them; ``feed`` forces the inputs."""
        logits = self.executor.step([prompt], [SeqSpan(0, 0, len(prompt))])
        chosen: list[int] = []
        rows = []
        for i in range(tokens):
            rows.append(logits[0])
            chosen.append(int(logits[0].argmax()))
            token = feed[i] if feed is not None else chosen[-1]
            logits = self.executor.step([[token]], [SeqSpan(0, len(prompt) + i, 1)])
        return chosen, torch.stack(rows)

    def close(self) -> None:
        self.executor.close()
        for worker in self.workers:
            worker.stop()


def measure(model_dir: Path, ranks: int, tokens: int) -> dict[str, Any]:
    prompt = TextTokenizer(model_dir).encode(PROMPT)
    max_context = len(prompt) + tokens + 1
    config = ModelConfig.from_dir(model_dir)
    reference = LocalCluster(model_dir, ranks, "fp32", max_context)
    try:
        exact_tokens, exact_logits = reference.run(prompt, None, tokens)
    finally:
        reference.close()
    row = torch.zeros(1, config.hidden_size)
    out: dict[str, Any] = {"model": str(model_dir), "ranks": ranks, "tokens": tokens, "prompt_tokens": len(prompt),
                           "hidden_size": config.hidden_size, "dtypes": {}}
    for sync in SYNC_DTYPES:
        wire = sum(t.numel() * t.element_size() for t in sync_payload(row, sync))
        entry: dict[str, Any] = {"wire_bytes_per_row": wire}
        if sync != "fp32":
            log.info("sync %s", sync)
            cluster = LocalCluster(model_dir, ranks, sync, max_context)
            try:
                forced, logits = cluster.run(prompt, exact_tokens, tokens)
                free, _ = cluster.run(prompt, None, tokens)
            finally:
                cluster.close()
            diverged = [i for i, (a, b) in enumerate(zip(free, exact_tokens, strict=True)) if a != b]
            entry |= {
                "max_abs_logit_diff": round(float((logits - exact_logits).abs().max()), 5),
                "logit_range": round(float(exact_logits.max() - exact_logits.min()), 3),
                "greedy_agreement": round(sum(a == b for a, b in zip(forced, exact_tokens, strict=True)) / tokens, 4),
                "first_divergence": diverged[0] if diverged else tokens,
            }
        out["dtypes"][sync] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    emit(measure(Path(args.model), args.ranks, args.tokens), args.out)


if __name__ == "__main__":
    main()
