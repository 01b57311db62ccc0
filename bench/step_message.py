"""The bare cost of a 2-rank decode step's messaging, as JSON: wall µs of a step that carries no
model (the STEP of one token, one allreduce of its hidden width, the worker's logits gathered),
hub in this process and the worker rank in a spawned one, on lanes (the default) or ZeroMQ.

    .venv/bin/python bench/step_message.py [--hidden 512] [--vocab 8000] [--steps 3000] [--out FILE]

Why: a decoded token's own messaging (the STEP, 2L allreduces, the logits) is a few hundred µs
inside several ms of layers whose time drifts by more than that on a shared machine; alone, a
change to how a STEP travels shows in p50. Run it on two revisions with
``bench/compare_revisions.py --metric p50 -- bench/step_message.py``. The first 500 steps warm up.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit  # noqa: E402

from worker.comm.collective import StarHub, StarRank  # noqa: E402
from worker.comm.wire import Kind  # noqa: E402

TOKEN = "step-message"
WARMUP = 500


def _worker(address: str, hidden: int, logits: int) -> None:
    """Rank 1: for each STEP, one allreduce and its logits, until STOP."""
    torch.set_num_threads(1)
    rank = StarRank(1, address, token=TOKEN, timeout_s=30)
    rank.wait_welcome(30)
    partial, own = torch.ones(1, hidden), torch.ones(1, logits)  # (1, d), (1, V_1)
    while (msg := rank.recv()).kind != Kind.STOP:
        rank.begin(msg)
        rank.allreduce_(partial)
        rank.send_logits(own)
    rank.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(1)
    hub = StarHub(2, token=TOKEN, timeout_s=30)
    half = args.vocab // 2
    proc = mp.get_context("spawn").Process(target=_worker, args=(hub.address, args.hidden, args.vocab - half))
    proc.start()
    try:
        hub.wait_for_ranks(60)
        spans, hidden, own = torch.tensor([[0, 5, 1]]), torch.randn(1, args.hidden), torch.ones(1, half)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter_ns()
            hub.start_step(spans, hidden)
            hub.allreduce_(torch.ones(1, args.hidden))
            hub.gather_logits(own, args.vocab)
            times.append(time.perf_counter_ns() - start)
        on_lanes = hub.on_lanes
        hub.stop()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        hub.close()
    kept = sorted(times[WARMUP:])

    def pct(q: float) -> float:
        return round(kept[min(len(kept) - 1, int(q * len(kept)))] / 1e3, 1)

    emit({"on_lanes": on_lanes, "hidden": args.hidden, "vocab": args.vocab, "steps": len(kept),
          "load_average": os.getloadavg()[0], "p10_us": pct(0.1), "p50_us": pct(0.5), "p90_us": pct(0.9)}, args.out)


if __name__ == "__main__":
    main()
