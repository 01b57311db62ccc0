"""Coordinator RSS and 2-rank decode tokens/s of the checkout it is run from: rank 0 in this
process, rank 1 a real process on loopback (``bench/planner_check.py``'s ``cluster``), one thread
each. Written to compare the vocab-parallel LM head with the whole head on the coordinator: run it
from this checkout and from one before the split (``git worktree add /tmp/base df9250a``), each
on shards its own ``edgellm shard`` wrote, interleaved, and compare ratios of the same round::

    cd /tmp/base && PYTHONPATH=.:bench python /path/to/bench/lm_head_split.py /tmp/shards-base 32

Prints one JSON line: ``rss_mib`` (rank 0, rank 1) after loading and a warm-up, ``tok_s``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from planner_check import cluster, resident_bytes  # bench/ is on sys.path (run as a script)

from worker.rank.step import SeqSpan

PROMPT = list(range(1, 9))
WARM_UP = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a checkpoint or a 2-rank shard directory")
    parser.add_argument("tokens", type=int, help="decode steps timed")
    args = parser.parse_args()
    with cluster(args.model, 2, 1, 256) as (executor, pids):
        logits = executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))])
        position = len(PROMPT)
        for _ in range(WARM_UP):
            logits = executor.step([[int(logits[0].argmax())]], [SeqSpan(0, position, 1)])
            position += 1
        rss = resident_bytes(pids)
        start = time.perf_counter()
        for _ in range(args.tokens):
            logits = executor.step([[int(logits[0].argmax())]], [SeqSpan(0, position, 1)])
            position += 1
        seconds = time.perf_counter() - start
    print(json.dumps({"rss_mib": [r / 2**20 for r in rss], "tok_s": args.tokens / seconds}))


if __name__ == "__main__":
    main()
