"""A rank's weights: sliced from a checkpoint on the fly or read from a shard file.

Both paths produce the same blocks per layer (``layers.L.attn``, ``layers.L.mlp`` and, for
MoE, ``layers.L.experts.E``), each a ``{field: tensor}`` dict, with q/k/v fused into one
column-parallel matrix and gate/up into another, so compute does one matmul each. A block is
the unit the weight store loads and releases.
Row-parallel biases (o_proj, down_proj) are kept on rank 0 only: the allreduce then adds
them exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from worker.config import CheckpointError
from worker.kernels.quant import QUANT_FORMAT, QuantWeight, Weight, field
from worker.shards.checkpoint import Checkpoint, open_safetensors
from worker.shards.sharding import RankShard

SHARD_MANIFEST = "edgellm_shards.json"
HUB_FILE = "hub.safetensors"
# 2: blocks (attn, mlp, experts.E) per layer; 3: and each rank's LM head rows (block ``head``),
# the hub file the embedding only
SHARD_FORMAT = 3
HEAD_BLOCK = "head"  # a rank's final norm (d,) and LM head rows (V_r, d): ``head_fields``
# Files copied next to the shards so a shard directory is also a servable model directory.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "special_tokens_map.json")


Fields = dict[str, torch.Tensor]  # one block's tensors by field name
T = TypeVar("T")


@dataclass
class AttentionWeights:
    """One rank's attention block (``qh`` q heads, ``kh`` kv heads of ``hd``)."""

    norm: torch.Tensor  # (d,)
    wqkv: Weight  # ((qh + 2*kh) * hd, d)
    bqkv: torch.Tensor | None  # ((qh + 2*kh) * hd,)
    wo: Weight  # (d, qh * hd)
    bo: torch.Tensor | None  # (d,) on rank 0 only
    q_norm: torch.Tensor | None = None  # (hd,) per head, or this rank's (qh * hd,) of a full q norm
    k_norm: torch.Tensor | None = None  # (hd,) per head, or this rank's (kh * hd,)


@dataclass
class MlpWeights:
    """One rank's dense MLP block (``w`` columns)."""

    norm: torch.Tensor  # (d,)
    w_gate_up: Weight  # (2 * w, d)
    b_gate_up: torch.Tensor | None  # (2 * w,)
    w_down: Weight  # (d, w)
    b_down: torch.Tensor | None  # (d,) on rank 0 only


@dataclass
class MoeWeights:
    """The non-routed part of an MoE block: norm, router (replicated on every rank), shared expert."""

    norm: torch.Tensor  # (d,)
    router: torch.Tensor  # (E, d), the same on every rank
    shared_gate_up: Weight | None = None  # (2 * ws, d)
    shared_down: Weight | None = None  # (d, ws)
    shared_gate: torch.Tensor | None = None  # (1, d), the same on every rank


@dataclass
class ExpertWeights:
    """One rank's columns of one routed expert (``we`` columns)."""

    w_gate_up: Weight  # (2 * we, d)
    w_down: Weight  # (d, we)

    def nbytes(self) -> int:
        return sum(w.nbytes() if isinstance(w, QuantWeight) else w.numel() * w.element_size()
                   for w in (self.w_gate_up, self.w_down))


def from_fields(cls: type[T], fields: Fields) -> T:
    """Build a block dataclass from its tensors; a missing optional field is None, and a
    quantized matrix comes as one ``QuantWeight`` (its tensor and its scales)."""
    try:
        return cls(**{name: field(fields, name) for name in cls.__dataclass_fields__})  # type: ignore[attr-defined]
    except TypeError as exc:
        raise CheckpointError(f"block does not fit {cls.__name__}: {exc}") from None


def attn_block(layer: int) -> str:
    return f"layers.{layer}.attn"


def mlp_block(layer: int) -> str:
    return f"layers.{layer}.mlp"


