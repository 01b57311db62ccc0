"""The native matmuls (worker/native.py, worker/kernels/matmul.c), int8 and float32 weights:
built here, exact to fp32 summation against the (dequantized) matrix, used by ``linear`` for fp32
activations, and off (torch's kernels instead) where they cannot be built."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.processes import START_S
from tests.test_quant import _kernel_reference
from worker import native
from worker.quant import QuantWeight, linear, quantize_int8

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED_HERE = (platform.system() == "Linux" and platform.machine() == "x86_64"
                  and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and shutil.which("cc") is not None)
needs_native = pytest.mark.skipif(not SUPPORTED_HERE, reason="native int8 kernel is built on Linux x86-64 with AVX2 only")


def _quantized(n: int, k: int, seed: int) -> QuantWeight:
    torch.manual_seed(seed)
    return QuantWeight(*quantize_int8(torch.randn(n, k)), 0)


def _fp32_bound(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 reference of ``x @ w.T`` (w: a float matrix, or an int8 one dequantized), and the
    error bound of summing K exact products in fp32 and scaling once: (K + 2) * 2^-24 of
    sum |x||w|."""
    return x.double() @ w.double().T, (x.shape[-1] + 2) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)


def _assert_within_bound_at_any_thread_count(run: Callable[[], torch.Tensor], ref: torch.Tensor,
                                             bound: torch.Tensor) -> None:
    """``run()`` is float32 of ``ref``'s shape within ``bound`` of it, and one thread gives the
    same bits as the default count (each output is summed by one thread)."""
    y = run()
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= bound).all()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(run(), y)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_the_kernel_is_built_where_it_is_supported() -> None:
    assert native.unsupported_reason() is None
    assert native.int8_mm() is not None and native.f32_mm() is not None


@needs_native
@pytest.mark.parametrize(("n", "k"), [(96, 64), (97, 72), (3, 8), (5, 24), (1024, 512), (130, 1544)])
@pytest.mark.parametrize("m", [1, 2, 3, 6, 12, 13, 14])
def test_kernel_matches_the_dequantized_matrix_in_fp32(m: int, n: int, k: int) -> None:
    """Block rows and left-over rows (n % 4), 16-wide steps and an 8-wide tail (k % 16 == 8),
    rows of x one at a time and in pairs (odd and even m), and from 12 rows against a block
    converted to floats, 3 at a time (m % 3 of 0, 1, 2); one thread and two (each output is
    summed by one thread: the same bits)."""
    int8_mm = native.int8_mm()
    assert int8_mm is not None
    w = _quantized(n, k, n + k)
    x = torch.randn(m, k)
    _assert_within_bound_at_any_thread_count(lambda: int8_mm(x, w.weight, w.scales), *_fp32_bound(x, w.dequantize()))


@needs_native
def test_linear_uses_it_for_fp32_activations_and_torch_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    int8_mm = native.int8_mm()
    assert int8_mm is not None
    w = _quantized(64, 128, 1)
    x = torch.randn(3, 1, 128)
    bias = torch.randn(64)
    y = linear(x, w, bias)
    assert y.shape == (3, 1, 64)
    assert torch.equal(y, (int8_mm(x.view(3, 128), w.weight, w.scales) + bias).view(3, 1, 64))
    # A non-contiguous input is copied, not misread.
    wide = torch.randn(2, 256)
    assert torch.equal(linear(wide[:, ::2], w), int8_mm(wide[:, ::2].contiguous(), w.weight, w.scales))
    # bf16 activations go to torch's kernel: within its bf16 bound, in bf16.
    ref, bf16_bound = _kernel_reference(x.view(3, 128), w)
    in_bf16 = linear(x.view(3, 128).bfloat16(), w)
    assert in_bf16.dtype == torch.bfloat16
    assert ((in_bf16.double() - ref).abs() <= bf16_bound).all()
    # With the kernel off, fp32 takes torch's path too: its bf16 rounding, not the native bits.
    monkeypatch.setitem(native._loaded, "int8_mm", None)
    fallback = linear(x, w).view(3, 64)
    assert ((fallback.double() - ref).abs() <= bf16_bound).all()
    assert not torch.equal(fallback + bias, y.view(3, 64))


@needs_native
@pytest.mark.parametrize(("n", "k"), [(96, 64), (97, 72), (3, 8), (5, 20), (1024, 512), (130, 1541), (135, 40)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 64])
def test_f32_kernel_is_exact_to_fp32_summation(m: int, n: int, k: int) -> None:
    """Weight blocks of 8 rows for one row of x, then a 4-row block (n % 8 >= 4, as 135 and 5
    rows leave), then single rows; blocks of 4 for more rows of x, 3 at a time and the 1 or 2
    left over; 8-wide steps and the columns left over (k % 8); one thread and two give the same
    bits (each output is summed by one thread)."""
    f32_mm = native.f32_mm()
    assert f32_mm is not None
    torch.manual_seed(m * n + k)
    x, w = torch.randn(m, k), torch.randn(n, k)
    _assert_within_bound_at_any_thread_count(lambda: f32_mm(x, w), *_fp32_bound(x, w))


