"""OLMoE: RMSNorm over the *whole* q and k projections (all heads at once, before RoPE), an
optional ``clip_qkv`` clamp, and the plain MoE block.

A norm over every head needs the mean square over all ranks' heads: each rank sends its
per-token sums of squares (T, 2) through one extra, tiny allreduce per layer, then scales
its own heads. That is the only family where tensor parallelism costs a third allreduce.
"""

from __future__ import annotations

import torch

from worker.models.moe import MoeRankModel
from worker.shards.weights import AttentionWeights


class OlmoeRankModel(MoeRankModel):
    def _qkv_hook(self, w: AttentionWeights, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert w.q_norm is not None and w.k_norm is not None
        cfg = self.config
        squares = torch.stack([q.float().pow(2).sum(-1), k.float().pow(2).sum(-1)], dim=-1)  # (T, 2)
        totals = self.allreduce(squares)  # (T, 2) over all heads of all ranks
        q_var = totals[:, :1] / (cfg.num_heads * cfg.head_dim)  # (T, 1)
        k_var = totals[:, 1:] / (cfg.num_kv_heads * cfg.head_dim)
        q = w.q_norm * (q.float() * torch.rsqrt(q_var + cfg.rms_norm_eps)).to(q.dtype)
        k = w.k_norm * (k.float() * torch.rsqrt(k_var + cfg.rms_norm_eps)).to(k.dtype)
        if cfg.clip_qkv is not None:
            c = cfg.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        return q, k, v
