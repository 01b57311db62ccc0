"""Quantized shards (``edgellm shard --quantize``): the int8/int4 kernels against the matrix they
stand for, the on-disk layout against torch's own packing, and quantized shards through the
real shard command, the executor, the sliding window, the expert cache and a served cluster."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from server.cli import main as edgellm_main
from server.tokenizer import TextTokenizer
from tests.harness import inprocess_cluster
from tests.processes import served
from tests.test_streaming import _run, _window_budget
from tests.tiny_models import build_checkpoint
from worker.config import ModelConfig
from worker.kernels import native
from worker.kernels.quant import (
    KERNEL_DTYPE,
    QuantError,
    QuantSpec,
    QuantWeight,
    field,
    kernel_layout,
    linear,
    pack_int4,
    quantize_block,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from worker.memory.weight_store import dense_order
from worker.rank.step import SeqSpan
from worker.shards.shard_file import ShardFile
from worker.shards.sharding import plan_shards
from worker.shards.weights import HEAD_BLOCK, expert_block, load_hub, rank_shard_path, read_manifest

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "server" / "default_model"
PROMPT = [1, 17, 42, 99, 7, 250, 31, 5, 64, 128, 3, 77]
BF16_ULP = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding is within half of 2^-7 relative


def _shard(model: Path, out: Path, *args: str, ranks: int = 1) -> Path:
    """The real `edgellm shard` command (in-process: the same code path as the console script)."""
    assert edgellm_main(["shard", "--model", str(model), "--ranks", str(ranks), "--out", str(out), *args]) == 0
    return out


def _kernel_reference(x: torch.Tensor, w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel must return: bf16 activations times the dequantized matrix, in fp64, and
    the bound on its error: the products are exact and summed in fp32 (K * 2^-24 relative to
    sum |x||w|), then the result is rounded to bf16 (half an ulp, 2^-8 relative)."""
    xk = x.to(KERNEL_DTYPE).double()
    deq = w.dequantize().double()
    ref = xk @ deq.T  # (T, N)
    magnitude = xk.abs() @ deq.abs().T
    return ref, BF16_ULP * ref.abs() + (x.shape[-1] * 2.0 ** -24 + 2.0 ** -16) * magnitude


