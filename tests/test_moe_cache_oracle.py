"""bench/moe_cache.py's oracle: perfect guesses replayed from an all-resident decode of the same
tokens, the ceiling that prefetch's numbers are read against. It must be right every time, leave
the output's bits alone, and refuse a decode that leaves its recording."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import moe_cache  # noqa: E402

from worker.config import ModelConfig  # noqa: E402
from worker.shards.shard_file import ShardFile  # noqa: E402
from worker.shards.shard_writer import write_shards  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402
from worker.shards.weights import expert_block, rank_shard_path  # noqa: E402

TOKENS = 6  # decode steps per sequence


@pytest.fixture(scope="module")
def mixtral_shard(checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = checkpoints("mixtral")
    config = ModelConfig.from_dir(model)
    return write_shards(model, plan_shards(config, [1.0]), tmp_path_factory.mktemp("oracle"), progress=False)


def _sequences(offset: int) -> list[list[int]]:
    return [[(offset + 7 * i + 3 * s) % 200 + 1 for i in range(moe_cache.PROMPT_TOKENS + TOKENS)] for s in range(2)]


def _two_experts(shard_dir: Path) -> int:
    config = ModelConfig.from_dir(shard_dir)
    file = ShardFile(rank_shard_path(shard_dir, plan_shards(config, [1.0])[0]))
    try:
        return 2 * max(file.block_bytes(expert_block(m, e)) for m in range(config.num_layers)
                       for e in range(config.num_experts) if file.has(expert_block(m, e)))
    finally:
        file.close()


def test_the_oracle_guesses_every_expert_right_and_changes_no_bit(mixtral_shard: Path) -> None:
    sequences = _sequences(0)
    cache = _two_experts(mixtral_shard)
    oracle = moe_cache.run(mixtral_shard, sequences, cache, "distance", True, "oracle", False)
    on_demand = moe_cache.run(mixtral_shard, sequences, cache, "distance", False, "temporal")
    assert oracle["precision"] == 1.0 and oracle["recall"] == 1.0
    assert oracle["prefetches_per_token"] > 0
    assert oracle["argmax"] == on_demand["argmax"]


def test_the_oracle_refuses_a_decode_other_than_the_one_it_recorded(mixtral_shard: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = moe_cache.routing_trace(mixtral_shard, _sequences(50))
    monkeypatch.setattr(moe_cache, "routing_trace", lambda shard_dir, sequences: recorded)
    with pytest.raises(RuntimeError, match="left the recorded routing"):
        moe_cache.run(mixtral_shard, _sequences(0), _two_experts(mixtral_shard), "distance", True, "oracle", False)
