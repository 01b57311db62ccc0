"""Llama-family decoder math for one tensor-parallel rank (Llama 2/3, Mistral, Qwen2).

Follows transformers' ``modeling_llama``: RMSNorm in fp32, rotate-half RoPE, GQA, SiLU MLP.
A rank computes its heads and MLP columns and hands each block's partial ``[T, d]`` to
``allreduce``; the sum over ranks is exactly the unsharded block output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from worker.config import ModelConfig, RopeConfig
from worker.kernels import native
from worker.kernels.quant import Weight, linear
from worker.memory.kv_cache import KVCache
from worker.memory.weight_store import WeightStore
from worker.rank.step import DecodeBatch, SeqSpan, StepPlan
from worker.shards.sharding import RankShard
from worker.shards.weights import AttentionWeights, MlpWeights


class WholeStep(Protocol):
    """Runs a whole decode step of this model in one call (``worker.models.native_step``, which
    imports this module: a protocol here keeps the import one-way)."""

    def run(self, hidden: torch.Tensor, plan: StepPlan) -> torch.Tensor | None: ...

# the sum over ranks of a block's partial output; the block gives its partial up (the sum may be
# written into it: worker.comm.collective's allreduce_)
AllReduce = Callable[[torch.Tensor], torch.Tensor]


_EPS: dict[float, torch.Tensor] = {}  # eps -> (1, 1) fp32 tensor, the addend of the decode fast path


def _few_fp32_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` is a contiguous fp32 tensor of few rows (a decode step's): where the native
    kernels of ``worker.kernels.native`` beat torch's vectorized, multi-threaded ops."""
    return x.dtype == torch.float32 and x.numel() <= native.F32_MAX_ROWS * x.shape[-1] and x.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 as transformers does."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if _few_fp32_rows(x) and (kernel := native.rms_norm()) is not None:
            return kernel(x, weight, eps)
        if x.dim() == 2 and x.shape[0] == 1:
            # One decode row: eps + x.x / d as one addmm (4 ops in all, against F.rms_norm's CPU
            # composite of about 10: 13-17 us instead of 25-33 at width 512 here).
            if (addend := _EPS.get(eps)) is None:
                addend = _EPS[eps] = torch.full((1, 1), eps)
            inv_rms = torch.addmm(addend, x, x.T, alpha=1.0 / x.shape[1]).rsqrt_()  # (1, 1)
            return torch.mul(x, inv_rms).mul_(weight)
        return F.rms_norm(x, weight.shape, weight, eps)  # bitwise the same as below in fp32
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


