"""Qwen3-MoE: the Qwen2-MoE block without a shared expert, and RMSNorm on every q and k head
(over ``head_dim``, before RoPE). A per-head norm needs nothing from other ranks."""

from __future__ import annotations

import torch

from worker.models.llama import rms_norm
from worker.models.moe import MoeRankModel
from worker.shards.weights import AttentionWeights


class Qwen3MoeRankModel(MoeRankModel):
    def _qkv_hook(self, w: AttentionWeights, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert w.q_norm is not None and w.k_norm is not None
        hd, eps = self.config.head_dim, self.config.rms_norm_eps
        q = rms_norm(q.reshape(q.shape[0], -1, hd), w.q_norm, eps)  # (T, qh, hd)
        k = rms_norm(k.reshape(k.shape[0], -1, hd), w.k_norm, eps)  # (T, kh, hd)
        return q.flatten(1), k.flatten(1), v
