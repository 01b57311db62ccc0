"""Mixtral: Llama/Mistral attention (with its optional sliding window) and the plain MoE block
(softmax, top-k, always renormalized; no shared expert). Everything lives in ``moe.py``."""

from __future__ import annotations

from worker.models.moe import MoeRankModel


class MixtralRankModel(MoeRankModel):
    pass
