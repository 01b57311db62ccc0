"""The native decode step (``worker.models.native_step``) on and off, over lanes and ZeroMQ, in one
run: decode tok/s of the configurations of issue #19 (``bench/tp_vs_dllama.py``'s shapes, rank
0 in this process, the other ranks real worker processes, 1 thread per rank, batch 1, greedy),
each system of a round back to back, the rounds interleaved (every other round reversed). At 3
and 4 ranks (``small_fp32_3``, ``small_fp32_4``) rank 0 is a star's hub: ``lanes_native`` runs
the native step on every rank, the hub's allreduces in C (``lane_hub_allreduce_f32``). On a
2-core machine 3-4 ranks oversubscribe it: only the ratios of one round mean anything.

    .venv/bin/python bench/native_step.py --models DIR [--make-models] [--rounds 2] [--dll DLL_DIR]
        [--spin-us N] [--only NAMES] [--out FILE]

Systems: ``lanes_native`` (lanes, native step), ``lanes_python`` (lanes, ``EDGELLM_NATIVE_STEP=0``),
``zeromq`` (ZeroMQ, where the step runs in Python whatever the setting), at 3-4 ranks
``lanes_hub_python`` (lanes, native step, but the hub's star in Python: ``StarHub(c_star=False)``,
so rank 0 runs its layers and sums in Python as before ``lane_hub_allreduce_f32``), and with ``--dll``
distributed-llama (``../shared/peers/measure_dllama.py``, its own timer). 1 rank: ``native``
against ``python``. This machine is shared: compare the ratios of one round; the load average
is printed beside each round.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import planner_check  # noqa: E402
from report import emit  # noqa: E402
from tp_vs_dllama import PEERS, edgellm, make_models, set_lanes  # noqa: E402

from worker.comm import lane as lanes  # noqa: E402
from worker.comm.collective import StarHub  # noqa: E402
from worker.models import native_step  # noqa: E402

log = logging.getLogger("bench.native_step")
# (name, model, ranks, weights)
CONFIGS = [("small_fp32_2", "small", 2, "fp32"), ("big_fp32_2", "big", 2, "fp32"),
           ("small_int8_2", "small", 2, "int8"), ("small_fp32_1", "small", 1, "fp32"),
           ("small_int8_1", "small", 1, "int8"), ("small_fp32_3", "small", 3, "fp32"),
           ("small_fp32_4", "small", 4, "fp32")]
SYSTEMS = {1: ["native", "python"], 2: ["lanes_native", "lanes_python", "zeromq"]} | {
    n: ["lanes_native", "lanes_python", "zeromq", "lanes_hub_python"] for n in (3, 4)}


def run_system(system: str, models: Path, model: str, ranks: int, weights: str, dll: Any) -> float:
    if system == "dllama":
        return float(dll.dllama(model, ranks, "f32" if weights == "fp32" else "q40", reps=3))
    set_lanes(system.startswith("lanes"))
    os.environ[native_step.DISABLE_ENV] = "0" if system == "lanes_python" else "1"
    hub = functools.partial(StarHub, c_star=False) if system == "lanes_hub_python" else StarHub
    setattr(planner_check, "StarHub", hub)  # noqa: B010  (the hub cluster() builds)
    return edgellm(models / model, ranks, weights, models / "cache")


def one_round(r: int, configs: list[tuple[str, str, int, str]], models: Path, dll: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"load_average": os.getloadavg()}
    for name, model, ranks, weights in configs:
        # distributed-llama runs 2^n nodes only
        systems = SYSTEMS[ranks] + (["dllama"] if dll is not None and ranks in (2, 4) else [])
        result: dict[str, float] = {}
        for system in systems if r % 2 == 0 else systems[::-1]:
            result[system] = round(run_system(system, models, model, ranks, weights, dll), 1)
            log.warning("round %d %s %s: %.1f tok/s", r, name, system, result[system])
        first, second = systems[0], systems[1]
        result[f"{first}_vs_{second}"] = round(result[first] / result[second], 2)
        if ranks > 1:
            result["lanes_native_vs_zeromq"] = round(result["lanes_native"] / result["zeromq"], 2)
        if "lanes_hub_python" in result:
            result["lanes_native_vs_lanes_hub_python"] = round(result["lanes_native"] / result["lanes_hub_python"], 2)
        if "dllama" in result:
            result["lanes_native_vs_dllama"] = round(result["lanes_native"] / result["dllama"], 2)
        row[name] = result
    row["load_average_after"] = os.getloadavg()
    return row


def one_rank_toggled(model_dir: Path, threads: int, rounds: int) -> list[dict[str, float]]:
    """1 rank, one process: the native step on and off in turn on the same loaded model, so
    start-up and placement do not differ between the two."""
    from planner_check import cluster, decode_round

    results = []
    with cluster(model_dir, 1, threads, 128) as (executor, _):
        decode_round(executor, 4, 16)
        step = executor.model.native_step
        for _ in range(rounds):
            row = {}
            for name, native in (("native", step), ("python", None)):
                executor.model.native_step = native
                row[name] = round(decode_round(executor, 4, 64)[0], 1)
            executor.model.native_step = step
            results.append(row | {"native_vs_python": round(row["native"] / row["python"], 2)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--make-models", action="store_true")
    parser.add_argument("--dll", type=Path, help="distributed-llama built by ../shared/peers/build_dllama.sh")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--spin-us", type=int, default=None,
                        help="EDGELLM_SPIN_US for every rank (default: the lanes' own, 1000 µs where a host has a "
                             "core per rank, 0 otherwise; ZeroMQ 0)")
    parser.add_argument("--toggled", type=int, default=0, metavar="THREADS",
                        help="instead: 1 rank with THREADS threads, the native step toggled in one process")
    parser.add_argument("--only", default="", help="comma-separated config names (default: all)")
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.make_models:
        make_models(args.models)
    if args.spin_us is not None:
        os.environ[lanes.SPIN_ENV] = str(args.spin_us)
    if args.toggled:
        emit({"one_rank_toggled": one_rank_toggled(args.models / "small", args.toggled, args.rounds),
              "threads": args.toggled, "load_average": os.getloadavg()}, args.out)
        return
    dll = None
    if args.dll:
        os.environ["DLL"] = str(args.dll)
        sys.path.insert(0, str(PEERS))
        dll = importlib.import_module("measure_dllama")
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only.split(",")]
    rounds = [one_round(r, configs, args.models, dll) for r in range(args.rounds)]
    names = [c[0] for c in configs]
    summary = {name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
               for name in names}
    emit({"machine": {"cores": os.cpu_count()}, "spin_us": os.environ.get(lanes.SPIN_ENV), "threads_per_rank": 1, "batch": 1, "rounds": rounds,
          "median_over_rounds": summary}, args.out)


if __name__ == "__main__":
    main()
