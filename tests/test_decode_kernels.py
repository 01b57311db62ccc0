"""The native decode-step kernels (worker/kernels/{x86,arm}/decode.c): RMSNorm, the SiLU gate and one
token's attention, against float64 references of what the torch path computes. The model-level
tests (test_reference, test_moe_reference) run them against transformers; this file pins each
one alone, its edge cases, and the torch path they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.harness import inprocess_cluster
from tests.test_native import needs_native
from worker.config import RopeConfig
from worker.kernels import native
from worker.models.llama import apply_rope, rms_norm, rope_inv_freq, rope_table, silu_and_mul
from worker.rank.step import SeqSpan


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-6, floor: float = 1e-30) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got.double() - ref).abs()
    assert (err <= rel * ref.abs() + floor).all(), f"max error {err.max().item()}"


@needs_native
@pytest.mark.parametrize("shape", [(1, 2048), (3, 100), (2, 4, 12)])  # decode row, an 8-wide tail, q/k-norm heads
def test_rms_norm_kernel(shape: tuple[int, ...]) -> None:
    kernel = native.rms_norm()
    assert kernel is not None
    torch.manual_seed(len(shape))
    x, weight = torch.randn(shape) * 3, torch.randn(shape[-1])
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    _close(kernel(x, weight, 1e-6), ref, rel=1e-5)
    _close(rms_norm(x, weight, 1e-6), ref, rel=1e-5)  # few fp32 rows take the kernel


@needs_native
@pytest.mark.parametrize("width", [5632, 13])  # the 1.1B MLP's, and one with a scalar tail
def test_silu_mul_kernel_across_the_exp_range(width: int) -> None:
    kernel = native.silu_mul()
    assert kernel is not None
    torch.manual_seed(width)
    gate_up = torch.randn(2, 2 * width) * 8
    gate_up[0, :6] = torch.tensor([-120.0, -87.5, -30.0, 0.0, 30.0, 120.0])  # beyond the clamp and near it
    gate, up = gate_up.double().chunk(2, dim=-1)
    ref = gate * torch.sigmoid(gate) * up
    _close(kernel(gate_up), ref)
    _close(silu_and_mul(gate_up), ref)
    stacked = gate_up[:, None]  # (T, 1, 2w), not (T, 2w): torch's ops
    gate32, up32 = stacked.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul(stacked), F.silu(gate32) * up32)


LAYERS, SLOTS, QH, KH, HD, MAX_LEN = 2, 4, 8, 2, 20, 600  # 4 query heads per KV head; hd 20 leaves a 4-wide tail


def _attention_setup(window: int | None) -> tuple[native.TokenAttention, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
    make = native.token_attention()
    assert make is not None
    k_cache, v_cache = torch.randn(LAYERS, SLOTS, KH, MAX_LEN, HD), torch.randn(LAYERS, SLOTS, KH, MAX_LEN, HD)
    cos, sin = rope_table(rope_inv_freq(RopeConfig(theta=10000.0), HD), MAX_LEN, torch.float32)
    return make(k_cache, v_cache, cos, sin, QH, window, HD ** -0.5), k_cache, v_cache, cos, sin


def _reference(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, layer: int, slots: list[int], positions: list[int],
               window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch path (worker/models/llama.py): RoPE, cache write, softmax attention; float64."""
    k_cache, v_cache, out = k_cache.double().clone(), v_cache.double().clone(), []
    for row, slot, pos in zip(qkv.double(), slots, positions, strict=True):
        q, k, v = row.split([QH * HD, KH * HD, KH * HD])
        q = apply_rope(q.view(1, QH, HD), cos[pos:pos + 1].double(), sin[pos:pos + 1].double())[0]  # (QH, HD)
        k_cache[layer, slot, :, pos] = apply_rope(k.view(1, KH, HD), cos[pos:pos + 1].double(), sin[pos:pos + 1].double())[0]
        v_cache[layer, slot, :, pos] = v.view(KH, HD)
        start = max(0, pos + 1 - window) if window else 0
        keys = k_cache[layer, slot, :, start:pos + 1].repeat_interleave(QH // KH, dim=0)  # (QH, n, HD)
        values = v_cache[layer, slot, :, start:pos + 1].repeat_interleave(QH // KH, dim=0)
        weights = torch.softmax((keys @ q[:, :, None])[..., 0] * HD ** -0.5, dim=-1)  # (QH, n)
        out.append((weights[:, None, :] @ values)[:, 0].reshape(-1))  # (QH * HD,)
    return torch.stack(out), k_cache, v_cache


@needs_native
@pytest.mark.parametrize("window", [None, 8])
def test_token_attention_kernel_writes_the_cache_and_attends(window: int | None) -> None:
    """Two sequences in scattered slots, one at position 5 and one at 590 (past the window, and
    long enough that the heads are split over threads: 2 x 8 heads x 591 keys x 20 is over
    decode.c's ATTENTION_PARALLEL_WORK), in layer 1 of 2."""
    torch.manual_seed(0 if window is None else window)
    attend, k_cache, v_cache, cos, sin = _attention_setup(window)
    slots, positions = [3, 0], [5, 590]
    qkv = torch.randn(2, (QH + 2 * KH) * HD)
    ref, ref_k, ref_v = _reference(qkv, k_cache, v_cache, cos, sin, 1, slots, positions, window)
    before = k_cache.clone(), v_cache.clone()
    out = attend(1, qkv, torch.tensor(slots), torch.tensor(positions))
    _close(out, ref, rel=1e-4, floor=1e-5)
    _close(k_cache, ref_k, rel=1e-6, floor=1e-6)
    assert torch.equal(v_cache, ref_v.float())
    written = torch.zeros_like(k_cache, dtype=torch.bool)
    for slot, pos in zip(slots, positions, strict=True):
        written[1, slot, :, pos] = True
    assert torch.equal(k_cache[~written], before[0][~written]) and torch.equal(v_cache[~written], before[1][~written])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attend(1, qkv, torch.tensor(slots), torch.tensor(positions)), out)  # same bits
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("span", [SeqSpan(slot=0, start=10_000, length=1), SeqSpan(slot=99, start=4, length=1)])
def test_a_token_outside_the_cache_is_an_error_not_a_stray_write(checkpoints, span: SeqSpan) -> None:
    """The kernel indexes the cache without checks, so such a step takes the torch path, which raises."""
    with inprocess_cluster(checkpoints("llama"), [1.0], max_batch=2, max_context=64) as executor:
        executor.step([[1, 17, 42, 99]], [SeqSpan(slot=0, start=0, length=4)])
        with pytest.raises((IndexError, RuntimeError)):
            executor.step([[5]], [span])
