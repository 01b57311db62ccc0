"""The split plan is a pure function: table-driven checks of its invariants and errors. Then what
`edgellm shard` leaves in --out: the files of the split it wrote, nothing after a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import ModelConfig, RopeConfig
from worker.shards.sharding import ShardingError, apportion, parse_weights, plan_shards, split_columns
from worker.shards.weights import HUB_FILE, read_manifest


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


@pytest.mark.parametrize(("total", "weights", "expected"), [
    (5632, [1, 1, 1], [1920, 1920, 1792]),  # TinyLlama: multiples of 128 (apportion: 1878/1877/1877)
    (5632, [2, 1, 1], [2816, 1408, 1408]),
    (14336, [1, 1, 1], [4864, 4736, 4736]),  # Llama 3 8B
    (11008, [1, 1, 1, 1, 1], [2304, 2176, 2176, 2176, 2176]),  # Llama 2 7B
    (768, [1, 1, 1], [256, 256, 256]),  # the embedded model: units of 32, 8 of them a rank
    (160, [1, 1, 1], [56, 56, 48]),  # a test model: units of 8
    (48, [1, 1, 1], [16, 16, 16]),  # too few columns for 4 units of 8 a rank: any split
    (100, [1, 1], [50, 50]),  # no unit divides 100: any split
])
def test_split_columns_keeps_each_slice_a_multiple_of_the_quantization_units(
        total: int, weights: list[float], expected: list[int]) -> None:
    assert split_columns(total, weights) == expected


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

    from worker.rank.service import shard_from_proto, shard_to_proto

    config = ModelConfig.from_dir(checkpoints(arch))
    for shard in plan_shards(config, [2.0, 1.0, 1.0]):
        back = shard_from_proto(shard_to_proto(shard), shard.group_size)
        assert back == shard
        if arch == "qwen2_moe":
            assert all(getattr(shard, f.name) != f.default for f in dataclasses.fields(shard)
                       if f.default is not dataclasses.MISSING), "a plan whose every field differs from its default"


def _shard_cli(model: Path, out: Path, ranks: int, *args: str) -> int:
    from server.cli import main as edgellm_main

    return edgellm_main(["shard", "--model", str(model), "--ranks", str(ranks), "--out", str(out), *args])


def test_resharding_into_a_directory_removes_the_other_splits_rank_files(checkpoints, tmp_path: Path) -> None:
    """`shard --ranks 2` then `--ranks 1` into the same --out: only the 1-rank files remain (and the
    manifest lists only them); files that are not rank files are the user's and stay."""
    model, out = checkpoints("llama"), tmp_path / "shards"
    assert _shard_cli(model, out, 2) == 0
    assert sorted(p.name for p in out.glob("rank-*")) == ["rank-00-of-02.safetensors", "rank-01-of-02.safetensors"]
    (out / "rank-00-of-02.safetensors.partial").write_bytes(b"an interrupted run's")
    mine = ["notes.txt", "rank-notes.txt", "old-rank-01-of-02.safetensors", "rank-01-of-02.safetensors.bak"]
    for name in mine:
        (out / name).write_text("the user's")

    assert _shard_cli(model, out, 1) == 0
    assert sorted(p.name for p in out.glob("rank-*-of-*.safetensors*")) == ["rank-00-of-01.safetensors",
                                                                               "rank-01-of-02.safetensors.bak"]
    assert all((out / name).read_text() == "the user's" for name in mine)
    manifest = read_manifest(out)
    assert manifest["world_size"] == 1 and [s["file"] for s in manifest["shards"]] == ["rank-00-of-01.safetensors"]
    assert sorted(manifest["sha256"]) == [HUB_FILE, "rank-00-of-01.safetensors"]


def test_a_failed_shard_run_leaves_no_directory_it_created(checkpoints, tmp_path: Path) -> None:
    """int4 in groups of 64 is refused mid-run (the MLP's 160 columns are not a multiple of 64):
    the --out it made (parents included) is gone; an --out that existed keeps the user's files."""
    model = checkpoints("llama")
    refused = ("--quantize", "int4", "--group-size", "64")
    assert _shard_cli(model, tmp_path / "new" / "shards", 1, *refused) == 2
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's")
    assert _shard_cli(model, existing, 1, *refused) == 2
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_a_failure_after_the_rank_files_takes_them_back(checkpoints, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while the hub file is written, after every rank file is complete: nothing is left."""
    from worker.shards import shard_writer

    def broken_hub(*args: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(shard_writer, "load_hub_weights", broken_hub)
    model = checkpoints("llama")
    with pytest.raises(OSError, match="No space left"):
        shard_writer.write_shards(model, plan_shards(ModelConfig.from_dir(model), [1.0, 1.0]), tmp_path / "out",
                                  progress=False)
    assert list(tmp_path.iterdir()) == []