def test_int8_matches_the_dequantized_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's kernel (the native one, used where it builds, has its own tests in test_native.py)."""
    monkeypatch.setitem(native._loaded, "int8_mm", None)
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    x = torch.randn(5, 64)
    q, scales = quantize_int8(w)
    qw = field({"w": q, "w.scales": scales}, "w")
    assert isinstance(qw, QuantWeight) and qw.bits == 8 and qw.shape == (96, 64)
    # Round to nearest from a bf16 scale: each weight is within half a step (the bf16 rounding of
    # amax/127 may push |w|/s past 127 by 2^-8 relative, where the clamp adds at most that much).
    step = scales.float()[:, None]
    assert ((qw.dequantize() - w).abs() <= step * (0.5 + 127 * BF16_ULP)).all()
    ref, bound = _kernel_reference(x, qw)
    y = linear(x, qw)
    assert y.dtype == x.dtype and y.shape == (5, 96)
    assert ((y.double() - ref).abs() <= bound).all()
    # With a bias, and leading dimensions kept.
    bias = torch.randn(96)
    y3 = linear(x.view(5, 1, 64), qw, bias)
    assert y3.shape == (5, 1, 96)
    assert torch.allclose(y3.view(5, 96), y + bias)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_matches_the_dequantized_matrix(monkeypatch: pytest.MonkeyPatch, group: int) -> None:
    """Quantization error, and torch's kernel (the fallback where no native int4 kernel runs:
    the native one has its own tests in test_native.py) on the matrix converted as a block read
    from a shard is."""
    monkeypatch.setitem(native._loaded, "int4_mm", None)
    torch.manual_seed(group)
    n, k = 64, 512
    w = torch.randn(n, k)
    x = torch.randn(3, k)
    packed, scales_zeros = quantize_int4(w, group)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert scales_zeros.shape == (n, k // group, 2) and scales_zeros.dtype == torch.bfloat16
    qw = field({"w": packed, "w.scales_zeros": scales_zeros}, "w")
    assert isinstance(qw, QuantWeight) and qw.group_size == group and qw.shape == (n, k) and not qw.torch_layout
    # Min/max groups: every weight is within half a step, plus the bf16 rounding of the zero
    # (half an ulp of |zero|) and of the scale (times up to 8 steps from the zero).
    scale = scales_zeros[..., 0].float().repeat_interleave(group, dim=1)  # (N, K)
    zero = scales_zeros[..., 1].float().repeat_interleave(group, dim=1)
    slack = scale * (0.5 + 8 * BF16_ULP) + zero.abs() * BF16_ULP
    assert ((qw.dequantize() - w).abs() <= slack + 1e-6).all()
    converted = field(kernel_layout({"w": packed.clone(), "w.scales_zeros": scales_zeros.clone()}), "w")
    assert isinstance(converted, QuantWeight) and converted.torch_layout and converted.shape == (n, k)
    ref, bound = _kernel_reference(x, qw)
    assert ((linear(x, converted).double() - ref).abs() <= bound).all()
    # A larger group is coarser: its error is larger on the same matrix.
    if group == 128:
        fine = QuantWeight(*quantize_int4(w, 32), 32)
        assert (fine.dequantize() - w).abs().mean() < (qw.dequantize() - w).abs().mean()


def test_int4_layout_is_edgellms() -> None:
    """The shard bytes of an int4 matrix, spelled out: per row, blocks of 16 bytes for 32 inputs,
    byte i = q[32b + i] | q[32b + 16 + i] << 4 (Q4_0's order); no constraint on the rows."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 48)
    for n in range(5):
        for b in range(3):
            for i in range(16):
                assert packed[n, 16 * b + i] == q[n, 32 * b + i] | (q[n, 32 * b + 16 + i] << 4)
    assert torch.equal(unpack_int4(packed), q)
    # (scale, zero) per row and group, row-major: row n's groups are contiguous.
    w = torch.randn(3, 128)
    _, scales_zeros = quantize_int4(w, 64)
    lo, hi = w.view(3, 2, 64).amin(-1), w.view(3, 2, 64).amax(-1)
    assert torch.allclose(scales_zeros[..., 0].float(), (hi - lo) / 15, rtol=BF16_ULP)


@pytest.mark.parametrize("n", [8, 16, 40, 96, 130])
@pytest.mark.parametrize("group", [32, 128])
def test_load_time_conversion_is_torchs_packing(monkeypatch: pytest.MonkeyPatch, n: int, group: int) -> None:
    """Without a native int4 kernel a block's int4 matrices are converted in place as it is read:
    the first N - N % 16 rows to exactly what `_convert_weight_to_int4pack_for_cpu` makes of the
    whole matrix under this process's capability (converted 64 rows at a time), their scales to
    (K/g, N, 2); the rows left over stay as stored. The weight it stands for is unchanged."""
    monkeypatch.setitem(native._loaded, "int4_mm", None)
    torch.manual_seed(n)
    k = 256
    packed, scales_zeros = quantize_int4(torch.randn(n, k), group)
    stored = QuantWeight(packed.clone(), scales_zeros.clone(), group)
    fields = kernel_layout({"w": packed, "w.scales_zeros": scales_zeros, "norm": torch.ones(k)})
    assert set(fields) == {"w", "w.torch_scales_zeros", "norm"} and fields["w"] is packed
    w = field(fields, "w")
    assert isinstance(w, QuantWeight) and w.torch_layout and w.shape == (n, k)
    n16 = n - n % 16
    nibbles = unpack_int4(stored.weight[:n16]).to(torch.int32)
    if n16:
        assert torch.equal(w.weight, torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1))
        assert w.weight.data_ptr() == packed.data_ptr()  # in place: no memory beyond the block's
    assert torch.equal(w.scales, stored.scales[:n16].transpose(0, 1))
    assert (w.tail is None) == (n == n16)
    assert torch.equal(w.dequantize(), stored.dequantize())
    x = torch.randn(2, k)
    ref, bound = _kernel_reference(x, stored)
    assert ((linear(x, w).double() - ref).abs() <= bound).all()
    # A weight that did not come through a read (here: the stored bytes) is converted per call.
    assert ((linear(x, stored).double() - ref).abs() <= bound).all()


def test_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="--group-size must be one of 32, 64, 128, 256"):
        QuantSpec(4, group_size=48)
    with pytest.raises(QuantError, match="int8 or int4"):
        QuantSpec(3)
    with pytest.raises(QuantError, match="divisible by 64"):
        quantize_block("layers.0.mlp", {"w_down": torch.randn(64, 160)}, 4, 64, torch.float32)
    with pytest.raises(QuantError, match="divisible by 8"):
        quantize_block("layers.0.mlp", {"w_down": torch.randn(64, 36)}, 8, 64, torch.float32)
    # Through the command: exit status 2 (the CLI's error path), and no half-written shard left.
    model = build_checkpoint(tmp_path / "llama", "llama")  # intermediate 160: not a multiple of 64
    out = tmp_path / "shards"
    base = ["shard", "--model", str(model), "--ranks", "1", "--out", str(out)]
    assert edgellm_main([*base, "--quantize", "int4", "--group-size", "48"]) == 2
    assert edgellm_main([*base, "--quantize", "int4", "--group-size", "64"]) == 2
    assert not any(out.glob("*.safetensors*"))


def _greedy(model_dir: Path, weights: list[float], tokens: int, **spec: object) -> tuple[list[int], torch.Tensor]:
    with inprocess_cluster(model_dir, weights, max_batch=1, max_context=128, **spec) as executor:  # type: ignore[arg-type]
        logits = executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))])
        first = logits[0]
        out = [int(first.argmax())]
        for i in range(tokens - 1):
            out.append(int(executor.step([[out[-1]]], [SeqSpan(0, len(PROMPT) + i, 1)])[0].argmax()))
    return out, first


@pytest.mark.parametrize(("quantize", "ranks"), [("int8", 1), ("int8", 2), ("int4", 2)])
def test_quantized_default_model_generates_the_float_text(tmp_path: Path, quantize: str, ranks: int) -> None:
    """The embedded trained model, quantized by the shard command, decodes its fp32 greedy text
    (int8: all 24 tokens; int4, ten times coarser, the first 4: bench/quant.py measures how
    long it agrees), and the rank files hold quantized matrices (int8: about 1/4 of the fp32
    bytes, int4: 1/8 plus the group scales)."""
    shard_dir = _shard(DEFAULT_MODEL, tmp_path / "q", "--quantize", quantize, "--group-size", "32", ranks=ranks)
    float_dir = _shard(DEFAULT_MODEL, tmp_path / "f", ranks=ranks)
    weights = [1.0] * ranks
    expected, float_logits = _greedy(float_dir, weights, 24)
    got, logits = _greedy(shard_dir, weights, 24)
    agree = 24 if quantize == "int8" else 4
    assert got[:agree] == expected[:agree]
    err = (logits - float_logits).abs().max().item()
    assert 0 < err < (0.1 if quantize == "int8" else 0.5) * float_logits.abs().max().item()
    config = ModelConfig.from_dir(shard_dir)
    for shard in plan_shards(config, weights):
        q, f = ShardFile(rank_shard_path(shard_dir, shard)), ShardFile(rank_shard_path(float_dir, shard))
        dense = dense_order(config.num_layers)
        ratio = sum(map(q.block_bytes, dense)) / sum(map(f.block_bytes, dense))
        assert ratio < (0.27 if quantize == "int8" else 0.2), ratio
        wqkv = next(t for t in q.blocks["layers.0.attn"].tensors if t.name == "wqkv")
        assert wqkv.dtype == (torch.int8 if quantize == "int8" else torch.uint8)
        q.close()
        f.close()


def test_lm_head_is_int8_by_default_and_float_on_request(tmp_path: Path) -> None:
    """A quantized shard's rank files hold their LM head rows in int8 per output row (the embedded
    model ties the head to the embedding, which stays float in the hub file), within half a
    quantization step of the fp32 head; ``--lm-head float`` keeps them exactly as they were."""
    embed = load_hub(DEFAULT_MODEL, torch.float32).embed
    int8_dir = _shard(DEFAULT_MODEL, tmp_path / "q", "--quantize", "int8", ranks=2)
    float_dir = _shard(DEFAULT_MODEL, tmp_path / "f", "--quantize", "int8", "--lm-head", "float", ranks=2)
    assert torch.equal(load_hub(int8_dir, torch.float32).embed, embed)
    head = QuantWeight(*(torch.cat(t) for t in zip(*((f["lm_head"], f["lm_head.scales"])
                                                      for f in _head_blocks(int8_dir)), strict=True)), 0)
    assert head.weight.dtype == torch.int8 and head.bits == 8
    step = head.scales.float()[:, None]  # (V, 1)
    assert ((head.dequantize() - embed).abs() <= step * (0.5 + 127 * BF16_ULP)).all()
    assert torch.equal(torch.cat([f["lm_head"] for f in _head_blocks(float_dir)]), embed)
    # Experts quantized alone (--expert-bits without --quantize): the head stays float, as
    # --lm-head's help says (it was int8 before)
    from tests.tiny_models import build_checkpoint

    moe = build_checkpoint(tmp_path / "moe", "qwen2_moe")
    (experts_only,) = _head_blocks(_shard(moe, tmp_path / "e", "--expert-bits", "8"))
    assert experts_only["lm_head"].dtype == torch.float32 and "lm_head.scales" not in experts_only


def _head_blocks(shard_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The ``head`` block of every rank file, in rank order."""
    out = []
    for shard in plan_shards(ModelConfig.from_dir(shard_dir), read_manifest(shard_dir)["weights"] or
                             [1.0] * read_manifest(shard_dir)["world_size"]):
        file = ShardFile(rank_shard_path(shard_dir, shard))
        out.append(file.read(HEAD_BLOCK))
        file.close()
    return out


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_window_over_a_quantized_shard_equals_resident(tmp_path: Path, quantize: str) -> None:
    """The sliding window streams quantized blocks (sized by their quantized bytes) straight into
    its buffers; the logits equal those of the same shard held resident, bit for bit."""
    model = build_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=4, intermediate_size=256)
    weights = [1.0, 1.0]
    shard_dir = _shard(model, tmp_path / "q", "--quantize", quantize, "--group-size", "32", ranks=2)
    decode = [5, 9, 300, 42]
    resident, _ = _run(shard_dir, weights, decode)
    streamed, stats = _run(shard_dir, weights, decode, memory_budget=_window_budget(shard_dir, weights, 2))
    assert torch.equal(streamed, resident)
    assert stats[0]["window_slots"] == 2
    file = ShardFile(rank_shard_path(shard_dir, plan_shards(ModelConfig.from_dir(shard_dir), weights)[0]))
    assert stats[0]["weight_bytes"] < 3 * max(map(file.block_bytes, dense_order(4)))  # buffers of quantized size
    file.close()


