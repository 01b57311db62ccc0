"""Model configuration parsed once from a Hugging Face ``config.json``.

Unknown keys are ignored; the invariants the math relies on are checked here so
``forward`` never sees checkpoint quirks (the llama-models habit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES
# Architectures whose q/k/v projections carry a bias whatever "attention_bias" says (and o_proj none).
_QKV_BIAS_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")

# Rope types whose inverse frequencies we know how to compute.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class CheckpointError(ValueError):
    """A checkpoint directory is malformed or unsupported; the message says what and why."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (Qwen2 always; Llama when attention_bias=true)
    o_bias: bool  # bias on o_proj (Llama attention_bias applies to o_proj too)
    mlp_bias: bool
    sliding_window: int | None  # None: full causal attention
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Mixture of experts (num_experts == 0: a dense model).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # columns of one routed expert
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    norm_topk_prob: bool = False  # renormalize the top-k routing weights to sum to 1
    dense_mlp_layers: tuple[int, ...] = ()  # layers of an MoE model that keep a dense MLP
    # q/k RMSNorm before RoPE: "head" normalizes each head (Qwen3-MoE), "full" the whole
    # projection (OLMoE, which under tensor parallelism needs the sum of squares of all ranks).
    qk_norm: str | None = None
    clip_qkv: float | None = None  # OLMoE: clamp q/k/v to [-clip, clip]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer not in self.dense_mlp_layers

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            head_dim = int(raw.get("head_dim") or hidden // heads)
            cfg = cls(
                architecture=arch,
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                vocab_size=int(raw["vocab_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope=_parse_rope(raw),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=_qkv_bias(arch, raw),
                o_bias=arch not in _QKV_BIAS_ARCHITECTURES and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                sliding_window=_parse_sliding_window(arch, raw),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
                **_parse_moe(arch, raw),
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json is missing required key {exc.args[0]!r}") from None
        if cfg.num_heads % cfg.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={cfg.num_heads} is not a multiple of num_key_value_heads={cfg.num_kv_heads}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"hidden_act={act!r} is not supported (only 'silu')")
        return cfg

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).exists():
            raise CheckpointError(f"{model_dir} does not exist")
        if Path(model_dir).is_file():
            raise CheckpointError(f"{model_dir} is a file; give the checkpoint's directory (the one holding config.json)")
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw)


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes "rope_parameters" (theta inside); older checkpoints have
    # "rope_theta" and an optional "rope_scaling" dict.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _qkv_bias(arch: str, raw: dict[str, Any]) -> bool:
    if arch == "Qwen2ForCausalLM":
        return True
    if arch == "Qwen2MoeForCausalLM":
        return bool(raw.get("qkv_bias", True))
    return bool(raw.get("attention_bias", False))


def _parse_moe(arch: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of ``ModelConfig`` for ``arch`` (empty for a dense architecture)."""
    if arch not in MOE_ARCHITECTURES:
        return {}
    if arch == "MixtralForCausalLM":
        # Mixtral always renormalizes its top-k weights (softmax, top-k, divide by the sum).
        return dict(num_experts=int(raw["num_local_experts"]), experts_per_token=int(raw["num_experts_per_tok"]),
                    moe_intermediate_size=int(raw["intermediate_size"]), norm_topk_prob=True)
    experts = raw.get("num_experts", raw.get("num_local_experts"))  # Qwen3-MoE in transformers 5 writes the latter
    if experts is None:
        raise KeyError("num_experts")
    out: dict[str, Any] = dict(num_experts=int(experts), experts_per_token=int(raw["num_experts_per_tok"]),
                               norm_topk_prob=bool(raw.get("norm_topk_prob", False)))
    if arch == "OlmoeForCausalLM":
        clip = raw.get("clip_qkv")
        return out | dict(moe_intermediate_size=int(raw["intermediate_size"]), qk_norm="full",
                          clip_qkv=float(clip) if clip is not None else None)
    out["moe_intermediate_size"] = int(raw["moe_intermediate_size"])
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    only = {int(i) for i in raw.get("mlp_only_layers") or []}
    layers = int(raw["num_hidden_layers"])
    out["dense_mlp_layers"] = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    if arch == "Qwen2MoeForCausalLM":
        out["shared_expert_intermediate_size"] = int(raw.get("shared_expert_intermediate_size") or 0)
    else:
        out["qk_norm"] = "head"
    return out


def _parse_sliding_window(arch: str, raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if not window:
        return None
    if arch == "Qwen3MoeForCausalLM" and not raw.get("use_sliding_window", False):
        return None
    if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        if not raw.get("use_sliding_window", False):
            return None
        # Qwen2 mixes window and full layers (max_window_layers); not implemented yet.
        raise CheckpointError("Qwen2 with use_sliding_window=true is not supported yet")
    return int(window)
