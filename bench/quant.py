"""Quantized shards (int8, int4 per group) and bf16 against fp32: error and decode speed, as JSON.

    .venv/bin/python bench/quant.py [--tokens 8] [--small-tokens 64] [--agree-tokens 200] [--shapes small,1.1b]
                                    [--big-layers 22] [--repeats 1] [--out FILE]

Error, on the embedded trained model (server/default_model, so greedy text means something)
and on the random 512-wide Llama: each variant is fed the fp32 greedy tokens (prompt, then
``--agree-tokens`` decode steps one token at a time) and compared with fp32 at every position:
the largest |logit difference|, and how often its top token is fp32's (``top1_agreement``).
``greedy_prefix`` is how many of the ``--agree-tokens + 1`` tokens a free-running greedy decode of
the variant matches fp32's before the first difference. The random model's logits are nearly
flat (std-0.02 weights: a range of about 2), so its top-1 figures only show how close ties
are; the trained model's are the meaningful ones.

Quantized variants hold the LM head in int8 (``edgellm shard``'s default); ``int8_float_head``
is int8 with the LM head left in fp32 (``--lm-head float``), to show what the head costs.

Speed: decode tokens/s at batch 1 on one rank (bench/decode_and_allreduce.py's driver) for
fp32, bf16, int8 (with and without the int8 head) and int4, beside transformers ``generate`` in fp32 on the same random
checkpoint in the same run, for the 512-wide shape and the "1.1B" shape (TinyLlama's). This
machine is noisy and shared: compare ratios within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_and_allreduce import SHAPE, bench_ours, bench_transformers, build_model  # noqa: E402
from report import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from server.tokenizer import TextTokenizer  # noqa: E402
from worker.comm.collective import StarHub  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.kernels.quant import QuantSpec  # noqa: E402
from worker.rank.executor import Executor  # noqa: E402
from worker.rank.runtime import RankSpec  # noqa: E402
from worker.rank.step import SeqSpan  # noqa: E402
from worker.shards.shard_writer import write_shards  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402

log = logging.getLogger("bench.quant")

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "server" / "default_model"
BIG_SHAPE: dict[str, Any] = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                 num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                                 max_position_embeddings=2048)
# name -> (shard dtype, compute dtype, quantization)
VARIANTS: dict[str, tuple[torch.dtype, torch.dtype, QuantSpec | None]] = {
    "fp32": (torch.float32, torch.float32, None),
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "int8": (torch.float32, torch.float32, QuantSpec(8)),  # LM head in int8 too (the default)
    "int8_float_head": (torch.float32, torch.float32, QuantSpec(8, lm_head_bits=None)),
    "int4_g32": (torch.float32, torch.float32, QuantSpec(4, 32)),
    "int4_g64": (torch.float32, torch.float32, QuantSpec(4, 64)),
    "int4_g128": (torch.float32, torch.float32, QuantSpec(4, 128)),
}
SPEED_VARIANTS = ("fp32", "bf16", "int8", "int8_float_head", "int4_g64")
STORY = "Once upon a time, there was a little girl who"
RANDOM_PROMPT = [1, 450, 996, 354, 1701, 432, 204, 975, 278, 366, 203, 889]  # ids < every vocab here


def _shard(model_dir: Path, out: Path, variant: str) -> Path:
    """A one-rank shard of ``model_dir`` for ``variant`` (fp32 reads the checkpoint itself)."""
    shard_dtype, _, quant = VARIANTS[variant]
    if variant == "fp32":
        return model_dir
    if not (out / variant).exists():
        shards = plan_shards(ModelConfig.from_dir(model_dir), [1.0])
        write_shards(model_dir, shards, out / variant, shard_dtype, progress=False, quant=quant)
    return out / variant


def _executor(model_dir: Path, dtype: torch.dtype, context: int) -> Executor:
    config = ModelConfig.from_dir(model_dir)
    spec = RankSpec(str(model_dir), config, plan_shards(config, [1.0])[0], max_batch=1, max_context=context,
                    dtype=dtype)
    return Executor(spec, StarHub(1))


def _decode(executor: Executor, prompt: list[int], steps: int,
            forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy decode (or feed ``forced`` tokens): the tokens chosen and every position's logits."""
    logits = executor.step([prompt], [SeqSpan(0, 0, len(prompt))], all_logits=True)  # (P, V)
    rows = [logits]
    chosen = [int(logits[-1].argmax())]
    for i in range(steps):
        token = forced[i] if forced is not None else chosen[-1]
        row = executor.step([[token]], [SeqSpan(0, len(prompt) + i, 1)])  # (1, V)
        rows.append(row)
        chosen.append(int(row[0].argmax()))
    return chosen, torch.cat(rows)


