"""Loading checkpoints: supported layouts work, broken ones fail with a message that says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.harness import inprocess_cluster
from tests.tiny_models import build_checkpoint, load_reference
from worker.config import CheckpointError, ModelConfig
from worker.rank.step import SeqSpan
from worker.shards.shard_writer import write_shards
from worker.shards.sharding import plan_shards

PROMPT = [1, 5, 9, 33, 2, 71, 18]


def _reference_logits(model_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_reference(model_dir)(torch.tensor([PROMPT])).logits[0]


def _our_logits(model_dir: Path, weights: list[float]) -> torch.Tensor:
    with inprocess_cluster(model_dir, weights) as executor:
        return executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))], all_logits=True)


def test_sharded_index_checkpoint(tmp_path: Path) -> None:
    model_dir = build_checkpoint(tmp_path / "m", "llama", max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert (_our_logits(model_dir, [1, 1]) - _reference_logits(model_dir)).abs().max() <= 1e-4


def test_shard_files_match_on_the_fly_slicing(checkpoints, tmp_path: Path) -> None:
    model_dir = checkpoints("qwen2")
    shards = plan_shards(ModelConfig.from_dir(model_dir), [2.0, 1.0, 1.0])
    out = write_shards(model_dir, shards, tmp_path / "shards", progress=False)
    assert sorted(p.name for p in out.glob("rank-*.safetensors")) == [
        "rank-00-of-03.safetensors", "rank-01-of-03.safetensors", "rank-02-of-03.safetensors"]
    assert torch.equal(_our_logits(out, [2, 1, 1]), _our_logits(model_dir, [2, 1, 1]))


def test_shard_dir_refuses_another_split(checkpoints, tmp_path: Path) -> None:
    model_dir = checkpoints("llama")
    write_shards(model_dir, plan_shards(ModelConfig.from_dir(model_dir), [1, 1]), tmp_path / "s", progress=False)
    with pytest.raises(CheckpointError, match="re-run `edgellm shard`"):
        _our_logits(tmp_path / "s", [2, 1])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (shutil.rmtree, "does not exist"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "model.safetensors").unlink(), "neither model.safetensors"),
    (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]), "supported: LlamaForCausalLM"),
    (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act"),
    (lambda d: _edit_config(d, hidden_size=None), "hidden_size"),
    (lambda d: _truncate(d / "model.safetensors", 5000), "model.safetensors: not a readable safetensors file"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors: not a readable safetensors"),
])
def test_malformed_directory_is_a_clear_error(checkpoints, tmp_path: Path, breakage, message: str) -> None:
    model_dir = _copy(checkpoints("llama"), tmp_path / "broken")
    breakage(model_dir)
    with pytest.raises(CheckpointError, match=message):
        _our_logits(model_dir, [1])


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_sharding_into_the_checkpoint_itself_is_refused(checkpoints, tmp_path: Path) -> None:
    model_dir = _copy(checkpoints("llama"), tmp_path / "m")
    before = sorted(p.name for p in model_dir.iterdir())
    with pytest.raises(CheckpointError, match="the checkpoint's own directory"):
        write_shards(model_dir, plan_shards(ModelConfig.from_dir(model_dir), [1.0]), model_dir, progress=False)
    assert sorted(p.name for p in model_dir.iterdir()) == before, "nothing written into the checkpoint"


def test_sharding_a_shard_directory_says_so(checkpoints, tmp_path: Path) -> None:
    model_dir = checkpoints("llama")
    shard_dir = write_shards(model_dir, plan_shards(ModelConfig.from_dir(model_dir), [1, 1]), tmp_path / "s",
                             progress=False)
    with pytest.raises(CheckpointError, match="already an edgellm shard directory"):
        write_shards(shard_dir, plan_shards(ModelConfig.from_dir(shard_dir), [1, 1]), tmp_path / "again",
                     progress=False)
    assert not (tmp_path / "again").exists(), "a refused run creates no directory"


@pytest.mark.parametrize("out", ["file", "file/below"])
def test_an_out_directory_that_cannot_be_made_is_a_clear_error(checkpoints, tmp_path: Path, out: str) -> None:
    """A file in the way (FileExistsError, NotADirectoryError) was a traceback."""
    (tmp_path / "file").write_text("x")
    model_dir = checkpoints("llama")
    with pytest.raises(CheckpointError, match="cannot create the directory"):
        write_shards(model_dir, plan_shards(ModelConfig.from_dir(model_dir), [1.0]), tmp_path / out, progress=False)
    assert (tmp_path / "file").read_text() == "x"


def _edit_config(model_dir: Path, **changes: object) -> None:
    raw = json.loads((model_dir / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    (model_dir / "config.json").write_text(json.dumps(raw))


def test_old_style_rope_scaling_keys_parse() -> None:
    cfg = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    })
    assert cfg.rope.theta == 500000.0 and cfg.rope.rope_type == "llama3" and cfg.rope.factor == 8.0
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16
