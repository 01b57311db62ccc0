"""``StepPlan.build``'s path for one sequence's decode token gives the plan the general path gives."""

from __future__ import annotations

import pytest
import torch

from worker.rank.step import SeqSpan, StepPlan


@pytest.mark.parametrize("window", [None, 1, 4, 64])
@pytest.mark.parametrize("slot, start", [(0, 0), (0, 3), (2, 5), (7, 100)])
def test_one_token_plan_equals_the_general_one(slot: int, start: int, window: int | None) -> None:
    span = SeqSpan(slot, start, 1)
    fast, general = StepPlan.build([span], window), StepPlan._general([span], window)
    assert fast.spans == general.spans and fast.offsets == general.offsets
    assert fast.decode is None and general.decode is None
    for a, b in ((fast.positions, general.positions), (fast.token_slots, general.token_slots)):
        assert a is not None and b is not None
        assert a.dtype == b.dtype == torch.int64 and a.shape == b.shape == (1,) and torch.equal(a, b)
    (mask,), (expected,) = fast.masks, general.masks
    assert (mask is None) == (expected is None)
    if expected is not None:  # a window shorter than the context hides the oldest keys
        assert mask is not None and torch.equal(mask, expected)
    assert fast.num_tokens == 1


def test_a_window_shorter_than_the_context_masks_the_oldest_keys() -> None:
    (mask,) = StepPlan.build([SeqSpan(0, 5, 1)], 4).masks
    assert mask is not None and mask.tolist() == [[False, False, True, True, True, True]]
