"""Quantized routed experts streamed through a small expert cache compute what the same shard's
experts compute all resident, bit for bit, and close to transformers: int8 experts, int4 experts
(``--expert-bits 4``) and a mix of both (``--expert-bits auto``), with the native kernels and
without (torch's kernels, the path of a CPU without ours).

The cache reads an expert's bytes into one of its buffers as they lie in the file (edgellm's int4
layout); without a native int4 kernel they must be converted for torch's once, as every other
block read from a shard is (``kernel_layout``), not at every product."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_quant import PROMPT, _shard
from tests.test_streaming import _run
from tests.tiny_models import build_checkpoint, load_reference
from worker.config import ModelConfig
from worker.kernels import native, quant
from worker.kernels.quant import block_bits
from worker.shards.shard_file import ShardFile
from worker.shards.sharding import plan_shards
from worker.shards.weights import expert_block, rank_shard_path

DECODE = [5, 9, 300, 42]
FLAGS = {
    "int8": ("--quantize", "int8"),
    "int4_experts": ("--quantize", "int8", "--expert-bits", "4", "--group-size", "32"),
    "auto": ("--expert-bits", "auto", "--expert-budget", "18%", "--group-size", "32"),
}


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("moe"), "qwen3_moe", moe_intermediate_size=64)


@pytest.mark.parametrize("native_kernels", [True, False])
@pytest.mark.parametrize("kind", list(FLAGS))
def test_streamed_quantized_experts_equal_resident_ones(moe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        kind: str, native_kernels: bool) -> None:
    if not native_kernels:
        for kernel in ("int8_mm", "int4_mm"):
            monkeypatch.setitem(native._loaded, kernel, None)
    per_product = []  # int4 products on a matrix in edgellm's layout (converted per call without a native kernel)
    edgellm_int4 = quant._edgellm_int4
    monkeypatch.setattr(quant, "_edgellm_int4", lambda *a: per_product.append(1) or edgellm_int4(*a))
    shard_dir = _shard(moe, tmp_path / kind, *FLAGS[kind])
    config = ModelConfig.from_dir(shard_dir)
    file = ShardFile(rank_shard_path(shard_dir, plan_shards(config, [1.0])[0]))
    keys = [expert_block(layer, e) for layer in range(config.num_layers) for e in range(config.num_experts)]
    widths = set().union(*(block_bits(file.read(k)) for k in keys))
    slot = max(map(file.block_bytes, keys))
    file.close()
    assert widths == {"int8": {8}, "int4_experts": {4}, "auto": {4, 8}}[kind]
    resident, resident_stats = _run(shard_dir, [1.0], DECODE)
    streamed, stats = _run(shard_dir, [1.0], DECODE, expert_cache_bytes=3 * slot)
    assert resident_stats[0]["expert_cache_slots"] == len(keys) and resident_stats[0]["expert_misses"] == 0
    assert stats[0]["expert_cache_slots"] == 3 and stats[0]["expert_misses"] > 0
    assert torch.equal(streamed, resident)
    if not native_kernels:
        assert not per_product, "an int4 expert reached torch's kernel unconverted: converted at every product"
    with torch.no_grad():
        expected = load_reference(moe)(torch.tensor([PROMPT])).logits[0]  # (T, V)
    scale = expected.abs().max().item()
    assert (resident[: len(PROMPT)] - expected).abs().max().item() < 0.25 * scale  # as test_quant's MoE test