@pytest.mark.parametrize("ranks", [1, 2])
def test_moe_expert_bits_4_with_a_small_expert_cache(tmp_path: Path, ranks: int) -> None:
    """``--quantize int8 --expert-bits 4``: routed experts in int4, the rest in int8, router in
    float; an expert cache of 3 experts (streaming them) gives the all-resident logits, and
    its buffers are int4-sized."""
    model = build_checkpoint(tmp_path / "moe", "qwen3_moe", moe_intermediate_size=64)
    weights = [1.0] * ranks
    shard_dir = _shard(model, tmp_path / "q", "--quantize", "int8", "--expert-bits", "4", "--group-size", "32",
                       ranks=ranks)
    float_dir = _shard(model, tmp_path / "f", ranks=ranks)
    file = ShardFile(rank_shard_path(shard_dir, plan_shards(ModelConfig.from_dir(shard_dir), weights)[0]))
    dtypes = lambda block: {t.name: t.dtype for t in file.blocks[block].tensors}  # noqa: E731
    assert dtypes(expert_block(0, 0))["w_gate_up"] == torch.uint8
    assert dtypes("layers.0.attn")["wqkv"] == torch.int8
    assert dtypes("layers.0.mlp")["router"] == torch.float32
    expert_bytes = file.block_bytes(expert_block(0, 0))
    float_file = ShardFile(rank_shard_path(float_dir, plan_shards(ModelConfig.from_dir(float_dir), weights)[0]))
    assert expert_bytes < 0.2 * float_file.block_bytes(expert_block(0, 0))
    file.close()
    float_file.close()
    decode = [5, 9, 300, 42]
    resident, _ = _run(shard_dir, weights, decode)
    cached, stats = _run(shard_dir, weights, decode, expert_cache_bytes=3 * expert_bytes)
    assert torch.equal(cached, resident)
    assert stats[0]["expert_cache_slots"] == 3 and stats[0]["expert_misses"] > 0
    reference, _ = _run(float_dir, weights, decode)
    scale = reference.abs().max().item()
    assert (resident - reference).abs().max().item() < 0.25 * scale