def expert_block(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def fields_nbytes(fields: Fields) -> int:
    return sum(t.numel() * t.element_size() for t in fields.values())


@dataclass
class HubWeights:
    """What the hub keeps beyond rank 0's shard: the embedding (the LM head is split over the
    ranks, each holding its rows: ``head_fields``)."""

    embed: torch.Tensor  # (V, d)


def _hf(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def _moe_names(architecture: str) -> tuple[str, tuple[str, str, str]]:
    """(router prefix, expert (gate, up, down) names) in the Hugging Face checkpoint."""
    if architecture == "MixtralForCausalLM":
        return "block_sparse_moe", ("w1", "w3", "w2")
    return "mlp", ("gate_proj", "up_proj", "down_proj")


def slice_layer(ckpt: Checkpoint, shard: RankShard, layer: int, dtype: torch.dtype) -> dict[str, Fields]:
    """Read this rank's part of ``layer`` from a Hugging Face checkpoint, as blocks in file order
    (attention, MLP, then each routed expert)."""
    cfg = ckpt.config
    hd = cfg.head_dim
    q0, q1 = (h * hd for h in shard.q_heads)
    k0, k1 = (h * hd for h in shard.kv_heads)
    lead = shard.rank == 0
    attn = lambda n: _hf(layer, f"self_attn.{n}")  # noqa: E731

    def get(name: str) -> torch.Tensor:
        return ckpt.get(name).to(dtype)

    def rows(name: str, a: int, b: int) -> torch.Tensor:
        return ckpt.get_rows(name, a, b).to(dtype)

    def cols(name: str, a: int, b: int) -> torch.Tensor:
        return ckpt.get_columns(name, a, b).to(dtype).contiguous()

    attention: Fields = {
        "norm": get(_hf(layer, "input_layernorm.weight")),
        "wqkv": torch.cat([rows(attn("q_proj.weight"), q0, q1), rows(attn("k_proj.weight"), k0, k1),
                           rows(attn("v_proj.weight"), k0, k1)]),
        "wo": cols(attn("o_proj.weight"), q0, q1),
    }
    if cfg.attention_bias:
        attention["bqkv"] = torch.cat([rows(attn("q_proj.bias"), q0, q1), rows(attn("k_proj.bias"), k0, k1),
                                       rows(attn("v_proj.bias"), k0, k1)])
    if cfg.o_bias and lead:
        attention["bo"] = get(attn("o_proj.bias"))
    if cfg.qk_norm == "head":
        attention["q_norm"], attention["k_norm"] = get(attn("q_norm.weight")), get(attn("k_norm.weight"))
    elif cfg.qk_norm == "full":
        attention["q_norm"] = rows(attn("q_norm.weight"), q0, q1)
        attention["k_norm"] = rows(attn("k_norm.weight"), k0, k1)

    def gated_mlp(prefix: str, names: tuple[str, str, str], columns: tuple[int, int]) -> Fields:
        gate, up, down = (f"{prefix}.{n}.weight" for n in names)
        c0, c1 = columns
        return {"w_gate_up": torch.cat([rows(gate, c0, c1), rows(up, c0, c1)]), "w_down": cols(down, c0, c1)}

    blocks = {attn_block(layer): attention}
    mlp_norm = get(_hf(layer, "post_attention_layernorm.weight"))
    if not cfg.is_moe_layer(layer):
        mlp = {"norm": mlp_norm, **gated_mlp(_hf(layer, "mlp"), ("gate_proj", "up_proj", "down_proj"),
                                             shard.mlp_columns)}
        if cfg.mlp_bias:
            c0, c1 = shard.mlp_columns
            mlp["b_gate_up"] = torch.cat([rows(_hf(layer, "mlp.gate_proj.bias"), c0, c1),
                                          rows(_hf(layer, "mlp.up_proj.bias"), c0, c1)])
            if lead:
                mlp["b_down"] = get(_hf(layer, "mlp.down_proj.bias"))
        blocks[mlp_block(layer)] = mlp
        return blocks
    prefix, names = _moe_names(cfg.architecture)
    moe: Fields = {"norm": mlp_norm, "router": get(_hf(layer, f"{prefix}.gate.weight"))}
    if cfg.shared_expert_intermediate_size:
        shared = gated_mlp(_hf(layer, "mlp.shared_expert"), ("gate_proj", "up_proj", "down_proj"),
                           shard.shared_columns)
        moe |= {"shared_gate_up": shared["w_gate_up"], "shared_down": shared["w_down"],
                "shared_gate": get(_hf(layer, "mlp.shared_expert_gate.weight"))}
    blocks[mlp_block(layer)] = moe
    for e in range(cfg.num_experts):
        blocks[expert_block(layer, e)] = gated_mlp(_hf(layer, f"{prefix}.experts.{e}"), names, shard.expert_columns)
    return blocks


def load_hub_weights(ckpt: Checkpoint, dtype: torch.dtype) -> HubWeights:
    return HubWeights(embed=ckpt.get("model.embed_tokens.weight").to(dtype))


def head_is_tied(ckpt: Checkpoint) -> bool:
    """Whether the LM head is the embedding (tied, or a checkpoint without ``lm_head.weight``)."""
    return ckpt.config.tie_word_embeddings or not ckpt.has("lm_head.weight")


def head_fields(ckpt: Checkpoint, shard: RankShard, dtype: torch.dtype) -> Fields:
    """This rank's ``head`` block: the final norm (d,) and its rows ``shard.vocab_rows`` of the LM
    head (V_r, d), taken from the embedding when the head is tied."""
    name = "model.embed_tokens.weight" if head_is_tied(ckpt) else "lm_head.weight"
    v0, v1 = shard.vocab_rows
    # a copy: safetensors' row slice views the whole tensor's storage, which would stay alive
    rows = ckpt.get_rows(name, v0, v1).to(dtype, copy=True)  # (V_r, d)
    return {"norm": ckpt.get("model.norm.weight").to(dtype), "lm_head": rows}


def shard_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:02d}-of-{world_size:02d}.safetensors"


def is_shard_dir(model_dir: str | Path) -> bool:
    return (Path(model_dir) / SHARD_MANIFEST).is_file()


def read_manifest(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / SHARD_MANIFEST).read_text())


