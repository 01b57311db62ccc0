"""MoE logits against transformers' (eager experts) for 1, 2 and 3 ranks, through prefill and
decode, with all experts resident and with an expert cache smaller than one layer's experts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.harness import inprocess_cluster
from tests.tiny_models import MOE_ARCHS, load_reference
from worker.config import ModelConfig
from worker.memory import expert_cache
from worker.models.moe import MoeRankModel, route
from worker.rank.step import SeqSpan
from worker.shards.shard_writer import write_shards
from worker.shards.sharding import plan_shards

RANK_WEIGHTS = {1: [1.0], 2: [1.0, 1.0], 3: [2.0, 1.0, 1.0]}
PROMPT = [1, 17, 42, 99, 7, 250, 31, 5, 64, 128, 3, 77, 200, 11]
DECODE_STEPS = 8
TOL = 1e-4


def _reference(model_dir: Path, seed: int) -> tuple[list[int], torch.Tensor]:
    reference = load_reference(model_dir)
    torch.manual_seed(seed)
    decode = torch.randint(3, reference.config.vocab_size, (DECODE_STEPS,)).tolist()
    with torch.no_grad():
        return decode, reference(torch.tensor([PROMPT + decode])).logits[0]  # (T, V)


def _ours(model_dir: Path, weights: list[float], decode: list[int], **spec: object) -> torch.Tensor:
    with inprocess_cluster(model_dir, weights, **spec) as executor:  # type: ignore[arg-type]
        got = [executor.step([PROMPT], [SeqSpan(slot=1, start=0, length=len(PROMPT))], all_logits=True)]
        for i, token in enumerate(decode):
            got.append(executor.step([[token]], [SeqSpan(slot=1, start=len(PROMPT) + i, length=1)]))
        return torch.cat(got)


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_logits_match_transformers(checkpoints, arch: str, ranks: int) -> None:
    model_dir = checkpoints(arch)
    decode, expected = _reference(model_dir, ranks)
    ours = _ours(model_dir, RANK_WEIGHTS[ranks], decode)
    diff = (ours - expected).abs().max().item()
    assert diff <= TOL, f"{arch} with {ranks} ranks: max abs logit diff {diff}"


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_logits_match_with_a_small_expert_cache(checkpoints, tmp_path: Path, arch: str, ranks: int) -> None:
    """3 expert buffers per rank for 4 experts per layer: every layer evicts and reloads."""
    model_dir = checkpoints(arch)
    config = ModelConfig.from_dir(model_dir)
    weights = RANK_WEIGHTS[ranks]
    shard_dir = write_shards(model_dir, plan_shards(config, weights), tmp_path / "shards", progress=False)
    decode, expected = _reference(model_dir, ranks)
    # Rank 0 holds the most columns, so its expert size bounds every rank's.
    d, width = config.hidden_size, plan_shards(config, weights)[0].expert_columns
    expert_bytes = 3 * d * (width[1] - width[0]) * 4
    ours = _ours(shard_dir, weights, decode, expert_cache_bytes=3 * expert_bytes)
    diff = (ours - expected).abs().max().item()
    assert diff <= TOL, f"{arch} with {ranks} ranks and a 3-expert cache: max abs logit diff {diff}"


@pytest.mark.parametrize(("predictor", "gated"), [("router", True), ("input", True), ("adaptive", True),
                                                  ("union", True), ("temporal", False), ("adaptive", False),
                                                  ("union", False)])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_logits_match_with_every_predictor(checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               arch: str, predictor: str, gated: bool) -> None:
    """The expert predictor and the prefetch gate change what is read ahead (and cancelled),
    never the math."""
    monkeypatch.setattr(expert_cache, "GATED", gated)  # the cache reads it when built
    model_dir = checkpoints(arch)
    config = ModelConfig.from_dir(model_dir)
    weights = RANK_WEIGHTS[2]
    shard_dir = write_shards(model_dir, plan_shards(config, weights), tmp_path / "shards", progress=False)
    decode, expected = _reference(model_dir, 2)
    d, width = config.hidden_size, plan_shards(config, weights)[0].expert_columns
    ours = _ours(shard_dir, weights, decode, expert_cache_bytes=3 * 3 * d * (width[1] - width[0]) * 4,
                 expert_predictor=predictor)
    diff = (ours - expected).abs().max().item()
    assert diff <= TOL, f"{arch}, {predictor} predictor, gated {gated}: max abs logit diff {diff}"


@pytest.mark.parametrize("ranks", [1, 2])
def test_streamed_experts_give_the_bits_of_resident_ones(checkpoints, tmp_path: Path, ranks: int) -> None:
    """The cache hands experts over in the order they land (a miss first, then the cached ones), but
    their outputs are summed in one order: a streamed run gives the same logits, bit for bit, as
    all experts resident. Three experts per token, so that the order of a sum can change its bits."""
    model_dir = tmp_path / "top3"
    shutil.copytree(checkpoints("mixtral"), model_dir)
    config_json = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config_json | {"num_experts_per_tok": 3}))
    config = ModelConfig.from_dir(model_dir)
    weights = RANK_WEIGHTS[ranks]
    shard_dir = write_shards(model_dir, plan_shards(config, weights), tmp_path / "shards", progress=False)
    decode, _ = _reference(model_dir, ranks)
    d, width = config.hidden_size, plan_shards(config, weights)[0].expert_columns
    resident = _ours(shard_dir, weights, decode)
    streamed = _ours(shard_dir, weights, decode, expert_cache_bytes=6 * 3 * d * (width[1] - width[0]) * 4)
    assert torch.equal(resident, streamed)


@pytest.mark.parametrize("streamed", [False, True])
def test_the_one_token_path_gives_the_bits_of_the_many_token_path(checkpoints, tmp_path: Path, streamed: bool) -> None:
    """A decode step's experts skip the per-expert token lookup (``_one_token_experts``); its products
    and sums are those of the general path, in the same order, so the same bits. Three experts per
    token, routed at random, at every MoE layer, with the experts resident and streamed."""
    model_dir = tmp_path / "top3"
    shutil.copytree(checkpoints("mixtral"), model_dir)
    config_json = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config_json | {"num_experts_per_tok": 3}))
    config = ModelConfig.from_dir(model_dir)
    shard_dir = write_shards(model_dir, plan_shards(config, [1.0]), tmp_path / "shards", progress=False)
    width = plan_shards(config, [1.0])[0].expert_columns
    cache = 6 * 3 * config.hidden_size * (width[1] - width[0]) * 4 if streamed else None
    torch.manual_seed(0)
    with inprocess_cluster(shard_dir, [1.0], expert_cache_bytes=cache) as executor:
        model = executor.model
        assert isinstance(model, MoeRankModel)
        for layer in (m for m in range(config.num_layers) if config.is_moe_layer(m)):
            for _ in range(4):
                x = torch.randn(1, config.hidden_size)
                weights, ids = route(x, torch.randn(config.num_experts, config.hidden_size), 3, renormalize=True)
                needed = sorted(set(ids.flatten().tolist()))
                many = model._experts(layer, x, weights, ids, model.experts.begin_layer(layer, needed), needed)
                one = model._one_token_experts(layer, x, weights, ids, model.experts.begin_layer(layer, needed), needed)
                assert torch.equal(many, one)
                assert not torch.equal(many, torch.zeros_like(many))


@pytest.mark.parametrize(("policy", "after_the_misses"), [("distance", True), ("lru", False), ("frequency", False)])
def test_the_next_layers_guess_waits_for_the_misses_to_start_where_the_policy_spares_that_layer(
        checkpoints, tmp_path: Path, policy: str, after_the_misses: bool) -> None:
    """Between a layer's routing and its misses' reads the disk idles, so the guess for the next
    layer (a routing of its own) comes after ``begin_layer`` where the policy evicts the next
    layer's experts last anyway (distance); where it may evict them first (lru, frequency), the
    guess comes before, so that ``keep`` spares them from the misses."""
    model_dir = checkpoints("mixtral")
    config = ModelConfig.from_dir(model_dir)
    shard_dir = write_shards(model_dir, plan_shards(config, [1.0]), tmp_path / "shards", progress=False)
    d, width = config.hidden_size, plan_shards(config, [1.0])[0].expert_columns
    begun: list[bool] = []  # per guess: whether the layer computing had begun (its misses reading)
    with inprocess_cluster(shard_dir, [1.0], expert_cache_bytes=3 * 3 * d * (width[1] - width[0]) * 4,
                           expert_policy=policy, expert_predictor="router") as executor:
        model = executor.model
        assert isinstance(model, MoeRankModel) and model.predictor is not None
        predict = model.predictor.predict

        def spy(layer: int, hidden: torch.Tensor) -> set[int]:
            begun.append(model.experts._in_layer)
            return predict(layer, hidden)

        model.predictor.predict = spy  # type: ignore[method-assign]
        executor.step([PROMPT], [SeqSpan(slot=1, start=0, length=len(PROMPT))])
        executor.step([[5]], [SeqSpan(slot=1, start=len(PROMPT), length=1)])
    assert len(begun) == 2 * config.num_layers  # a guess at every MoE layer of both steps
    assert set(begun) == {after_the_misses}
