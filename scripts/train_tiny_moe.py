"""Train a tiny Mixtral (8 experts, top-2) whose routing is learned, for bench/moe_cache.py.

Random routers send tokens to experts almost uniformly and without memory from one token to
the next, which is the worst case for an expert cache and its predictor; a trained router is
skewed and correlated across tokens and layers, like a real checkpoint's. This script gives
the benchmark such a router without downloading anything: a ``transformers``
``MixtralForCausalLM`` trained from scratch on CPU, on the corpus of the default model
(CPython's own docstrings and language-reference topics; ``scripts/train_default_model.py``,
imported, not copied) with the default model's tokenizer (``server/default_model/``), and with
transformers' router load-balancing loss (``output_router_logits=True``,
``router_aux_loss_coef``), as Mixtral itself was trained.

    .venv/bin/python scripts/train_tiny_moe.py [--output bench/results/tiny_moe] [--minutes 9.5]

Seeded and single-threaded (``--threads 1``); training stops after ``--steps`` or
``--minutes``, whichever comes first, so a run on a busy machine stops at a different step.
The float32 checkpoint (about 58 MB) is not committed: ``bench/results/`` is git-ignored.
The router statistics printed at the end (how often each expert is chosen, and how often a
layer reuses the previous token's experts) say whether the routing learned any structure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_default_model import (  # noqa: E402  (scripts/ is not a package)
    DEFAULT_OUTPUT as DEFAULT_MODEL,
)
from train_default_model import (  # noqa: E402
    adamw,
    add_training_arguments,
    evaluate,
    gather_corpus,
    make_texts,
    split_streams,
    train_step,
)

log = logging.getLogger("train_tiny_moe")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "tiny_moe"


@torch.no_grad()
def routing_stats(model: MixtralForCausalLM, stream: torch.Tensor, seq_len: int, top_k: int) -> dict[str, object]:
    """Per layer: the share of tokens routed to each expert, and the share of a token's experts
    that the previous token of the same sequence also used (what a temporal predictor exploits)."""
    model.eval()
    x = torch.stack([stream[i * seq_len: (i + 1) * seq_len] for i in range(4)])  # (4, T)
    logits = model(input_ids=x, output_router_logits=True).router_logits  # per layer (4*T, E)
    model.train()
    load, reuse = [], []
    for layer_logits in logits:
        chosen = layer_logits.topk(top_k, dim=-1).indices.view(x.shape[0], seq_len, top_k)  # (4, T, k)
        counts = torch.bincount(chosen.flatten(), minlength=layer_logits.shape[-1]).float()
        load.append([round(c, 3) for c in (counts / counts.sum()).tolist()])
        same = (chosen[:, 1:, :, None] == chosen[:, :-1, None, :]).any(-1).float()  # (4, T-1, k)
        reuse.append(round(same.mean().item(), 3))
    return {"expert_share": load, "reuse_of_previous_token": reuse}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--minutes", type=float, default=9.5, help="stop training after this long (wall clock)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-width", type=int, default=512, help="intermediate size of one expert")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--aux-loss", type=float, default=0.02, help="router_aux_loss_coef (Mixtral's: 0.02)")
    add_training_arguments(parser)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.monotonic()

    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    documents, chats = gather_corpus(rng, args.chat_fraction)
    texts = make_texts(documents, chats, tokenizer)
    rng.shuffle(texts)
    train_stream, val_stream = split_streams(texts, tokenizer)
    log.info("train tokens: %d, validation tokens: %d (%.1fs)", len(train_stream), len(val_stream),
             time.monotonic() - t0)

    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.expert_width,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, output_router_logits=True,
        router_aux_loss_coef=args.aux_loss, rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_cache=True)
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)

    optimizer = adamw(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    deadline = time.monotonic() + 60 * args.minutes
    model.train()
    t_train = time.monotonic()
    running = None
    steps = 0
    for step in range(args.steps):
        out = train_step(model, optimizer, train_stream, args, step, warmup, gen)  # loss includes the aux loss
        steps = step + 1
        running = out.loss.item() if running is None else 0.95 * running + 0.05 * out.loss.item()
        if step % 25 == 0:
            log.info("step %d loss %.3f (smoothed %.3f) aux %.3f lr %.2e elapsed %.0fs", steps, out.loss.item(),
                     running, out.aux_loss.item(), optimizer.param_groups[0]["lr"], time.monotonic() - t_train)
        if time.monotonic() > deadline:
            log.info("time limit reached after %d steps", steps)
            break
    train_seconds = time.monotonic() - t_train
    model.config.output_router_logits = False  # the validation loss is the LM loss alone; saved this way too
    val_loss = evaluate(model, val_stream, args.seq_len, batches=8, batch_size=args.batch_size)  # type: ignore[arg-type]
    log.info("validation loss %.3f (perplexity %.1f)", val_loss, math.exp(val_loss))

    out_dir: Path = args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    stats = {"parameters": n_params, "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "final_train_loss_smoothed": round(running or float("nan"), 4), "validation_loss": round(val_loss, 4),
             "train_seconds": round(train_seconds, 1), "routing": routing_stats(model, val_stream, args.seq_len,
                                                                                args.top_k)}
    (out_dir / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("training stats: %s", json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
