"""The vocab-parallel LM head (``worker.rank.head``): every rank projects the final hidden states
onto its own rows of the head and the hub gathers the logits. They must be the bits the whole head
gives on the hub (what edgellm computed before), for every family, tied and untied heads, float
and int8 heads, 2 and 3 ranks with uneven weights; the coordinator holds only its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.harness import inprocess_cluster
from worker.config import CheckpointError, ModelConfig
from worker.kernels import native
from worker.kernels.quant import QuantSpec, QuantWeight, Weight, linear, quantize_int8
from worker.models.llama import rms_norm
from worker.rank.executor import Executor
from worker.rank.step import SeqSpan
from worker.shards.checkpoint import Checkpoint
from worker.shards.shard_file import ShardFile
from worker.shards.shard_writer import write_shards
from worker.shards.sharding import plan_shards, split_vocab
from worker.shards.weights import (
    HEAD_BLOCK,
    HUB_FILE,
    SHARD_MANIFEST,
    head_is_tied,
    load_hub,
    rank_shard_path,
)

RANK_WEIGHTS = {2: [1.0, 1.0], 3: [2.0, 1.0, 1.0]}
PROMPT = [1, 17, 42, 99, 7, 250, 31, 5, 64, 128, 3, 77, 200, 11]
DECODE = [5, 300, 12, 99]


def _whole_head(model_dir: Path, int8: bool) -> tuple[torch.Tensor, Weight]:
    """The final norm and the whole LM head as the hub held it before the split: the checkpoint's
    fp32 head (the embedding when tied), or its int8 per output row (``quantize_lm_head``)."""
    with Checkpoint(model_dir) as ckpt:
        head = ckpt.get("model.embed_tokens.weight" if head_is_tied(ckpt) else "lm_head.weight").float()
        norm = ckpt.get("model.norm.weight").float()
    return norm, QuantWeight(*quantize_int8(head), 0) if int8 else head


def _run(executor: Executor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(final hidden rows, gathered logits) of a prefill with every token's logits, a two-sequence
    prefill with each one's last, single-token decode steps and a batched decode step."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    logits_of = executor._logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        out = logits_of(hidden)
        seen.append((hidden.clone(), out))
        return out

    executor._logits = recording  # type: ignore[method-assign]
    executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))], all_logits=True)
    executor.step([PROMPT[:5], PROMPT[5:9]], [SeqSpan(1, 0, 5), SeqSpan(2, 0, 4)])
    for i, token in enumerate(DECODE):
        executor.step([[token]], [SeqSpan(0, len(PROMPT) + i, 1)])
    executor.step([[7], [8]], [SeqSpan(1, 5, 1), SeqSpan(2, 4, 1)])
    return seen


def _dot_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(R, V): the error of x @ w.T in float32 summed in any order, gamma_d |x| @ |w|.T (Higham 3.5)."""
    d_unit = x.shape[-1] * 2.0 ** -24
    gamma = d_unit / (1 - d_unit)
    return gamma * (x.abs().double() @ w.abs().double().T).float()


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "mixtral", "qwen2_moe", "olmoe"])
def test_gathered_logits_are_the_bits_of_the_whole_head(checkpoints, tmp_path: Path, arch: str, ranks: int) -> None:
    """From the checkpoint (float head) and from int8 shards (int8 head): the gathered (R, V)
    logits equal the whole head applied on one machine to the same final hidden states, bit for
    bit; the rows are each span's last token, or every token when asked."""
    model = checkpoints(arch)
    config = ModelConfig.from_dir(model)
    weights = RANK_WEIGHTS[ranks]
    shards = tmp_path / "int8"
    # qwen2_moe's shared expert (80 columns) splits 40/20/20: int8 needs multiples of 8, so there
    # only the head is quantized
    quant = QuantSpec(None, lm_head_bits=8) if (arch, ranks) == ("qwen2_moe", 3) else QuantSpec(8)
    write_shards(model, plan_shards(config, weights), shards, quant=quant, progress=False)
    for model_dir, int8 in ((model, False), (shards, True)):
        norm, head = _whole_head(model, int8)
        with inprocess_cluster(model_dir, weights) as executor:
            seen = _run(executor)
        assert [h.shape[0] for h, _ in seen] == [len(PROMPT), 2, 1, 1, 1, 1, 2]
        for hidden, logits in seen:
            x = rms_norm(hidden, norm, config.rms_norm_eps)  # (R, d)
            expected = linear(x, head).float()  # (R, V)
            assert logits.shape == (hidden.shape[0], config.vocab_size)
            if int8 or native.f32_mm() is not None:  # each output row's sum in the same order
                assert torch.equal(logits, expected), f"{arch}, {ranks} ranks, int8 head {int8}"
            else:  # torch's BLAS (no native kernels: ATEN_CPU_CAPABILITY=default here) orders a
                # row's sum by the matrix's shape: both within the float32 dot-product error bound
                assert torch.all((logits - expected).abs() <= 2 * _dot_error_bound(x, head)), \
                    f"{arch}, {ranks} ranks: {(logits - expected).abs().max()}"