def rank_shard_path(model_dir: str | Path, shard: RankShard) -> Path:
    """This rank's file in a shard directory, checked against the split it must hold."""
    manifest = read_manifest(model_dir)
    check_shard_format(model_dir, manifest)
    check_quant_format(model_dir, manifest)
    path = Path(model_dir) / shard_file_name(shard.rank, shard.world_size)
    if not path.is_file():
        raise CheckpointError(f"{path}: shard file missing")
    with open_safetensors(path) as f:
        stored = RankShard.from_dict(json.loads(f.metadata()["shard"]))
    if stored != shard:
        raise CheckpointError(f"{path} holds {stored}, but this rank needs {shard}; re-run `edgellm shard`")
    return path


def check_shard_format(model_dir: str | Path, manifest: dict) -> None:
    """Refuse a shard directory of another format, naming the command that rewrites it. Format 2
    (no LM head rows in the rank files, the whole head in ``hub.safetensors``) is refused rather
    than served with the head on the coordinator: one code path, and the coordinator never holds
    the whole head."""
    found = manifest.get("format")
    if found == SHARD_FORMAT:
        return
    why = " (its rank files hold no LM head rows: the head is now split over the ranks)" if found == 2 else ""
    raise CheckpointError(f"{model_dir} holds shards of format {found}{why}; this edgellm reads format "
                          f"{SHARD_FORMAT}: rewrite them from the Hugging Face checkpoint with "
                          f"`{shard_command(model_dir, manifest)}`")


def shard_command(model_dir: str | Path, manifest: dict) -> str:
    """The ``edgellm shard`` command that writes ``model_dir`` again, as its manifest describes it."""
    quant = manifest.get("quantize") or {}
    flags = [f"--ranks {manifest.get('world_size', len(manifest.get('shards', [])))}"]
    if quant.get("bits"):
        flags.append(f"--quantize int{quant['bits']}")
    if quant.get("expert_bits"):
        flags.append(f"--expert-bits {quant['expert_bits']}")
    if quant:
        flags.append(f"--group-size {quant.get('group_size', 64)}")
    if quant.get("bits") and not quant.get("lm_head_bits"):
        flags.append("--lm-head float")
    if manifest.get("weights"):
        flags.append("--weights " + ",".join(f"{w:g}" for w in manifest["weights"]))
    if manifest.get("dtype", "float32") != "float32":
        flags.append(f"--dtype {manifest['dtype']}")
    return f"edgellm shard --model CHECKPOINT {' '.join(flags)} --out {model_dir}"


def check_quant_format(model_dir: str | Path, manifest: dict) -> None:
    """Refuse int4 shards in a byte layout this edgellm does not read (format 1 stored torch's AVX2
    order, which computes garbage on other CPUs: ``worker.kernels.quant``), naming the command that
    rewrites them. int8 kept its layout; its shards of any format are read."""
    quant = manifest.get("quantize")
    found = manifest.get("quant_format", 1)
    if not quant or 4 not in (quant.get("bits"), quant.get("expert_bits")) or found == QUANT_FORMAT:
        return
    raise CheckpointError(f"{model_dir} holds int4 shards in an older byte layout (quantization format {found}; "
                          f"this edgellm reads format {QUANT_FORMAT}, the same on every CPU): rewrite them from the "
                          f"Hugging Face checkpoint with `{shard_command(model_dir, manifest)}`")


def load_hub(model_dir: str | Path, dtype: torch.dtype) -> HubWeights:
    if is_shard_dir(model_dir):
        check_shard_format(model_dir, read_manifest(model_dir))
        with open_safetensors(Path(model_dir) / HUB_FILE) as f:
            return HubWeights(embed=f.get_tensor("embed").to(dtype))
    with Checkpoint(model_dir) as ckpt:
        return load_hub_weights(ckpt, dtype)
