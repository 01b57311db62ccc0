"""The vocab-parallel LM head: every rank holds rows ``shard.vocab_rows`` of the head and, after
the last layer, projects the rows of the hidden state whose logits are needed onto them.

Why: on the coordinator alone the head (vocab x hidden: 525 MB of int8 for Llama 3 8B) was read
whole at every step by one machine while the others waited; split by the rank weights it is read
in parallel like the layers, and the hub only gathers (S, V_r) logits per rank. Every rank holds
the full residual stream after the last allreduce (the same bits on every rank), so no extra
communication is needed before the projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.kernels.quant import QuantWeight, Weight, field, linear
from worker.models.llama import rms_norm
from worker.rank.step import SeqSpan
from worker.shards.weights import Fields


@dataclass
class HeadSlice:
    """One rank's final norm and LM head rows."""

    norm: torch.Tensor  # (d,)
    weight: Weight  # (V_r, d): float, or int8 per output row
    eps: float

    @classmethod
    def from_fields(cls, fields: Fields, eps: float) -> HeadSlice:
        return cls(norm=fields["norm"], weight=field(fields, "lm_head"), eps=eps)  # type: ignore[arg-type]

    @property
    def rows(self) -> int:
        return int(self.weight.shape[0])

    def nbytes(self) -> int:
        w = self.weight
        held = w.nbytes() if isinstance(w, QuantWeight) else w.numel() * w.element_size()
        return held + self.norm.numel() * self.norm.element_size()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, d) final hidden states, unnormed -> (R, V_r) float32 logits of this rank's rows."""
        return linear(rms_norm(hidden, self.norm, self.eps), self.weight).float()


def logit_rows(hidden: torch.Tensor, spans: list[SeqSpan], all_logits: bool) -> torch.Tensor:
    """The rows of ``hidden`` (T, d) whose logits a step returns: each span's last token (S, d),
    or every token (T, d) when ``all_logits``."""
    if all_logits or hidden.shape[0] == len(spans):
        return hidden
    last = torch.tensor([sum(s.length for s in spans[: i + 1]) - 1 for i in range(len(spans))])
    return hidden[last]  # (S, d)
