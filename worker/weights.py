"""A rank's weights: sliced from a checkpoint on the fly or read from a shard file.

Both paths produce the same flat ``{name: tensor}`` per layer, with q/k/v fused into one
column-parallel matrix and gate/up into another, so compute does one matmul each.
Row-parallel biases (o_proj, down_proj) are kept on rank 0 only: the allreduce then adds
them exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from worker.checkpoint import Checkpoint
from worker.config import CheckpointError
from worker.sharding import RankShard

SHARD_MANIFEST = "edgellm_shards.json"
HUB_FILE = "hub.safetensors"
SHARD_FORMAT = 1
# Files copied next to the shards so a shard directory is also a servable model directory.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "special_tokens_map.json")


@dataclass
class LayerWeights:
    """One rank's slice of one decoder layer (shapes for ``qh`` q heads, ``kh`` kv heads, ``w`` mlp cols)."""

    attn_norm: torch.Tensor  # (d,)
    wqkv: torch.Tensor  # ((qh + 2*kh) * hd, d)
    bqkv: torch.Tensor | None  # ((qh + 2*kh) * hd,)
    wo: torch.Tensor  # (d, qh * hd)
    bo: torch.Tensor | None  # (d,) on rank 0 only
    mlp_norm: torch.Tensor  # (d,)
    w_gate_up: torch.Tensor  # (2 * w, d)
    b_gate_up: torch.Tensor | None  # (2 * w,)
    w_down: torch.Tensor  # (d, w)
    b_down: torch.Tensor | None  # (d,) on rank 0 only

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if t is not None)

    def to_flat(self, layer: int) -> dict[str, torch.Tensor]:
        return {f"layers.{layer}.{k}": v.contiguous() for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor], layer: int) -> LayerWeights:
        prefix = f"layers.{layer}."
        fields = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        return cls(**{name: fields.get(name) for name in cls.__dataclass_fields__})  # type: ignore[arg-type]


@dataclass
class HubWeights:
    """What the hub keeps beyond rank 0's shard: embedding, final norm, LM head."""

    embed: torch.Tensor  # (V, d)
    norm: torch.Tensor  # (d,)
    lm_head: torch.Tensor  # (V, d); the same storage as embed when tied


def _hf(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def slice_layer(ckpt: Checkpoint, shard: RankShard, layer: int, dtype: torch.dtype) -> LayerWeights:
    """Read this rank's part of ``layer`` from a Hugging Face checkpoint."""
    cfg = ckpt.config
    hd = cfg.head_dim
    q0, q1 = (h * hd for h in shard.q_heads)
    k0, k1 = (h * hd for h in shard.kv_heads)
    c0, c1 = shard.mlp_columns
    attn = lambda n: _hf(layer, f"self_attn.{n}")  # noqa: E731
    mlp = lambda n: _hf(layer, f"mlp.{n}")  # noqa: E731

    def rows(name: str, a: int, b: int) -> torch.Tensor:
        return ckpt.get_rows(name, a, b).to(dtype)

    wqkv = torch.cat([rows(attn("q_proj.weight"), q0, q1), rows(attn("k_proj.weight"), k0, k1),
                      rows(attn("v_proj.weight"), k0, k1)])
    bqkv = None
    if cfg.attention_bias:
        bqkv = torch.cat([rows(attn("q_proj.bias"), q0, q1), rows(attn("k_proj.bias"), k0, k1),
                          rows(attn("v_proj.bias"), k0, k1)])
    w_gate_up = torch.cat([rows(mlp("gate_proj.weight"), c0, c1), rows(mlp("up_proj.weight"), c0, c1)])
    b_gate_up = None
    if cfg.mlp_bias:
        b_gate_up = torch.cat([rows(mlp("gate_proj.bias"), c0, c1), rows(mlp("up_proj.bias"), c0, c1)])
    lead = shard.rank == 0
    return LayerWeights(
        attn_norm=ckpt.get(_hf(layer, "input_layernorm.weight")).to(dtype),
        wqkv=wqkv,
        bqkv=bqkv,
        wo=ckpt.get_columns(attn("o_proj.weight"), q0, q1).to(dtype).contiguous(),
        bo=ckpt.get(attn("o_proj.bias")).to(dtype) if cfg.o_bias and lead else None,
        mlp_norm=ckpt.get(_hf(layer, "post_attention_layernorm.weight")).to(dtype),
        w_gate_up=w_gate_up,
        b_gate_up=b_gate_up,
        w_down=ckpt.get_columns(mlp("down_proj.weight"), c0, c1).to(dtype).contiguous(),
        b_down=ckpt.get(mlp("down_proj.bias")).to(dtype) if cfg.mlp_bias and lead else None,
    )


def load_hub_weights(ckpt: Checkpoint, dtype: torch.dtype) -> HubWeights:
    embed = ckpt.get("model.embed_tokens.weight").to(dtype)
    if ckpt.config.tie_word_embeddings or not ckpt.has("lm_head.weight"):
        lm_head = embed
    else:
        lm_head = ckpt.get("lm_head.weight").to(dtype)
    return HubWeights(embed=embed, norm=ckpt.get("model.norm.weight").to(dtype), lm_head=lm_head)


def shard_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:02d}-of-{world_size:02d}.safetensors"


def is_shard_dir(model_dir: str | Path) -> bool:
    return (Path(model_dir) / SHARD_MANIFEST).is_file()


def read_manifest(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / SHARD_MANIFEST).read_text())


def iter_rank_layers(model_dir: str | Path, shard: RankShard, num_layers: int,
                     dtype: torch.dtype) -> Iterator[LayerWeights]:
    """Yield this rank's layers, from a shard file when ``model_dir`` is a shard directory,
    else sliced from the Hugging Face checkpoint."""
    if is_shard_dir(model_dir):
        path = Path(model_dir) / shard_file_name(shard.rank, shard.world_size)
        if not path.is_file():
            raise CheckpointError(f"{path}: shard file missing")
        with safe_open(str(path), framework="pt") as f:
            stored = RankShard.from_dict(json.loads(f.metadata()["shard"]))
            if stored != shard:
                raise CheckpointError(f"{path} holds {stored}, but this rank needs {shard}; re-run `edgellm shard`")
            for layer in range(num_layers):
                prefix = f"layers.{layer}."
                flat = {k: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
                yield LayerWeights.from_flat(flat, layer)
        return
    with Checkpoint(model_dir) as ckpt:
        for layer in range(num_layers):
            yield slice_layer(ckpt, shard, layer, dtype)


def load_hub(model_dir: str | Path, dtype: torch.dtype) -> HubWeights:
    if is_shard_dir(model_dir):
        with safe_open(str(Path(model_dir) / HUB_FILE), framework="pt") as f:
            embed = f.get_tensor("embed").to(dtype)
            lm_head = f.get_tensor("lm_head").to(dtype) if "lm_head" in f.keys() else embed  # noqa: SIM118
            return HubWeights(embed=embed, norm=f.get_tensor("norm").to(dtype), lm_head=lm_head)
    with Checkpoint(model_dir) as ckpt:
        return load_hub_weights(ckpt, dtype)
