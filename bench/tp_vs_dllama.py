"""Tensor-parallel decode against distributed-llama, in one run: edgellm with its allreduces on
lanes (``worker.comm.lane``, spinning as it decides from cores and ranks), the same with
``EDGELLM_SPIN_US=0`` (``lanes_spin0``), edgellm on ZeroMQ (``EDGELLM_LANE=0``, the data plane
before lanes), and distributed-llama, each configuration of a round measured back to back, the rounds interleaved.

    .venv/bin/python bench/tp_vs_dllama.py --dll DLL_DIR --models DIR [--rounds 2] [--out FILE]

DLL_DIR is what ``../shared/peers/build_dllama.sh DLL_DIR DIR/NAME NAME`` built for NAME in
``small`` (random Llama h512, 8 layers, 8/4 heads, i1536, vocab 8000) and ``big`` (h1024, 12
layers, 16/4 heads, i2816, vocab 1000); DIR/NAME are those checkpoints (``planner.synthetic``'s
``write_random_llama`` and a tokenizer; ``--make-models`` writes them).

edgellm: rank 0 in this process (``bench/planner_check.py``'s cluster: the Executor, as a served
step runs it, no HTTP), the other ranks real worker processes on loopback, 1 thread each (2 at
one rank); greedy decode of 64 tokens after a 4-token prompt, median tok/s of 3 runs after a
warm-up. distributed-llama: ``measure_dllama.py`` (its own timer, which leaves out sampling and
I/O), median of 3 runs. int8 (edgellm, per-channel weights, fp32 sync) and int8_q8 (the same
with int8 sync, blocks of 32) are set against Q40 weights with Q80 sync. This machine is shared: compare the ratios of one round.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner_check import cluster, decode_round  # noqa: E402
from report import emit  # noqa: E402

from worker.comm import lane as lanes  # noqa: E402

log = logging.getLogger("bench.tp_vs_dllama")
# ../shared/peers beside the checkout (or beside the folder of worktrees it is in); EDGELLM_PEERS
# elsewhere (bench/compare_revisions.py's temporary checkouts)
_REPO = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("EDGELLM_PEERS") or next(
    (p for p in (_REPO.parent / "shared" / "peers", _REPO.parent.parent / "shared" / "peers") if p.is_dir()),
    _REPO.parent / "shared" / "peers"))
SHAPES = {
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1536, vocab_size=8000, max_position_embeddings=1024),
    "big": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                intermediate_size=2816, vocab_size=1000, max_position_embeddings=1024),
}
# (name, model, ranks, weights): weights "fp32", "int8" (fp32 sync) or "int8_q8" (int8 weights and
# int8 sync, as distributed-llama's Q80); distributed-llama: f32, or q40 weights with q80 sync
CONFIGS = [("small_fp32_2", "small", 2, "fp32"), ("big_fp32_2", "big", 2, "fp32"),
           ("small_int8_2", "small", 2, "int8"), ("small_int8_q8_2", "small", 2, "int8_q8"),
           ("small_fp32_4", "small", 4, "fp32"), ("small_fp32_1", "small", 1, "fp32")]
PROMPT, TOKENS, RUNS = 4, 64, 3


def make_models(root: Path) -> None:
    """The two random checkpoints with a tokenizer distributed-llama's converter reads."""
    import json

    from planner.synthetic import write_random_llama
    from tests.tiny_models import build_tokenizer

    for name, shape in SHAPES.items():
        out = write_random_llama(root / name, shape)
        build_tokenizer(out)
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class name its converter knows
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def set_lanes(on: bool, spin: str | None = None) -> None:
    """Lanes on or off, and the lanes' spin (None: their default), for this process and the
    worker processes it spawns from now on."""
    os.environ[lanes.DISABLE_ENV] = "1" if on else "0"
    if spin is None:
        os.environ.pop(lanes.SPIN_ENV, None)
    else:
        os.environ[lanes.SPIN_ENV] = spin
    lanes._library.clear()


def edgellm(model_dir: Path, ranks: int, weights: str, cache: Path) -> float:
    model = model_dir
    if weights.startswith("int8"):
        from server.quantized_cache import quantized_shards
        from worker.kernels.quant import QuantSpec

        model = quantized_shards(model_dir, [1.0] * ranks, QuantSpec(bits=8), torch.float32, cache)
    sync = "int8" if weights == "int8_q8" else "fp32"
    with cluster(model, ranks, 2 if ranks == 1 else 1, PROMPT + TOKENS + 8, sync) as (executor, _):
        decode_round(executor, PROMPT, TOKENS)
        return statistics.median(decode_round(executor, PROMPT, TOKENS)[0] for _ in range(RUNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dll", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--make-models", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated config names (default: all)")
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.make_models:
        make_models(args.models)
    os.environ["DLL"] = str(args.dll)
    sys.path.insert(0, str(PEERS))
    dll = importlib.import_module("measure_dllama")
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only.split(",")]
    cache = args.models / "cache"
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        row: dict[str, Any] = {}
        for name, model, ranks, weights in configs:
            result: dict[str, float] = {}
            systems = ["lanes", "lanes_spin0", "zeromq", "dllama"] if ranks > 1 else ["lanes", "dllama"]
            for system in systems if r % 2 == 0 else systems[::-1]:
                if system == "dllama":
                    rate = dll.dllama(model, ranks, "f32" if weights == "fp32" else "q40", reps=RUNS)
                else:
                    set_lanes(system != "zeromq", "0" if system == "lanes_spin0" else None)
                    rate = edgellm(args.models / model, ranks, weights, cache)
                result[system] = round(rate, 1)
                log.warning("round %d %s %s: %.1f tok/s", r, name, system, rate)
            for system in ("lanes", "lanes_spin0", "zeromq"):
                if system in result:
                    result[f"{system}_vs_dllama"] = round(result[system] / result["dllama"], 2)
            if "zeromq" in result:
                result["lanes_vs_zeromq"] = round(result["lanes"] / result["zeromq"], 2)
            result["loadavg"] = round(os.getloadavg()[0], 2)
            row[name] = result
        rounds.append(row)
    set_lanes(True)
    summary = {name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
               for name in rounds[0]}
    emit({"machine": {"cores": os.cpu_count()}, "tokens": TOKENS, "runs": RUNS, "rounds": rounds,
          "median_over_rounds": summary}, args.out)


if __name__ == "__main__":
    main()
