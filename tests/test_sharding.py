"""The split plan is a pure function: table-driven checks of its invariants and errors."""

from __future__ import annotations

import pytest

from worker.config import ModelConfig, RopeConfig
from worker.sharding import ShardingError, apportion, parse_weights, plan_shards


def _config(kv_heads: int = 4, heads: int = 8, intermediate: int = 160) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=intermediate,
                       num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=8, vocab_size=100,
                       rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0), max_position_embeddings=64,
                       tie_word_embeddings=False, attention_bias=False, o_bias=False, mlp_bias=False,
                       sliding_window=None)


@pytest.mark.parametrize(("total", "weights", "expected"), [
    (4, [1], [4]),
    (4, [1, 1], [2, 2]),
    (4, [2, 1, 1], [2, 1, 1]),
    (4, [1, 1, 1], [2, 1, 1]),  # remainder goes to the lowest rank
    (160, [2, 1, 1], [80, 40, 40]),
    (160, [1, 1, 1], [54, 53, 53]),
    (5, [100, 1], [4, 1]),  # every rank keeps at least one
    (8, [1, 1, 1, 1], [2, 2, 2, 2]),
])
def test_apportion(total: int, weights: list[float], expected: list[int]) -> None:
    assert apportion(total, weights) == expected


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_plan_covers_every_head_and_column_once(ranks: int) -> None:
    shards = plan_shards(_config(), [1.0] * ranks)
    assert [s.rank for s in shards] == list(range(ranks))
    assert shards[0].kv_heads[0] == 0 and shards[-1].kv_heads[1] == 4
    assert shards[0].mlp_columns[0] == 0 and shards[-1].mlp_columns[1] == 160
    for left, right in zip(shards, shards[1:], strict=False):
        assert left.kv_heads[1] == right.kv_heads[0]  # half-open, contiguous
        assert left.mlp_columns[1] == right.mlp_columns[0]
    assert sum(s.num_q_heads for s in shards) == 8


def test_uneven_weights_give_uneven_split() -> None:
    shards = plan_shards(_config(), [2.0, 1.0, 1.0])
    assert [s.num_kv_heads for s in shards] == [2, 1, 1]
    assert [s.q_heads for s in shards] == [(0, 4), (4, 6), (6, 8)]
    assert [s.mlp_width for s in shards] == [80, 40, 40]


def test_more_ranks_than_kv_heads_is_a_clear_error() -> None:
    with pytest.raises(ShardingError, match="at most 4 ranks"):
        plan_shards(_config(), [1.0] * 5)


@pytest.mark.parametrize(("text", "world", "message"), [
    ("2,1", 3, "has 2 entries"),
    ("2,x,1", 3, "comma-separated numbers"),
    ("1,0,1", 3, "must be positive"),
])
def test_bad_weights(text: str, world: int, message: str) -> None:
    with pytest.raises(ShardingError, match=message):
        plan_shards(_config(), parse_weights(text, world))


@pytest.mark.parametrize("arch", ["qwen2_moe", "llama"])
def test_every_field_of_a_rank_shard_survives_the_control_plane(checkpoints, arch: str) -> None:
    """The coordinator tells each worker its shard over gRPC; a field the proto drops arrives as
    its default (MoE expert columns (0, 0) once made every worker compute nothing of its experts)."""
    import dataclasses

    from worker.service import shard_from_proto, shard_to_proto

    config = ModelConfig.from_dir(checkpoints(arch))
    for shard in plan_shards(config, [2.0, 1.0, 1.0]):
        back = shard_from_proto(shard_to_proto(shard), shard.group_size)
        assert back == shard
        if arch == "qwen2_moe":
            assert all(getattr(shard, f.name) != f.default for f in dataclasses.fields(shard)
                       if f.default is not dataclasses.MISSING), "a plan whose every field differs from its default"
