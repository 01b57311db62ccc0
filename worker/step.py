"""The description of one forward step over a batch of sequences, shared by all ranks.

A step packs the new tokens of several sequences into one ``[T, d]`` tensor: a sequence
being prefilled contributes its whole prompt chunk, a decoding one a single token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqSpan:
    slot: int  # KV-cache slot of the sequence
    start: int  # position of its first new token
    length: int  # number of new tokens in this step


@dataclass
class StepPlan:
    """Per-step tensors computed once and reused by every layer."""

    spans: list[SeqSpan]
    positions: torch.Tensor  # (T,) int64
    offsets: list[int]  # token offset of each span in the packed batch
    masks: list[torch.Tensor | None]  # per span: (n, start + n) bool, None when all allowed

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def build(cls, spans: list[SeqSpan], sliding_window: int | None) -> StepPlan:
        positions, offsets, masks = [], [], []
        offset = 0
        for span in spans:
            pos = torch.arange(span.start, span.start + span.length)
            positions.append(pos)
            offsets.append(offset)
            offset += span.length
            masks.append(_span_mask(span, pos, sliding_window))
        return cls(spans=spans, positions=torch.cat(positions), offsets=offsets, masks=masks)


def _span_mask(span: SeqSpan, pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    total = span.start + span.length
    if span.length == 1 and (window is None or total <= window):
        return None  # one query attends to every cached key
    keys = torch.arange(total)
    allowed = keys[None, :] <= pos[:, None]  # (n, total) causal
    if window is not None:
        allowed &= keys[None, :] > pos[:, None] - window
    return allowed
