"""Memory-budget decisions, as pure functions: parsing sizes, sizing the weight window and
the expert cache.

The memory budget of a rank covers what grows with the model: its decoder weights (resident,
or the window's buffers), its KV cache and RoPE tables (both grow with the context). The
Python/torch runtime is a fixed overhead on top (docs/memory.md, "Fixed overhead"). The expert cache has
a budget of its own (``--expert-cache``); without one, the experts get what the memory budget
leaves (``expert_share``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
          "mb": 1000 ** 2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000 ** 3, "t": 1 << 40, "tib": 1 << 40,
          "tb": 1000 ** 4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class BudgetError(ValueError):
    """A budget is malformed or too small for the model; the message gives the minimum."""


def parse_size(text: str) -> int:
    """``"512MiB"`` -> 536870912. Binary units for K/M/G/T and KiB..TiB, decimal for KB..TB."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise BudgetError(f"not a size: {text!r} (expected e.g. 2GiB, 512MiB, 300MB, 1048576)")
    return int(float(match.group(1)) * _UNITS[unit])


def size_argument(text: str) -> int:
    """``parse_size`` for argparse: a bad size reads as the message above, not as
    "invalid parse_size value"."""
    import argparse

    try:
        return parse_size(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class WindowPlan:
    """``slots`` reusable buffers of ``slot_bytes`` each; ``resident`` when the shard fits."""

    resident: bool
    slots: int
    slot_bytes: int

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes


MIN_WINDOW_SLOTS = 2  # one block computing, one loading


def plan_window(block_bytes: Sequence[int], budget: int | None, reserved: int = 0,
                experts_floor: int = 0) -> WindowPlan:
    """How to hold the dense blocks (attention, MLP of every layer, in order) under ``budget``.

    ``reserved`` is what the budget must also hold (the KV cache, the RoPE tables, resident
    routers); ``experts_floor`` what the experts need at least when they share the budget (an MoE
    rank without ``--expert-cache``: one token's experts, ``experts_minimum``). With no budget, or
    when every block fits beside both, the shard stays resident; otherwise a window of as many
    slots of the largest block's size as fit, at least two. The floor is kept out of the window:
    before, the window took every whole slot and left the experts less than one, so a larger
    budget could fail where a smaller one started.
    """
    total = sum(block_bytes)
    if budget is None or total + reserved + experts_floor <= budget:
        return WindowPlan(resident=True, slots=len(block_bytes), slot_bytes=0)
    slot = max(block_bytes)
    beside = reserved + experts_floor
    slots = (budget - beside) // slot if budget > beside else 0
    if slots < MIN_WINDOW_SLOTS:
        need = beside + MIN_WINDOW_SLOTS * slot
        experts = (f" and {format_size(experts_floor)} for one token's experts (without --expert-cache the "
                   f"experts get what --memory-budget leaves)") if experts_floor else ""
        raise BudgetError(
            f"memory budget {format_size(budget)} is too small: the sliding window needs at least "
            f"{MIN_WINDOW_SLOTS} blocks of {format_size(slot)} plus {format_size(reserved)} of KV cache and tables"
            f"{experts}, i.e. {format_size(need)} ({need} bytes); the dense blocks alone are {format_size(total)}")
    return WindowPlan(resident=False, slots=min(slots, len(block_bytes)), slot_bytes=slot)


def experts_minimum(expert_bytes: int, min_slots: int, expert_cache: int | None) -> int:
    """What the experts must keep out of ``--memory-budget``: ``min_slots`` (one token's top-k)
    of ``expert_bytes`` when they share it, nothing when ``--expert-cache`` gives them their own."""
    return 0 if expert_cache is not None else min_slots * expert_bytes


def expert_share(memory_budget: int | None, expert_cache: int | None, held: int) -> int | None:
    """The bytes the experts may take: ``--expert-cache`` when given, else what ``--memory-budget``
    leaves beyond ``held`` (the other weights, the KV cache, the RoPE tables); None: no limit."""
    if expert_cache is not None or memory_budget is None:
        return expert_cache
    return max(0, memory_budget - held)


def plan_expert_slots(expert_bytes: int, total_experts: int, budget: int | None, min_slots: int) -> int:
    """Number of expert buffers under ``budget``: all experts when none is given or they fit.

    ``min_slots`` is what one layer needs pinned at once (its top-k for a token), below which
    a layer could not run.
    """
    if budget is None or expert_bytes * total_experts <= budget:
        return total_experts
    slots = budget // expert_bytes
    if slots < min_slots:
        raise BudgetError(
            f"expert cache {format_size(budget)} is too small: it must hold at least {min_slots} experts "
            f"of {format_size(expert_bytes)} each, i.e. {format_size(min_slots * expert_bytes)}")
    return slots