@pytest.mark.parametrize("shard_dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_runs_end_to_end(tmp_path: Path, shard_dtype: str) -> None:
    """``--dtype bfloat16`` serving (float and int8 shards, and a bf16 shard streamed through
    the window) decodes the embedded model's fp32 greedy text."""
    expected, _ = _greedy(DEFAULT_MODEL, [1.0], 16)
    float_dir = _shard(DEFAULT_MODEL, tmp_path / "f", "--dtype", shard_dtype)
    int8_dir = _shard(DEFAULT_MODEL, tmp_path / "q", "--dtype", shard_dtype, "--quantize", "int8")
    assert _greedy(float_dir, [1.0], 16, dtype=torch.bfloat16)[0] == expected
    assert _greedy(int8_dir, [1.0], 16, dtype=torch.bfloat16)[0] == expected
    if shard_dtype == "bfloat16":  # a streamed shard computes in its stored dtype
        budget = _window_budget(int8_dir, [1.0], 2, max_batch=1) + (1 << 20)
        assert _greedy(int8_dir, [1.0], 16, dtype=torch.bfloat16, memory_budget=budget)[0] == expected


def _greedy_text(shard_dir: Path, prompt_text: str, tokens: int) -> str:
    """The greedy continuation of ``prompt_text`` that an in-process 2-rank cluster decodes from
    ``shard_dir``: what a served cluster over the same shards must answer."""
    tok = TextTokenizer(str(shard_dir))
    prompt = tok.encode(prompt_text)
    with inprocess_cluster(shard_dir, [1.0, 1.0], max_batch=1, max_context=128) as executor:
        ids = [int(executor.step([prompt], [SeqSpan(0, 0, len(prompt))])[0].argmax())]
        for i in range(tokens - 1):
            ids.append(int(executor.step([[ids[-1]]], [SeqSpan(0, len(prompt) + i, 1)])[0].argmax()))
    return tok.decode(ids)


@pytest.mark.cluster
def test_served_cluster_over_an_int8_shard(tmp_path: Path) -> None:
    """`edgellm serve` with a local worker process over an int8 shard: the HTTP completion is the
    text the in-process executor decodes from the same shard."""
    shard_dir = _shard(DEFAULT_MODEL, tmp_path / "q", "--quantize", "int8", ranks=2)
    with served(shard_dir, "--local-workers", "1", log_path=tmp_path / "serve.log") as url:
        body = httpx.post(f"{url}/v1/completions", json={"model": "q", "prompt": "Once upon a time",
                                                         "max_tokens": 20, "temperature": 0}, timeout=60).json()
    text = body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] > 0 and text.strip()
    expected = _greedy_text(shard_dir, "Once upon a time", 20)
    assert text == expected[: len(text)]  # the server may stop earlier, at an end-of-sequence token


