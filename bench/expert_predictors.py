"""Recall of each expert predictor, per layer, offline: no disk, no timing, as JSON.

    .venv/bin/python bench/expert_predictors.py [--model DIR] [--tokens 100] [--prompts 6] [--out FILE]

``bench/moe_cache.py`` measures the predictors inside the running rank, against a cold disk,
where late reads and a small cache blur what each guess is worth. This scores the guesses
alone, in seconds: an MoE checkpoint (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, dense layers between MoE
ones included; checked on tiny random ones) runs in transformers over real text (module docstrings of the standard
library, as in bench/moe_cache.py), 16 prompt tokens then ``--tokens`` teacher-forced positions. Its hidden
states are replayed into ``worker.models.moe.Predictor`` in the order a rank calls it
(``predict`` a block ahead while the layer before routes, ``predict_at_input`` when the layer
starts, ``observe`` when it routes), and every decode step's guesses for each layer are scored
against the experts the layer routes to (``worker.models.moe.route``, as the rank routes).

Without ``--model``, the random Mixtral of bench/moe_cache.py (same seed and shape), whose
routers have no structure. A trained one is what the predictors are for; nothing is downloaded,
so train it here (about 9 minutes on 2 cores, not committed):

    .venv/bin/python scripts/train_tiny_moe.py --layers 8 --output bench/results/tiny_moe_8l
    .venv/bin/python bench/expert_predictors.py --model bench/results/tiny_moe_8l

recall = guessed experts the layer used / experts it used; precision = guessed experts it used /
experts guessed; ``guessed_per_layer_step`` is how many experts a layer step reads ahead
(top-k is the budget of a one-source guess; ``union`` and unsure ``adaptive`` layers read more).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_cache import PROMPT_TOKENS, SHAPE, TOKENIZER, texts  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from report import emit  # noqa: E402

from worker.models.llama import rms_norm  # noqa: E402
from worker.models.moe import PREDICTORS, Predictor, route  # noqa: E402

log = logging.getLogger("bench.expert_predictors")


def hidden_states(model: Any, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per decoder layer: its input (T, d) and its residual stream after attention (T, d), the
    hidden state its MoE block routes (before the MLP norm)."""
    inputs: dict[int, torch.Tensor] = {}
    mids: dict[int, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda _m, args, kwargs, i=index: inputs.__setitem__(
                i, (args[0] if args else kwargs["hidden_states"]).detach().reshape(len(ids), -1)),
            with_kwargs=True))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, args, i=index: mids.__setitem__(i, args[0].detach().reshape(len(ids), -1))))
    try:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    count = len(model.model.layers)
    return [inputs[i] for i in range(count)], [mids[i] for i in range(count)]


def is_routed(layer: Any) -> bool:
    """Whether a transformers decoder layer is an MoE block with a router (``mlp.gate.weight``)."""
    return hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "weight")


def score(model: Any, sequences: list[list[int]], mode: str) -> dict[str, Any]:
    """Replay every sequence through a fresh ``Predictor`` in ``mode``; tallies per layer."""
    cfg = model.config
    layers = model.model.layers
    moe = [i for i, layer in enumerate(layers) if is_routed(layer)]  # dense layers in between are skipped
    routers = {i: layers[i].mlp.gate.weight.detach() for i in moe}
    norms = {i: layers[i].post_attention_layernorm.weight.detach() for i in moe}
    eps, top_k = cfg.rms_norm_eps, cfg.num_experts_per_tok
    tally = {i: [0, 0, 0] for i in routers}  # layer -> [guessed and used, used, guessed]
    steps = 0
    for ids in sequences:
        inputs, mids = hidden_states(model, ids)
        predictor = Predictor(routers, norms, eps, top_k, mode)
        ahead: dict[int, set[int]] = {}  # layer -> experts guessed for its coming step
        # the prompt as one step, then one step per position; only decode steps are scored
        for rows in [slice(0, PROMPT_TOKENS), *(slice(t, t + 1) for t in range(PROMPT_TOKENS, len(ids)))]:
            decode = rows.start >= PROMPT_TOKENS
            steps += decode
            for layer in routers:
                guessed = ahead.pop(layer, set()) | predictor.predict_at_input(layer, inputs[layer][rows])
                x = rms_norm(mids[layer][rows], norms[layer], eps)  # (T, d), as the rank norms it
                _, experts = route(x, routers[layer], top_k, renormalize=False)  # (T, k) expert ids
                used = set(experts.unique().tolist())
                if decode:
                    tally[layer][0] += len(guessed & used)
                    tally[layer][1] += len(used)
                    tally[layer][2] += len(guessed)
                predictor.observe(layer, used)
                following = predictor.next_layer(layer)
                if following is not None:
                    ahead[following] = predictor.predict(following, mids[layer][rows])
    hits, needed, named = (sum(t[i] for t in tally.values()) for i in range(3))
    return {"recall": round(hits / needed, 3), "precision": round(hits / named, 3) if named else 0.0,
            "guessed_per_layer_step": round(named / (steps * len(tally)), 2),
            "recall_by_layer": {str(i): round(t[0] / t[1], 3) for i, t in tally.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="an HF MoE checkpoint dir, every layer routed (default: bench/moe_cache.py's random Mixtral)")
    parser.add_argument("--tokens", type=int, default=100, help="teacher-forced decode positions per prompt")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import transformers

    if args.model is None:
        torch.manual_seed(0)  # bench/moe_cache.py's random Mixtral
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE)).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
    if not any(is_routed(layer) for layer in model.model.layers):
        raise SystemExit(f"{args.model}: no layer is an MoE block with a router (mlp.gate.weight)")
    sequences = texts(args.model or TOKENIZER, args.prompts, args.tokens)
    result = {"model": str(args.model or "random"), "layers": len(model.model.layers),
              "moe_layers": [i for i, layer in enumerate(model.model.layers) if is_routed(layer)],
              "experts": getattr(model.config, "num_local_experts", None) or model.config.num_experts,
              "top_k": model.config.num_experts_per_tok,
              "decode_positions": sum(len(s) - PROMPT_TOKENS for s in sequences),
              "predictors": {mode: score(model, sequences, mode) for mode in PREDICTORS}}
    emit(result, args.out)


if __name__ == "__main__":
    main()