def measure_error(model_dir: Path, work: Path, prompt: list[int], steps: int) -> dict[str, Any]:
    """Each variant against fp32 on the fp32 greedy path (see the module docstring)."""
    context = len(prompt) + steps + 1
    reference = _executor(model_dir, torch.float32, context)
    ref_tokens, ref_logits = _decode(reference, prompt, steps)
    reference.close()
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        if variant == "fp32":
            continue
        directory = _shard(model_dir, work, variant)
        executor = _executor(directory, VARIANTS[variant][1], context)
        _, forced_logits = _decode(executor, prompt, steps, forced=ref_tokens)
        free_tokens, _ = _decode(executor, prompt, steps)  # the KV cache is rewritten from 0
        executor.close()
        prefix = next((i for i, (a, b) in enumerate(zip(free_tokens, ref_tokens, strict=True)) if a != b),
                      len(ref_tokens))
        agree = (forced_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        out[variant] = {"max_abs_logit_diff": round((forced_logits - ref_logits).abs().max().item(), 4),
                        "top1_agreement": round(agree, 4), "greedy_prefix": prefix,
                        "shard_bytes": sum(f.stat().st_size for f in directory.glob("rank-*.safetensors"))}
        log.info("error %s %s: %s", model_dir.name, variant, out[variant])
    out["fp32_logit_range"] = round(ref_logits.abs().max().item(), 3)
    out["positions"] = int(ref_logits.shape[0])
    return out


def measure_speed(model_dir: Path, work: Path, tokens: int, repeats: int) -> dict[str, Any]:
    """Decode tokens/s of each speed variant, and transformers fp32, on the same checkpoint: the
    best of ``repeats`` passes over all of them (other load on the machine only slows a pass)."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        log.info("speed %s: transformers fp32", model_dir.name)
        best["hf"] = max(best.get("hf", 0.0), bench_transformers(model_dir, tokens))
        gc.collect()
        for variant in SPEED_VARIANTS:
            directory = _shard(model_dir, work, variant)
            log.info("speed %s: edgellm %s", model_dir.name, variant)
            best[variant] = max(best.get(variant, 0.0), bench_ours(directory, tokens, VARIANTS[variant][1]))
            gc.collect()
    hf = best.pop("hf")
    return {"tokens": tokens, "repeats": repeats, "transformers_fp32_tok_s": round(hf, 2),
            **{v: {"tok_s": round(t, 2), "vs_transformers_fp32": round(t / hf, 2)} for v, t in best.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8, help="decode steps timed per variant, 1.1b shape")
    parser.add_argument("--small-tokens", type=int, default=64,
                        help="decode steps timed per variant, 512-wide shape (a step takes ~5-15 ms: 8 would be noise)")
    parser.add_argument("--agree-tokens", type=int, default=200, help="decode steps of the error comparison")
    parser.add_argument("--shapes", default="small,1.1b", help="speed shapes: small (512 wide), 1.1b, or both")
    parser.add_argument("--big-layers", type=int, default=BIG_SHAPE["num_hidden_layers"],
                        help="layers of the 1.1b shape (fewer: a faster, smaller run; tok/s scale ~1/layers)")
    parser.add_argument("--repeats", type=int, default=1, help="speed passes; each figure is the best pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    shapes = {s.strip() for s in args.shapes.split(",") if s.strip()}
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "torch": torch.__version__, "threads": args.threads,
                                          "cpu_capability": torch.backends.cpu.get_cpu_capability()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        story = TextTokenizer(DEFAULT_MODEL).encode(STORY)
        result["error_default_model"] = measure_error(DEFAULT_MODEL, work / "default", story, args.agree_tokens)
        small = build_model(work / "small" / "llama", SHAPE)
        result["error_random_512"] = measure_error(small, work / "small", RANDOM_PROMPT, args.agree_tokens)
        if "small" in shapes:
            result["speed_512"] = {"shape": SHAPE, **measure_speed(small, work / "small", args.small_tokens, args.repeats)}
        if "1.1b" in shapes:
            shape = {**BIG_SHAPE, "num_hidden_layers": args.big_layers}
            log.info("building the random %d-layer 1.1b-shape checkpoint", args.big_layers)
            big = build_model(work / "big" / "llama", shape)
            result["speed_1.1b"] = {"shape": shape, **measure_speed(big, work / "big", args.tokens, args.repeats)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