@pytest.mark.cluster
def test_serve_quantizes_a_checkpoint_once_and_reuses_it(tmp_path: Path) -> None:
    """`edgellm serve --model CHECKPOINT --quantize int8`: the rank files it caches are byte for
    byte what `edgellm shard --quantize int8` writes for the same split; it serves them (the
    HTTP text is the in-process decode of those shards) under the checkpoint's own name; a
    second start reuses the cache."""
    cache = tmp_path / "cache"
    args = ("--quantize", "int8", "--local-workers", "1", "--cache-dir", str(cache))
    request = {"model": "default_model", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    with served(DEFAULT_MODEL, *args, log_path=tmp_path / "first.log") as url:
        text = httpx.post(f"{url}/v1/completions", json=request, timeout=60).json()["choices"][0]["text"]
    [cached] = list((cache / "quantized").iterdir())
    reference = _shard(DEFAULT_MODEL, tmp_path / "q", "--quantize", "int8", ranks=2)
    for f in reference.glob("*.safetensors"):
        assert (cached / f.name).read_bytes() == f.read_bytes(), f.name
    assert text and text == _greedy_text(cached, "Once upon a time", 16)[: len(text)]

    mtime = (cached / "rank-01-of-02.safetensors").stat().st_mtime_ns
    with served(DEFAULT_MODEL, *args, log_path=tmp_path / "second.log") as url:
        again = httpx.post(f"{url}/v1/completions", json=request, timeout=60).json()["choices"][0]["text"]
    assert again == text
    assert "serving the quantized shards cached in" in (tmp_path / "second.log").read_text()
    assert (cached / "rank-01-of-02.safetensors").stat().st_mtime_ns == mtime
    assert list((cache / "quantized").iterdir()) == [cached]


def test_serve_refuses_to_quantize_a_sharded_directory(tmp_path: Path) -> None:
    shard_dir = _shard(DEFAULT_MODEL, tmp_path / "s")
    assert edgellm_main(["serve", "--model", str(shard_dir), "--quantize", "int8", "--cache-dir",
                         str(tmp_path / "c")]) == 2


def test_serve_leaves_no_partial_copy_of_a_refused_quantization(tmp_path: Path) -> None:
    """int4 in groups of 64 is refused while the copy is written (160 MLP columns): the
    ``quantized/*.partial`` directory it was written into goes with it."""
    model = build_checkpoint(tmp_path / "llama", "llama")
    cache = tmp_path / "cache"
    assert edgellm_main(["serve", "--model", str(model), "--quantize", "int4", "--group-size", "64", "--cache-dir",
                         str(cache), "--threads", str(torch.get_num_threads())]) == 2
    assert not list(cache.rglob("*.partial"))


@pytest.mark.parametrize(("quantize", "group"), [("int8", "64"), ("int4", "64")])
def test_three_ranks_of_a_real_intermediate_size_quantize(tmp_path: Path, quantize: str, group: str) -> None:
    """TinyLlama's intermediate size, 5632, split three ways: each rank's down projection input
    width is a multiple of 128 (``split_columns``), so int8 and int4 (groups up to 128; 64 here,
    what the tiny model's o_proj slices allow) shard and run. Before, 1878/1877/1877 failed both ("needs an
    input width divisible by 8")."""
    from tests.tiny_models import build_checkpoint

    # hidden 256 over 8 heads: the smallest rank's o_proj input (2 heads of 32) still fits a group of 64
    model = build_checkpoint(tmp_path / "hf", "llama", hidden_size=256, intermediate_size=5632)
    shard_dir = _shard(model, tmp_path / "q", "--quantize", quantize, "--group-size", group, ranks=3)
    float_dir = _shard(model, tmp_path / "f", ranks=3)
    widths = [shard.mlp_width for shard in plan_shards(ModelConfig.from_dir(shard_dir), [1.0] * 3)]
    assert widths == [1920, 1920, 1792]
    got, logits = _greedy(shard_dir, [1.0] * 3, 4)
    _, float_logits = _greedy(float_dir, [1.0] * 3, 4)
    assert len(got) == 4 and torch.isfinite(logits).all()
    assert (logits - float_logits).abs().max() < (0.1 if quantize == "int8" else 0.5) * float_logits.abs().max()


def test_int4_shards_of_the_old_layout_are_refused_with_the_command_that_rewrites_them(tmp_path: Path) -> None:
    """A manifest without ``quant_format`` (format 1: torch's AVX2 nibble order) holding int4 is
    refused before a rank computes garbage from it, by the coordinator and by a rank, naming the
    `edgellm shard` flags it was written with; int8 kept its layout and is still served."""
    import json

    from worker.config import CheckpointError
    from worker.kernels.quant import QUANT_FORMAT
    from worker.shards.weights import SHARD_MANIFEST, check_quant_format, read_manifest

    def as_format_1(shard_dir: Path) -> dict:
        manifest = read_manifest(shard_dir)
        assert manifest["quant_format"] == QUANT_FORMAT
        del manifest["quant_format"]
        (shard_dir / SHARD_MANIFEST).write_text(json.dumps(manifest))
        return manifest

    int4_dir = _shard(DEFAULT_MODEL, tmp_path / "q4", "--quantize", "int4", "--group-size", "32", ranks=2)
    manifest = as_format_1(int4_dir)
    with pytest.raises(CheckpointError, match="older byte layout") as refused:
        check_quant_format(int4_dir, manifest)
    assert (f"`edgellm shard --model CHECKPOINT --ranks 2 --quantize int4 --group-size 32 --weights 1,1 "
            f"--out {int4_dir}`") in str(refused.value)
    shard = plan_shards(ModelConfig.from_dir(int4_dir), [1.0, 1.0])[1]
    with pytest.raises(CheckpointError, match="older byte layout"):
        rank_shard_path(int4_dir, shard)
    assert edgellm_main(["serve", "--model", str(int4_dir), "--local-workers", "1"]) == 2
    experts_dir = tmp_path / "e4"
    (experts_dir).mkdir()
    with pytest.raises(CheckpointError, match="--quantize int8 --expert-bits 4 --group-size 64"):
        check_quant_format(experts_dir, manifest | {"quantize": QuantSpec(8, 64, 4).to_dict()})
    int8_dir = _shard(DEFAULT_MODEL, tmp_path / "q8", "--quantize", "int8", ranks=2)
    check_quant_format(int8_dir, as_format_1(int8_dir))  # no error
    assert rank_shard_path(int8_dir, shard).is_file()


def test_the_quantized_cache_is_keyed_on_the_byte_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --quantize`'s cached copy written by an edgellm of another layout is not served."""
    from server import quantized_cache

    model = DEFAULT_MODEL
    shards = plan_shards(ModelConfig.from_dir(model), [1.0])
    spec = QuantSpec(4, 32)
    key = quantized_cache.cache_key(model, [1.0], shards, spec, torch.float32)
    assert quantized_cache.cache_key(model, [1.0], shards, spec, torch.float32) == key
    monkeypatch.setattr(quantized_cache, "QUANT_FORMAT", 1)
    assert quantized_cache.cache_key(model, [1.0], shards, spec, torch.float32) != key
