"""Qwen2-MoE: Qwen2 attention (q/k/v bias, in the weights), MoE with ``norm_topk_prob`` from the
config and a shared expert behind a sigmoid gate; layers listed in ``mlp_only_layers`` (or off
``decoder_sparse_step``) keep a dense MLP. The shared expert is split across ranks like a dense
MLP; its gate (1, d) is replicated. The math is in ``moe.py``, driven by the weights present."""

from __future__ import annotations

from worker.models.moe import MoeRankModel


class Qwen2MoeRankModel(MoeRankModel):
    pass
