"""Llama-family decoder math for one tensor-parallel rank (Llama 2/3, Mistral, Qwen2).

Follows transformers' ``modeling_llama``: RMSNorm in fp32, rotate-half RoPE, GQA, SiLU MLP.
A rank computes its heads and MLP columns and hands each block's partial ``[T, d]`` to
``allreduce``; the sum over ranks is exactly the unsharded block output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker.config import ModelConfig, RopeConfig
from worker.kv_cache import KVCache
from worker.sharding import RankShard
from worker.step import StepPlan
from worker.weight_store import WeightStore
from worker.weights import AttentionWeights, Fields, MlpWeights, from_fields

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
    """One rank's shard of every decoder layer (from its weight store), plus its KV cache.

    Subclasses (other families) override the hooks ``_qkv_hook`` and ``_feed_forward``.
    """

    def __init__(self, config: ModelConfig, shard: RankShard, store: WeightStore, kv_cache: KVCache,
                 allreduce: AllReduce):
        self.config = config
        self.shard = shard
        self.store = store
        self.kv = kv_cache
        self.allreduce = allreduce
        self.inv_freq = rope_inv_freq(config.rope, config.head_dim)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def _rope(self, plan: StepPlan, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = plan.positions.float()[:, None] * self.inv_freq[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, hidden: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Run every layer on ``hidden`` (T, d); returns the final hidden states (T, d), unnormed.

        Each block's weights are held only while it computes: the allreduce that follows runs
        after the release, so a streaming store refills the buffer during communication too.
        """
        cos, sin = self._rope(plan, hidden.dtype)
        eps = self.config.rms_norm_eps
        for layer in range(self.config.num_layers):
            with self.store.attention(layer) as w:
                partial = self._attention(layer, w, rms_norm(hidden, w.norm, eps), plan, cos, sin)
            hidden = hidden + self.allreduce(partial)
            with self.store.mlp(layer) as fields:
                partial = self._feed_forward(layer, fields, hidden)
            hidden = hidden + self.allreduce(partial)
        return hidden

    def _qkv_hook(self, w: AttentionWeights, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hook on the flat projections q (T, qh*hd), k and v (T, kh*hd) before RoPE; Llama has none."""
        return q, k, v

    def _attention(self, layer: int, w: AttentionWeights, x: torch.Tensor, plan: StepPlan,
                   cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qh, kh, hd = self.shard.num_q_heads, self.shard.num_kv_heads, self.config.head_dim
        qkv = F.linear(x, w.wqkv, w.bqkv)  # (T, (qh + 2kh) * hd)
        q, k, v = qkv.split([qh * hd, kh * hd, kh * hd], dim=-1)
        q, k, v = self._qkv_hook(w, q, k, v)
        q = q.reshape(-1, qh, hd)  # (T, qh, hd)
        k = k.reshape(-1, kh, hd)  # (T, kh, hd)
        v = v.reshape(-1, kh, hd)
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

    def _feed_forward(self, layer: int, fields: Fields, hidden: torch.Tensor) -> torch.Tensor:
        """The MLP block's partial (T, d) for the residual stream ``hidden`` (T, d)."""
        w = from_fields(MlpWeights, fields)
        return gated_mlp(rms_norm(hidden, w.norm, self.config.rms_norm_eps), w.w_gate_up, w.w_down,
                         w.b_gate_up, w.b_down)


def gated_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, b_gate_up: torch.Tensor | None = None,
              b_down: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU-gated MLP on this rank's columns: (T, d) -> partial (T, d)."""
    gate, up = F.linear(x, w_gate_up, b_gate_up).chunk(2, dim=-1)  # (T, w) each
    return F.linear(F.silu(gate) * up, w_down, b_down)