@pytest.mark.parametrize("arch", ["llama", "llama3"])
def test_the_coordinator_holds_only_its_rows_of_the_head(checkpoints, tmp_path: Path, arch: str) -> None:
    """Rank 0 (in the coordinator) holds rows ``vocab_rows`` of the head and no other head bytes:
    int8 rows and their scales for int8 shards; a tied float head is a view of the embedding
    (no bytes of its own); an untied one its own rows only."""
    model = checkpoints(arch)
    config = ModelConfig.from_dir(model)
    weights = RANK_WEIGHTS[3]
    shards = plan_shards(config, weights)
    assert [s.vocab_width for s in shards] == split_vocab(config.vocab_size, weights)
    assert shards[0].vocab_width < config.vocab_size
    d = config.hidden_size
    int8_dir = tmp_path / "int8"
    write_shards(model, shards, int8_dir, quant=QuantSpec(8), progress=False)
    for model_dir, int8 in ((model, False), (int8_dir, True)):
        with inprocess_cluster(model_dir, weights) as executor:
            head = executor.rank.head
            assert vars(executor.weights).keys() == {"embed"}  # the hub keeps no head of its own
            assert head.rows == shards[0].vocab_width
            if int8:
                assert isinstance(head.weight, QuantWeight) and head.weight.weight.dtype == torch.int8
                assert head.nbytes() == head.rows * d + head.rows * 2 + d * 4  # int8 rows, bf16 scales, norm
            elif config.tie_word_embeddings:
                embed = executor.weights.embed
                assert isinstance(head.weight, torch.Tensor)
                assert head.weight.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()
            else:
                assert isinstance(head.weight, torch.Tensor) and head.weight.shape == (head.rows, d)
                assert head.weight.untyped_storage().nbytes() == head.rows * d * 4


def test_rank_files_hold_their_rows_and_the_hub_file_only_the_embedding(checkpoints, tmp_path: Path) -> None:
    """`edgellm shard`: each rank file's ``head`` block holds the final norm and its rows of the
    head, which put together are the whole head (int8: its per-row quantization, bit for bit;
    ``--lm-head float``: the checkpoint's values); ``hub.safetensors`` the embedding alone."""
    model = checkpoints("llama")
    config = ModelConfig.from_dir(model)
    shards = plan_shards(config, RANK_WEIGHTS[3])
    whole = _whole_head(model, int8=False)[1]
    assert isinstance(whole, torch.Tensor)
    for quant, name in ((QuantSpec(8), "int8"), (QuantSpec(8, lm_head_bits=None), "float")):
        out = tmp_path / name
        write_shards(model, shards, out, quant=quant, progress=False)
        parts = []
        for shard in shards:
            file = ShardFile(rank_shard_path(out, shard))
            parts.append(file.read(HEAD_BLOCK))
            file.close()
        rows = torch.cat([p["lm_head"] for p in parts])
        if name == "int8":
            q, scales = quantize_int8(whole)
            assert torch.equal(rows, q) and torch.equal(torch.cat([p["lm_head.scales"] for p in parts]), scales)
        else:
            assert torch.equal(rows, whole) and all("lm_head.scales" not in p for p in parts)
        assert [p["lm_head"].shape[0] for p in parts] == [s.vocab_width for s in shards]
        hub = ShardFile(out / HUB_FILE)
        assert list(hub.blocks) == ["embed"]
        hub.close()


def test_a_shard_directory_without_head_rows_is_refused_with_the_command_that_rewrites_it(
        checkpoints, tmp_path: Path) -> None:
    """Format 2 (the whole head in ``hub.safetensors``, none in the rank files) is refused, the
    message naming the `edgellm shard` flags it was written with."""
    model = checkpoints("llama")
    config = ModelConfig.from_dir(model)
    out = tmp_path / "old"
    write_shards(model, plan_shards(config, [2.0, 1.0]), out, quant=QuantSpec(4, group_size=32), progress=False,
                 weights=[2.0, 1.0])
    manifest = json.loads((out / SHARD_MANIFEST).read_text())
    manifest["format"] = 2
    (out / SHARD_MANIFEST).write_text(json.dumps(manifest))
    command = f"edgellm shard --model CHECKPOINT --ranks 2 --quantize int4 --group-size 32 --weights 2,1 --out {out}"
    with pytest.raises(CheckpointError, match="no LM head rows") as refused:
        load_hub(out, torch.float32)
    assert command in str(refused.value)
    with pytest.raises(CheckpointError, match="format 2") as refused:
        rank_shard_path(out, plan_shards(config, [2.0, 1.0])[1])
    assert command in str(refused.value)


# Recorded from the served 2-rank embedded model before the head was split (the whole head on the
# coordinator, commit df9250a), with this prompt, greedy, in each dtype: the split changes no token.
SERVED_PROMPT = "The json module"
SERVED_TEXT = " is used to create a class object."


@pytest.mark.cluster
@pytest.mark.parametrize("quantize", ["fp32", "int8", "int4"])
def test_served_embedded_model_answers_as_before_the_split(quantize: str) -> None:
    """`edgellm serve` on the embedded model (tied head) with a local worker: the same greedy text
    as the whole head on the coordinator gave, in fp32 and quantized (int8 head rows)."""
    import httpx

    from server.cli import DEFAULT_MODEL
    from tests.processes import served

    extra = [] if quantize == "fp32" else ["--quantize", quantize, "--group-size", "32"]
    with served(DEFAULT_MODEL, "--local-workers", "1", *extra) as url:
        body = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "default_model", "prompt": SERVED_PROMPT, "max_tokens": 24, "temperature": 0}).json()
    assert body["choices"][0]["text"] == SERVED_TEXT
