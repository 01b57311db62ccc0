"""Llama-family decoder math for one tensor-parallel rank (Llama 2/3, Mistral, Qwen2).

Follows transformers' ``modeling_llama``: RMSNorm in fp32, rotate-half RoPE, GQA, SiLU MLP.
A rank computes its heads and MLP columns and hands each block's partial ``[T, d]`` to
``allreduce``; the sum over ranks is exactly the unsharded block output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from worker.config import ModelConfig, RopeConfig
from worker.kv_cache import KVCache
from worker.sharding import RankShard
from worker.step import StepPlan
from worker.weights import LayerWeights

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (hd/2,), with linear or Llama-3 scaling as transformers computes them."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RankModel:
    """One rank's shard of every decoder layer, plus its KV cache."""

    def __init__(self, config: ModelConfig, shard: RankShard, layers: Sequence[LayerWeights],
                 kv_cache: KVCache, allreduce: AllReduce):
        self.config = config
        self.shard = shard
        self.layers = list(layers)
        self.kv = kv_cache
        self.allreduce = allreduce
        self.inv_freq = rope_inv_freq(config.rope, config.head_dim)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def _rope(self, plan: StepPlan, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = plan.positions.float()[:, None] * self.inv_freq[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, hidden: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Run every layer on ``hidden`` (T, d); returns the final hidden states (T, d), unnormed."""
        cos, sin = self._rope(plan, hidden.dtype)
        eps = self.config.rms_norm_eps
        for index, w in enumerate(self.layers):
            attn = self._attention(index, w, rms_norm(hidden, w.attn_norm, eps), plan, cos, sin)
            hidden = hidden + self.allreduce(attn)
            hidden = hidden + self.allreduce(self._mlp(w, rms_norm(hidden, w.mlp_norm, eps)))
        return hidden

    def _attention(self, layer: int, w: LayerWeights, x: torch.Tensor, plan: StepPlan,
                   cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qh, kh, hd = self.shard.num_q_heads, self.shard.num_kv_heads, self.config.head_dim
        qkv = F.linear(x, w.wqkv, w.bqkv)  # (T, (qh + 2kh) * hd)
        q, k, v = qkv.split([qh * hd, kh * hd, kh * hd], dim=-1)
        q = q.view(-1, qh, hd)  # (T, qh, hd)
        k = k.view(-1, kh, hd)  # (T, kh, hd)
        v = v.view(-1, kh, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = torch.empty_like(q)  # (T, qh, hd)
        for span, offset, mask in zip(plan.spans, plan.offsets, plan.masks, strict=True):
            tokens = slice(offset, offset + span.length)
            self.kv.write(layer, span.slot, span.start, k[tokens], v[tokens])
            keys, values = self.kv.view(layer, span.slot, span.start + span.length)  # (kh, S, hd)
            attended = F.scaled_dot_product_attention(
                q[tokens].transpose(0, 1)[None],  # (1, qh, n, hd)
                keys[None], values[None], attn_mask=mask, scale=self.scale, enable_gqa=True,
            )  # (1, qh, n, hd)
            out[tokens] = attended[0].transpose(0, 1)
        return F.linear(out.view(-1, qh * hd), w.wo, w.bo)  # (T, d) partial sum

    def _mlp(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w.w_gate_up, w.b_gate_up).chunk(2, dim=-1)  # (T, w) each
        return F.linear(F.silu(gate) * up, w.w_down, w.b_down)  # (T, d) partial sum
