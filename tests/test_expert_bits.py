"""``edgellm shard --expert-bits auto``: per-expert widths planned by importance within a byte
budget, written into the rank files and the manifest, served (resident and through a small
expert cache) with the same logits, and close to the float model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_quant import _shard
from tests.test_streaming import _run
from tests.tiny_models import build_checkpoint
from worker.config import ModelConfig
from worker.kernels.quant import block_bits
from worker.shards.expert_bits import measure_experts, parse_budget, plan_expert_bits
from worker.shards.shard_file import ShardFile
from worker.shards.sharding import plan_shards
from worker.shards.weights import SHARD_MANIFEST, expert_block, rank_shard_path

# (bytes, error) per width of four equal-sized experts whose int4 errors differ
MEASURED = {(0, e): {4: (100, err), 8: (200, err / 16), 32: (800, 0.0)}
            for e, err in enumerate([0.10, 0.40, 0.20, 0.30])}


@pytest.mark.parametrize(("budget", "frequency", "int8"), [
    (400, None, set()),  # all int4 fits exactly
    (550, None, {1}),  # room for one upgrade: the largest int4 error
    (600, None, {1, 3}),  # the budget is inclusive
    (10_000, None, {0, 1, 2, 3}),
    (600, {(0, 1): 0.0, (0, 3): 0.1, (0, 0): 1.0, (0, 2): 1.0}, {0, 2}),  # never-routed experts stay int4
])
def test_plan_upgrades_the_most_important_experts_within_the_budget(budget: int, frequency: dict | None,
                                                                    int8: set[int]) -> None:
    bits = plan_expert_bits(MEASURED, budget, frequency)
    assert {e for (_, e), b in bits.items() if b == 8} == int8
    assert sum(MEASURED[k][b][0] for k, b in bits.items()) <= budget


def test_a_budget_below_int4_is_refused() -> None:
    with pytest.raises(ValueError, match="below the experts' size in int4"):
        plan_expert_bits(MEASURED, 399)


def test_budget_is_a_share_of_float_bytes_or_a_size() -> None:
    assert parse_budget("25%", 1000) == 250
    assert parse_budget("1KiB", 1000) == 1024


def test_shard_with_auto_expert_bits(tmp_path: Path) -> None:
    model = build_checkpoint(tmp_path / "moe", "qwen3_moe", moe_intermediate_size=64)
    config = ModelConfig.from_dir(model)
    measured = measure_experts(str(model), 32)
    float_bytes = sum(m[32][0] for m in measured.values())
    int4, int8 = (sum(m[b][0] for m in measured.values()) for b in (4, 8))
    budget = (int4 + int8) // 2
    shard_dir = _shard(model, tmp_path / "auto", "--expert-bits", "auto", "--expert-budget", str(budget),
                       "--group-size", "32")
    manifest = json.loads((shard_dir / SHARD_MANIFEST).read_text())
    planned = {tuple(map(int, k.split("."))): b for k, b in manifest["expert_bits"].items()}
    assert set(planned.values()) == {4, 8} and len(planned) == len(measured)
    file = ShardFile(rank_shard_path(shard_dir, plan_shards(config, [1.0])[0]))
    written = 0
    for (layer, expert), bits in planned.items():
        assert block_bits(file.read(expert_block(layer, expert))) == {bits}
        written += file.block_bytes(expert_block(layer, expert))
    file.close()
    assert int4 <= written <= budget < float_bytes / 4
    errors = sorted(measured, key=lambda k: measured[k][4][1] - measured[k][8][1])
    assert planned[errors[-1]] == 8 and planned[errors[0]] == 4  # the most and least harmed by int4
    decode = [5, 9, 300, 42]
    resident, _ = _run(shard_dir, [1.0], decode)
    slot = max(measured[k][8][0] for k in measured)
    cached, stats = _run(shard_dir, [1.0], decode, expert_cache_bytes=3 * slot)
    assert torch.equal(cached, resident)  # mixed widths stream through one cache
    assert stats[0]["expert_misses"] > 0
    reference, _ = _run(_shard(model, tmp_path / "f"), [1.0], decode)
    assert (resident - reference).abs().max().item() < 0.25 * reference.abs().max().item()


def test_calibration_weighs_experts_by_their_routing(tmp_path: Path) -> None:
    """``--expert-calibration``: the router's top-k shares on a text, per layer, weigh the plan."""
    from worker.shards.expert_bits import router_frequency

    model = build_checkpoint(tmp_path / "moe", "qwen3_moe", moe_intermediate_size=64, num_experts=8)
    text = "a b"  # a few tokens: at most 2 experts each of 8 per layer, so some are never picked
    frequency = router_frequency(str(model), text)
    config = ModelConfig.from_dir(model)
    for layer in range(config.num_layers):
        shares = [frequency[(layer, e)] for e in range(config.num_experts)]
        assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0.0
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(text)
    shard_dir = _shard(model, tmp_path / "auto", "--expert-bits", "auto", "--expert-budget", "20%",
                       "--group-size", "32", "--expert-calibration", str(calibration))
    planned = json.loads((shard_dir / SHARD_MANIFEST).read_text())["expert_bits"]
    unrouted = [k for k, share in frequency.items() if share == 0.0]
    assert unrouted, "the text routes to every expert: the check below would be empty"
    assert all(planned[f"{layer}.{e}"] == 4 for layer, e in unrouted)  # never picked on the text: int4
