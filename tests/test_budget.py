"""Pure memory decisions: sizes, the window plan, the expert-cache size, the eviction choice,
the expert predictor."""

from __future__ import annotations

import pytest
import torch

from worker.config import RopeConfig
from worker.memory.budget import BudgetError, WindowPlan, parse_size, plan_expert_slots, plan_window
from worker.memory.expert_cache import Entry, choose_victim
from worker.models.llama import rope_inv_freq, rope_table, rope_table_bytes
from worker.models.moe import Predictor

MiB = 1 << 20


@pytest.mark.parametrize(("text", "expected"), [
    ("1048576", 1 << 20), ("512MiB", 512 * MiB), ("512M", 512 * MiB), ("2GiB", 2 << 30), ("2g", 2 << 30),
    ("300MB", 300_000_000), ("1.5GiB", 3 << 29), ("64 KiB", 64 << 10), ("7b", 7),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-1GiB", "1,5GiB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(BudgetError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(("blocks", "budget", "reserved", "expected"), [
    ([10, 20, 10, 20], None, 5, WindowPlan(True, 4, 0)),  # no budget: resident
    ([10, 20, 10, 20], 65, 5, WindowPlan(True, 4, 0)),  # fits exactly
    ([10, 20, 10, 20], 64, 5, WindowPlan(False, 2, 20)),  # one byte short: a window of 2 x 20
    ([10, 20, 10, 20, 10, 20], 70, 5, WindowPlan(False, 3, 20)),
    ([10, 20] * 100, 1005, 5, WindowPlan(False, 50, 20)),
    ([10, 20] * 3, 10_000, 9_950, WindowPlan(False, 2, 20)),  # the KV cache takes most of it
])
def test_plan_window(blocks: list[int], budget: int | None, reserved: int, expected: WindowPlan) -> None:
    assert plan_window(blocks, budget, reserved) == expected


@pytest.mark.parametrize(("blocks", "budget", "reserved"), [
    ([10, 20, 10, 20], 44, 5),  # room for 1.95 blocks
    ([10, 20, 10, 20], 5, 5),  # nothing left after the KV cache
    ([10, 20, 10, 20], 3, 5),  # not even the KV cache
])
def test_plan_window_too_small_says_the_minimum(blocks: list[int], budget: int, reserved: int) -> None:
    with pytest.raises(BudgetError, match=r"at least 2 blocks.*\(45 bytes\)"):
        plan_window(blocks, budget, reserved)


@pytest.mark.parametrize(("size", "total", "budget", "minimum", "expected"), [
    (100, 64, None, 2, 64), (100, 64, 6400, 2, 64), (100, 64, 6399, 2, 63), (100, 64, 250, 2, 2),
])
def test_plan_expert_slots(size: int, total: int, budget: int | None, minimum: int, expected: int) -> None:
    assert plan_expert_slots(size, total, budget, minimum) == expected


def test_plan_expert_slots_too_small() -> None:
    with pytest.raises(BudgetError, match="at least 2 experts"):
        plan_expert_slots(100, 64, 199, 2)


def _entry(layer: int, expert: int, last_use: int, uses: int) -> Entry:
    return Entry((layer, expert), buffer=0, fields={}, last_use=last_use, uses=uses)


# Model at layer 2 of 4. Entries: (layer, expert, last_use, uses).
ENTRIES = [(1, 0, 9, 5), (3, 1, 1, 1), (2, 2, 2, 1), (1, 3, 8, 1)]


@pytest.mark.parametrize(("policy", "layer", "expected"), [
    ("lru", 2, (3, 1)),  # least recent, although layer 3 comes next
    ("distance", 2, (1, 3)),  # layer 1 is farthest ahead from 2; of its two, the less used
    ("distance", 0, (3, 1)),  # from layer 0, layer 3 is the farthest
    ("distance", 3, (2, 2)),
])
def test_choose_victim(policy: str, layer: int, expected: tuple[int, int]) -> None:
    victim = choose_victim([_entry(*e) for e in ENTRIES], layer, 4, policy)
    assert victim is not None and victim.key == expected


def test_choose_victim_without_candidates() -> None:
    assert choose_victim([], 0, 4, "distance") is None


def _predictor(mode: str) -> Predictor:
    # Router of layer 1 sends any hidden state with a positive first feature to experts 2 and 3.
    router = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # (E=4, d=2)
    return Predictor({0: router, 1: router}, {0: torch.ones(2), 1: torch.ones(2)}, 1e-6, top_k=2, mode=mode)


def test_temporal_predictor_repeats_the_layers_last_experts() -> None:
    hidden = torch.tensor([[1.0, 0.5]])
    predictor = _predictor("temporal")
    assert predictor.predict(1, hidden) == {2, 3}  # nothing seen yet: the router's guess
    predictor.observe(1, {0, 1})
    assert predictor.predict(1, hidden) == {0, 1}
    assert predictor.next_layer(1) == 0  # wraps to the next step's first MoE layer


def test_router_predictor_ignores_history() -> None:
    predictor = _predictor("router")
    predictor.observe(1, {0, 1})
    assert predictor.predict(1, torch.tensor([[1.0, 0.5]])) == {2, 3}


def test_unknown_predictor_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown expert predictor"):
        _predictor("oracle")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_table_bytes_is_what_the_tables_take(dtype: torch.dtype) -> None:
    """The budget reserves ``rope_table_bytes`` for the tables a rank builds (cos and sin)."""
    cos, sin = rope_table(rope_inv_freq(RopeConfig(theta=10000.0), 16), 100, dtype)
    assert cos.nbytes + sin.nbytes == rope_table_bytes(100, 16, dtype)


def test_a_bad_size_on_the_command_line_says_what_a_size_looks_like(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from worker.memory.budget import size_argument

    parser = argparse.ArgumentParser(prog="edgellm")
    parser.add_argument("--memory-budget", type=size_argument)
    assert parser.parse_args(["--memory-budget", "512MiB"]).memory_budget == 512 << 20
    with pytest.raises(SystemExit):
        parser.parse_args(["--memory-budget", "abc"])
    err = capsys.readouterr().err
    assert "not a size: 'abc' (expected e.g. 2GiB" in err and "parse_size" not in err
