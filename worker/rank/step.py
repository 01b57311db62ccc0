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


@dataclass(frozen=True)
class DecodeBatch:
    """A step of several sequences with one new token each (batched decode): every layer writes
    their keys/values and attends in one call each, over the cache rows ``[0, length)`` of every
    sequence, with ``mask`` hiding what a shorter sequence does not have."""

    slots: torch.Tensor  # (B,) int64 KV-cache slots
    positions: torch.Tensor  # (B,) int64 position of each new token
    first_slot: int | None  # slots are first_slot, first_slot + 1, ...: the cache is viewed, not gathered
    length: int  # keys attended per sequence: the longest sequence's, max(position) + 1
    mask: torch.Tensor  # (B, 1, 1, length) float: 0 where key j of sequence i is attended, -inf elsewhere

    @classmethod
    def build(cls, spans: list[SeqSpan], sliding_window: int | None) -> DecodeBatch:
        slots = [s.slot for s in spans]
        positions = torch.tensor([s.start for s in spans])
        length = int(positions.max()) + 1
        keys = torch.arange(length)
        allowed = keys[None, :] <= positions[:, None]  # (B, length) causal: up to its own token
        if sliding_window is not None:
            allowed &= keys[None, :] > positions[:, None] - sliding_window
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        # additive rather than bool: SDPA would convert a bool mask at every layer
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))[:, None, None, :]
        return cls(slots=torch.tensor(slots), positions=positions, first_slot=slots[0] if contiguous else None,
                   length=length, mask=mask)


@dataclass
class StepPlan:
    """Per-step tensors computed once and reused by every layer."""

    spans: list[SeqSpan]
    positions: torch.Tensor  # (T,) int64
    offsets: list[int]  # token offset of each span in the packed batch
    masks: list[torch.Tensor | None]  # per span: (n, start + n) bool, None when all allowed
    decode: DecodeBatch | None = None  # set when there are several spans, each of one token
    # (B,) int64 KV-cache slot of each span when every span has one new token (``positions``
    # holds their positions): for kernels that index the cache themselves
    token_slots: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def build(cls, spans: list[SeqSpan], sliding_window: int | None) -> StepPlan:
        if len(spans) == 1 and spans[0].length == 1:
            return cls._one_token(spans[0], sliding_window)
        return cls._general(spans, sliding_window)

    @classmethod
    def _general(cls, spans: list[SeqSpan], sliding_window: int | None) -> StepPlan:
        positions, offsets, masks = [], [], []
        offset = 0
        for span in spans:
            pos = torch.arange(span.start, span.start + span.length)
            positions.append(pos)
            offsets.append(offset)
            offset += span.length
            masks.append(_span_mask(span, pos, sliding_window))
        decode, token_slots = None, None
        if all(span.length == 1 for span in spans):
            if len(spans) > 1:
                decode = DecodeBatch.build(spans, sliding_window)
            token_slots = decode.slots if decode is not None else torch.tensor([spans[0].slot])
        return cls(spans=spans, positions=torch.cat(positions), offsets=offsets, masks=masks, decode=decode,
                   token_slots=token_slots)

    @classmethod
    def _one_token(cls, span: SeqSpan, sliding_window: int | None) -> StepPlan:
        """``build`` of one sequence's decode step, the plan of every batch-1 token: the same
        fields from two ``torch.full`` calls (2.6 µs each; ``torch.tensor([n])`` takes 6) instead
        of the general path's seven tensor operations."""
        positions = torch.full((1,), span.start, dtype=torch.int64)  # (1,)
        mask = _span_mask(span, positions, sliding_window) if sliding_window is not None else None
        return cls(spans=[span], positions=positions, offsets=[0], masks=[mask],
                   token_slots=torch.full((1,), span.slot, dtype=torch.int64))


def _span_mask(span: SeqSpan, pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    total = span.start + span.length
    if span.length == 1 and (window is None or total <= window):
        return None  # one query attends to every cached key
    keys = torch.arange(total)
    allowed = keys[None, :] <= pos[:, None]  # (n, total) causal
    if window is not None:
        allowed &= keys[None, :] > pos[:, None] - window
    return allowed