def rope_table(inv_freq: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (see ``apply_rope``) of positions ``[0, length)``, each (length, 1, hd),
    computed in fp32 exactly as transformers does, then cast to ``dtype``."""
    freqs = torch.arange(length).float()[:, None] * inv_freq[None, :]  # (length, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    return (torch.cat((cos, cos), dim=-1)[:, None, :].to(dtype),  # (length, 1, hd)
            torch.cat((-sin, sin), dim=-1)[:, None, :].to(dtype))


def rope_table_bytes(length: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of ``rope_table``'s two tensors: part of what a rank's memory budget must hold
    (33 MB at 32k positions, head_dim 128, fp32)."""
    return 2 * length * head_dim * dtype.itemsize


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``x`` (T, h, hd): ``x*cos + rotate_half(x)*sin``, with rotate_half's
    negation folded into ``signed_sin`` (-sin on the first half), so the rotation is one roll."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


class RankModel:
    """One rank's shard of every decoder layer (from its weight store), plus its KV cache.

    Subclasses (other families) override the hooks ``_layer_start``, ``_qkv_hook`` and ``_feed_forward``.
    """

    def __init__(self, config: ModelConfig, shard: RankShard, store: WeightStore, kv_cache: KVCache,
                 allreduce: AllReduce):
        self.config = config
        self.shard = shard
        self.store = store
        self.kv = kv_cache
        self.allreduce = allreduce
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self._plain_qkv = type(self)._qkv_hook is RankModel._qkv_hook  # no q/k norm between projection and RoPE
        # cos and signed sin of every position the KV cache holds, each (max_len, 1, hd): a step
        # slices its rows instead of computing them (about 100 us of small ops per step).
        self.rope_cos, self.rope_sin = rope_table(rope_inv_freq(config.rope, config.head_dim), kv_cache.max_len,
                                                  kv_cache.k.dtype)
        # Steps of one new fp32 token per sequence attend in one native call; None: torch's SDPA.
        self._token_attention = self._native_token_attention()
        # Decode steps in one native call, where this model and rank allow (worker.models.native_step.attach)
        self.native_step: WholeStep | None = None

    def _native_token_attention(self) -> native.TokenAttention | None:
        make = native.token_attention()
        if make is None or self.kv.k.dtype != torch.float32:
            return None
        return make(self.kv.k, self.kv.v, self.rope_cos, self.rope_sin, self.shard.num_q_heads,
                    self.config.sliding_window, self.scale)

    def _rope(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see ``apply_rope``) of the step's positions, each (T, 1, hd)."""
        if len(plan.spans) == 1:  # consecutive positions: a view, no gather
            span = plan.spans[0]
            rows = slice(span.start, span.start + span.length)
            return self.rope_cos[rows], self.rope_sin[rows]
        return self.rope_cos[plan.positions], self.rope_sin[plan.positions]

    def forward(self, hidden: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Run every layer on ``hidden`` (T, d); returns the final hidden states (T, d), unnormed.

        Each block's weights are held only while it computes: the allreduce that follows runs
        after the release, so a streaming store refills the buffer during communication too.
        """
        if self.native_step is not None and (done := self.native_step.run(hidden, plan)) is not None:
            return done
        cos, sin = self._rope(plan)
        eps = self.config.rms_norm_eps
        natively = self._attends_tokens_natively(plan)
        for layer in range(self.config.num_layers):
            self._layer_start(layer, hidden)
            with self.store.attention(layer) as w:
                partial = self._attention(layer, w, rms_norm(hidden, w.norm, eps), plan, cos, sin, natively)
            hidden = hidden + self.allreduce(partial)
            with self.store.mlp(layer, self._mlp_class(layer)) as mlp:
                partial = self._feed_forward(layer, mlp, hidden)
            hidden = hidden + self.allreduce(partial)
        return hidden

    def _layer_start(self, layer: int, hidden: torch.Tensor) -> None:
        """Hook on ``layer``'s input (T, d) before its attention; the dense model has none."""

    def _qkv_hook(self, w: AttentionWeights, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hook on the flat projections q (T, qh*hd), k and v (T, kh*hd) before RoPE; Llama has none."""
        return q, k, v

    def _attends_tokens_natively(self, plan: StepPlan) -> bool:
        """Whether this step's attention runs in the native kernel: one new token per sequence,
        every slot and position inside the cache (the kernel does not check them)."""
        return (self._token_attention is not None and plan.token_slots is not None
                and all(0 <= span.slot < self.kv.num_slots and 0 <= span.start < self.kv.max_len
                        for span in plan.spans))  # else the torch path raises its IndexError

    def _attention(self, layer: int, w: AttentionWeights, x: torch.Tensor, plan: StepPlan,
                   cos: torch.Tensor, sin: torch.Tensor, natively: bool) -> torch.Tensor:
        qh, kh, hd = self.shard.num_q_heads, self.shard.num_kv_heads, self.config.head_dim
        qkv = linear(x, w.wqkv, w.bqkv)  # (T, (qh + 2kh) * hd)
        if natively and self._token_attention is not None and plan.token_slots is not None:
            if not self._plain_qkv:
                q, k, v = self._qkv_hook(w, *qkv.split([qh * hd, kh * hd, kh * hd], dim=-1))
                qkv = torch.cat([t.reshape(t.shape[0], -1) for t in (q, k, v)], dim=-1)  # (T, (qh + 2kh) * hd)
            out = self._token_attention(layer, qkv, plan.token_slots, plan.positions)  # (T, qh*hd)
            return linear(out, w.wo, w.bo)  # (T, d) partial sum
        if self._plain_qkv:  # q and k are adjacent columns: rotate both heads' sets at once
            qk = apply_rope(qkv[:, :(qh + kh) * hd].view(-1, qh + kh, hd), cos, sin)  # (T, qh + kh, hd)
            q, k = qk[:, :qh], qk[:, qh:]  # (T, qh, hd), (T, kh, hd)
            v = qkv[:, (qh + kh) * hd:].view(-1, kh, hd)
        else:
            q, k, v = self._qkv_hook(w, *qkv.split([qh * hd, kh * hd, kh * hd], dim=-1))
            q = apply_rope(q.reshape(-1, qh, hd), cos, sin)  # (T, qh, hd)
            k = apply_rope(k.reshape(-1, kh, hd), cos, sin)  # (T, kh, hd)
            v = v.reshape(-1, kh, hd)
        if len(plan.spans) == 1:  # the common decode / prefill step: no per-span scatter
            out = self._attend(layer, plan.spans[0], plan.masks[0], q, k, v).reshape(-1, qh * hd)  # (T, qh*hd)
        elif plan.decode is not None:  # batched decode: one attention call for all sequences
            out = self._attend_decode(layer, plan.decode, q, k, v).reshape(-1, qh * hd)  # (B, qh*hd)
        else:
            out = torch.empty_like(q)  # (T, qh, hd)
            for span, offset, mask in zip(plan.spans, plan.offsets, plan.masks, strict=True):
                tokens = slice(offset, offset + span.length)
                out[tokens] = self._attend(layer, span, mask, q[tokens], k[tokens], v[tokens])
            out = out.view(-1, qh * hd)
        return linear(out, w.wo, w.bo)  # (T, d) partial sum

    def _attend(self, layer: int, span: SeqSpan, mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """One sequence's new tokens: cache their k/v (n, kh, hd), attend q (n, qh, hd) to the
        whole cached prefix; returns (n, qh, hd), a transposed view."""
        self.kv.write(layer, span.slot, span.start, k, v)
        keys, values = self.kv.view(layer, span.slot, span.start + span.length)  # (kh, S, hd)
        attended = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # (1, qh, n, hd)
            keys[None], values[None], attn_mask=mask, scale=self.scale, enable_gqa=True,
        )  # (1, qh, n, hd)
        return attended[0].transpose(0, 1)

    def _attend_decode(self, layer: int, batch: DecodeBatch, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
        """One new token of each of B sequences: cache their k/v (B, kh, hd), attend q (B, qh, hd)
        to each sequence's cached prefix (masked to its own length); returns (B, qh, hd)."""
        self.kv.write_tokens(layer, batch.slots, batch.positions, k, v)
        keys, values = self.kv.batch_view(layer, batch.slots, batch.first_slot, batch.length)  # (B, kh, S, hd)
        mask = batch.mask if batch.mask.dtype == q.dtype else batch.mask.to(q.dtype)
        attended = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True,
        )  # (B, qh, 1, hd)
        return attended[:, :, 0]

    def _mlp_class(self, layer: int) -> type[Any]:
        """The dataclass of ``layer``'s MLP block."""
        return MlpWeights

    def _feed_forward(self, layer: int, w: Any, hidden: torch.Tensor) -> torch.Tensor:
        """The partial (T, d) of MLP block ``w`` (a ``_mlp_class(layer)``) for the residual stream ``hidden`` (T, d)."""
        return gated_mlp(rms_norm(hidden, w.norm, self.config.rms_norm_eps), w.w_gate_up, w.w_down,
                         w.b_gate_up, w.b_down)


def gated_mlp(x: torch.Tensor, w_gate_up: Weight, w_down: Weight, b_gate_up: torch.Tensor | None = None,
              b_down: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU-gated MLP on this rank's columns: (T, d) -> partial (T, d)."""
    return linear(silu_and_mul(linear(x, w_gate_up, b_gate_up)), w_down, b_down)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of each row [gate | up] of ``gate_up`` (T, 2w): (T, w)."""
    if gate_up.dim() == 2 and _few_fp32_rows(gate_up) and (kernel := native.silu_mul()) is not None:
        return kernel(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)  # (T, w) each
    return F.silu(gate) * up
