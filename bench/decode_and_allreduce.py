"""Decode speed against transformers, and star-allreduce latency against gloo, as JSON
(the allreduce part is bench/allreduce.py's, at one size; that script has every size, the
sync dtypes and a ring). The allreduce is timed once, then in three more back-to-back pairs of
star and gloo whose median ratio (``p50_ratio_paired_median``) is the one a busy moment of the
machine moves least.

    .venv/bin/python bench/decode_and_allreduce.py [--tokens 64] [--iters 300] [--out FILE]

Every number is measured in this one run (this machine is noisy: compare ratios, not
absolute figures across runs).
"""

from __future__ import annotations

import argparse
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

from allreduce import compare  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from report import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from worker.comm.collective import StarHub  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.rank.executor import Executor  # noqa: E402
from worker.rank.runtime import RankSpec  # noqa: E402
from worker.rank.step import SeqSpan  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402

log = logging.getLogger("bench")

SHAPE: dict[str, Any] = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1536, vocab_size=8000, max_position_embeddings=1024)
PROMPT_LEN = 16


def build_model(out: Path, shape: dict[str, Any] | None = None) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**(shape or SHAPE), tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def bench_transformers(model_dir: Path, tokens: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = torch.arange(1, PROMPT_LEN + 1)[None]
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        assert out.shape[1] == PROMPT_LEN + n
        return time.perf_counter() - start

    timed(4)  # warm-up
    prefill = min(timed(1) for _ in range(3))
    full = min(timed(tokens + 1) for _ in range(2))
    return tokens / (full - prefill)


def bench_ours(model_dir: Path, tokens: int, dtype: torch.dtype = torch.float32) -> float:
    config = ModelConfig.from_dir(model_dir)
    shard = plan_shards(config, [1.0])[0]
    executor = Executor(RankSpec(str(model_dir), config, shard, max_batch=1, max_context=1024, dtype=dtype),
                        StarHub(1))
    prompt = list(range(1, PROMPT_LEN + 1))
    best = 0.0
    for _ in range(3):  # first round warms up; keep the best
        logits = executor.step([prompt], [SeqSpan(0, 0, PROMPT_LEN)])
        start = time.perf_counter()
        for i in range(tokens):
            token = int(logits[0].argmax())
            logits = executor.step([[token]], [SeqSpan(0, PROMPT_LEN + i, 1)])
        best = max(best, tokens / (time.perf_counter() - start))
    executor.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    parser.add_argument("--iters", type=int, default=300, help="allreduce iterations per configuration")
    parser.add_argument("--numel", type=int, default=4096, help="floats per allreduce (a multiple of 256)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, choices=range(2, 10), metavar="{2..9}",
                        help="back-to-back star/gloo pairs after the first timing, whose median ratio is reported "
                             "(default: 3)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    torch.set_num_threads(args.threads)

    result: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                             "torch": torch.__version__, "threads": args.threads}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "llama")
        log.info("decode: transformers")
        hf = bench_transformers(model_dir, args.tokens)
        log.info("decode: edgellm, 1 rank")
        ours = bench_ours(model_dir, args.tokens)
    result["decode_batch1_fp32"] = {"shape": SHAPE, "tokens": args.tokens,
                                    "transformers_tok_s": round(hf, 1), "edgellm_1rank_tok_s": round(ours, 1),
                                    "ratio": round(ours / hf, 2)}
    allreduce = {}
    kb = max(1, args.numel // 256)  # bench/allreduce.py sizes payloads in KB of float32
    for world in (2, 4):
        both = compare(world, [kb], ["fp32"], args.iters, seconds=30.0, methods=("star", "gloo"),
                       rounds=args.rounds)
        star, gloo = both["star_fp32"][str(kb)], both["gloo"][str(kb)]
        paired = both["star_fp32_vs_gloo_paired"]
        allreduce[f"{world}_ranks"] = {"star": star, "gloo": gloo,
                                       "p50_ratio_star_over_gloo": round(star["p50_us"] / gloo["p50_us"], 2),
                                       "p50_ratio_paired_rounds": [r["ratio"][str(kb)] for r in paired["rounds"]],
                                       "p50_ratio_paired_median": paired["median_ratio"][str(kb)]}
        if "star_two_hop_fp32" in both:  # 2 ranks: the star is the exchange; the two-hop star for comparison
            allreduce[f"{world}_ranks"]["star_two_hop"] = both["star_two_hop_fp32"][str(kb)]
    result["allreduce_fp32"] = {"numel": kb * 256, **allreduce}
    emit(result, args.out)


if __name__ == "__main__":
    main()