@needs_native
def test_linear_takes_the_f32_kernel_for_few_fp32_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    f32_mm = native.f32_mm()
    assert f32_mm is not None
    torch.manual_seed(0)
    w, bias = torch.randn(96, 200), torch.randn(96)
    few = torch.randn(2, 3, 200)  # 6 rows
    assert torch.equal(linear(few, w, bias), (f32_mm(few.view(6, 200), w) + bias).view(2, 3, 96))
    # the kernel's own summation order, not MKL's: otherwise this test could not tell the paths apart
    assert not torch.equal(f32_mm(few.view(6, 200), w), F.linear(few.view(6, 200), w))
    many = torch.randn(native.F32_MAX_ROWS + 1, 200)  # a long prompt: MKL's GEMM
    assert torch.equal(linear(many, w, bias), F.linear(many, w, bias))
    transposed = torch.randn(200, 96).T  # a weight that is not row-major (N, K) in memory
    assert torch.equal(linear(few, transposed), F.linear(few, transposed))
    half = few.bfloat16()
    bf16_mm = native.bf16_mm()
    assert bf16_mm is not None
    assert torch.equal(linear(half, w.bfloat16()), bf16_mm(half.view(6, 200), w.bfloat16()).view(2, 3, 96))
    with pytest.raises(RuntimeError, match="same dtype"):  # mixed dtypes: torch's path and its error
        linear(half, w)
    monkeypatch.setitem(native._loaded, "f32_mm", None)  # kernel off: torch for everything
    monkeypatch.setitem(native._loaded, "bf16_mm", None)
    assert torch.equal(linear(few, w, bias), F.linear(few, w, bias))
    assert torch.equal(linear(half, w.bfloat16()), F.linear(half, w.bfloat16()))


@needs_native
@pytest.mark.parametrize(("n", "k"), [(96, 64), (97, 72), (3, 8), (5, 20), (1024, 512), (130, 1541), (135, 1040)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 64])
def test_bf16_kernel_sums_in_fp32_and_rounds_once(m: int, n: int, k: int) -> None:
    """bf16 x and w, fp32 sums (each product of two bf16 is exact in fp32), one rounding to bf16
    at the end: within the fp32 summation bound plus half a bf16 ulp (2^-8 relative) of the fp64
    result. The blocks are f32_gemm's (8 rows for one row of x, with the software prefetch for
    rows of up to 1024 columns, as 512 and 1040 straddle; 4 rows for more), the same bits at one
    thread and two."""
    bf16_mm = native.bf16_mm()
    assert bf16_mm is not None
    torch.manual_seed(m * n + k)
    x, w = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16()
    ref, bound = _fp32_bound(x.float(), w.float())
    y = bf16_mm(x, w)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    assert ((y.double() - ref).abs() <= bound + 2.0 ** -8 * (ref.abs() + bound)).all()
    # rounded to nearest, not truncated: nearly every output is the exact result rounded
    assert (y == ref.bfloat16()).double().mean() > 0.97
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(bf16_mm(x, w), y)
    finally:
        torch.set_num_threads(threads)


def _probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
            "from worker import native; print('KERNEL', native.int8_mm() is not None)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=START_S, check=True)


def test_off_switch_and_missing_compiler_fall_back_with_a_log_line(tmp_path: Path) -> None:
    off = _probe({"EDGELLM_NATIVE": "0", "EDGELLM_KERNEL_CACHE": str(tmp_path)})
    assert "KERNEL False" in off.stdout and "EDGELLM_NATIVE=0" in off.stdout
    no_cc = _probe({"PATH": "/nonexistent", "EDGELLM_KERNEL_CACHE": str(tmp_path)})
    assert "KERNEL False" in no_cc.stdout and "no C compiler" in no_cc.stdout and "torch's" in no_cc.stdout
    assert list(tmp_path.iterdir()) == []


@needs_native
def test_a_cached_build_loads_without_a_compiler(tmp_path: Path) -> None:
    built = _probe({"EDGELLM_KERNEL_CACHE": str(tmp_path)})
    assert "KERNEL True" in built.stdout and "compiled" in built.stdout
    no_cc = _probe({"PATH": "/nonexistent", "EDGELLM_KERNEL_CACHE": str(tmp_path)})
    assert "KERNEL True" in no_cc.stdout and "compiled" not in no_cc.stdout


@needs_native
def test_processes_starting_together_share_one_cached_build(tmp_path: Path) -> None:
    env = {**os.environ, "EDGELLM_KERNEL_CACHE": str(tmp_path)}
    code = "from worker import native; assert native.int8_mm() is not None"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env) for _ in range(3)]
    assert [p.wait(timeout=START_S) for p in procs] == [0, 0, 0]
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("kernels-") and built[0].endswith(".so")  # no temp files left
    later = _probe({"EDGELLM_KERNEL_CACHE": str(tmp_path)})
    assert "KERNEL True" in later.stdout and "compiled" not in later.stdout
    assert f"native int8_mm kernel on: {tmp_path / built[0]}" in later.stdout
