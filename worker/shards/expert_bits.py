"""Per-expert bit widths for ``edgellm shard --expert-bits auto`` (EdgeMoE's bitwidth-adaptive
experts): the experts that matter most are stored in int8, the others in int4, within a byte
budget for the routed experts.

How much an expert matters is the error its int4 copy would add, weighted by how often the
router sends tokens to it: ``importance = frequency * (error_int4 - error_int8)``, with the error
of a matrix the relative Frobenius norm of (dequantized - original), summed over the expert's
matrices. Frequencies come from a calibration text run through the checkpoint (``--expert-
calibration``); without one, every expert counts the same and the weights' error alone decides.
Every expert starts in int4; the most important are raised to int8 while the budget allows.

Errors are measured through ``worker.kernels.quant``'s own ``quantize_block`` and ``QuantWeight.dequantize``
(whatever their byte layout), on the whole expert (one rank's slices of it get the same width).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from worker.kernels.quant import QUANTIZED_FIELDS, QuantWeight, field, quantize_block
from worker.shards.checkpoint import Checkpoint
from worker.shards.sharding import plan_shards
from worker.shards.weights import slice_layer

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (layer, expert)
AUTO_BITS = (4, 8)


def quantized_bytes(fields: dict[str, torch.Tensor], bits: int, group_size: int) -> tuple[int, float]:
    """(bytes, relative error) of an expert's fields quantized to ``bits``."""
    out = quantize_block("expert", fields, bits, group_size, torch.float32)
    nbytes = sum(t.numel() * t.element_size() for t in out.values())
    error = 0.0
    for name, w in fields.items():
        if name in QUANTIZED_FIELDS:
            q = field(out, name)
            assert isinstance(q, QuantWeight)
            error += float((q.dequantize() - w.float()).norm() / w.float().norm().clamp(min=1e-12))
    return nbytes, error


def measure_experts(model_dir: str, group_size: int,
                    progress: Callable[[int, int], None] | None = None) -> dict[Key, dict[int, tuple[int, float]]]:
    """Per expert and width in ``AUTO_BITS``: (bytes of the whole expert, its relative error); the
    float32 bytes under width 32 (error 0)."""
    out: dict[Key, dict[int, tuple[int, float]]] = {}
    with Checkpoint(model_dir) as ckpt:
        cfg = ckpt.config
        whole = plan_shards(cfg, [1.0])[0]
        for layer in range(cfg.num_layers):
            for block, fields in slice_layer(ckpt, whole, layer, torch.float32).items():
                parts = block.split(".")
                if len(parts) < 4 or parts[2] != "experts":
                    continue
                key = (layer, int(parts[3]))
                out[key] = {bits: quantized_bytes(fields, bits, group_size) for bits in AUTO_BITS}
                out[key][32] = (sum(t.numel() * t.element_size() for t in fields.values()), 0.0)
            if progress:
                progress(layer + 1, cfg.num_layers)
    return out


def plan_expert_bits(measured: dict[Key, dict[int, tuple[int, float]]], budget: int,
                     frequency: dict[Key, float] | None = None) -> dict[Key, int]:
    """A width per expert, int4 for all but the most important (int8) within ``budget`` bytes.
    Raises ValueError when even int4 everywhere does not fit."""
    bits = dict.fromkeys(measured, 4)
    used = sum(m[4][0] for m in measured.values())
    if used > budget:
        raise ValueError(f"--expert-budget {budget} bytes is below the experts' size in int4 ({used} bytes)")
    weight = frequency or {}

    def importance(key: Key) -> float:
        return weight.get(key, 1.0) * (measured[key][4][1] - measured[key][8][1])

    for key in sorted(measured, key=importance, reverse=True):
        extra = measured[key][8][0] - measured[key][4][0]
        if used + extra <= budget:
            bits[key] = 8
            used += extra
    log.info("expert bits: %d of %d experts in int8, %d bytes of a %d-byte budget",
             sum(b == 8 for b in bits.values()), len(bits), used, budget)
    return bits


def parse_budget(text: str, float_bytes: int) -> int:
    """``--expert-budget``: a share of the experts' float32 bytes (``25%``) or a size (``30MB``)."""
    from worker.memory.budget import parse_size

    text = text.strip()
    if text.endswith("%"):
        return int(float(text[:-1]) / 100 * float_bytes)
    return parse_size(text)


def router_frequency(model_dir: str, text: str, max_tokens: int = 2048) -> dict[Key, float]:
    """How often each expert is among a token's top-k on ``text``, per layer (transformers' model
    on CPU, loaded whole: for checkpoints that fit in memory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    limit = min(max_tokens, getattr(model.config, "max_position_embeddings", max_tokens))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :limit]  # (1, T)
    with torch.inference_mode():
        logits = model(input_ids=ids, output_router_logits=True).router_logits  # per MoE layer (T, E)
    top_k = model.config.num_experts_per_tok
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    out: dict[Key, float] = {}
    for layer, layer_logits in zip(moe_layers, logits, strict=True):
        chosen = layer_logits.topk(top_k, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=layer_logits.shape[-1]).float() / chosen.numel()
        out.update({(layer, e): float(c) for e, c in enumerate(counts)})
    return out
