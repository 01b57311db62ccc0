"""The native matmuls (worker/kernels/native.py, worker/kernels/{x86,arm}/matmul.c), int8 and float32 weights:
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
from worker.kernels import native
from worker.kernels.quant import QuantWeight, linear, quantize_int4, quantize_int8

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED_HERE = (platform.system() == "Linux" and shutil.which("cc") is not None
                  and (native.machine() == "aarch64" or (native.machine() == "x86_64" and
                                                          torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))))
needs_native = pytest.mark.skipif(not SUPPORTED_HERE,
                                  reason="native kernels are built on Linux x86-64 with AVX2 and Linux aarch64 only")
QBLOCK = 32  # activations per quantization block of the aarch64 int8/int4 products (worker/kernels/arm/quant.h)


def _quantized(n: int, k: int, seed: int) -> QuantWeight:
    torch.manual_seed(seed)
    return QuantWeight(*quantize_int8(torch.randn(n, k)), 0)


def _fp32_bound(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 reference of ``x @ w.T`` (w: a float matrix, or an int8 one dequantized), and the
    error bound of summing K exact products in fp32 and scaling once: (K + 2) * 2^-24 of
    sum |x||w|."""
    return x.double() @ w.double().T, (x.shape[-1] + 2) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)


def activation_half_steps(x: torch.Tensor) -> torch.Tensor:
    """fp64 (m, k): how far the aarch64 int8/int4 products' int8 activations may be from x (m, k),
    half a quantization step d / 2, d = max|x| / 127 of the element's 32-block; plus 2^-10 of
    it for the fp32 rounding of x * (1 / d) before it is rounded to an integer."""
    m, k = x.shape
    blocks = F.pad(x.double(), (0, -k % QBLOCK)).view(m, -1, QBLOCK)  # (m, blocks, 32)
    d = blocks.abs().amax(dim=-1) / 127  # (m, blocks)
    return (d * (0.5 + 2.0 ** -10)).repeat_interleave(QBLOCK, dim=1)[:, :k]


def _int8_bound(x: torch.Tensor, w: torch.Tensor, quantized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_fp32_bound`` of x and the dequantized int8 matrix w, plus, where the kernel quantizes the
    activations (``quantized``: the aarch64 kernel always, the x86 one below
    ``native.INT8_Q8_MAX_ROWS`` rows), their int8 rounding ``activation_half_steps(x) @ |w|``.
    The block products are then exact integers (|w xq| <= 128 * 127: a pair sums in int16, 8 of
    them in int32, exactly as floats), and the fp32 sums run over d * xq instead of x, at most
    d/2 larger per input: (K + 2) 2^-24 of that d/2 is within the 2^-10 d per input that
    ``activation_half_steps`` allows beyond d/2 as long as K < 2^14."""
    assert x.shape[-1] < 2 ** 14
    ref, bound = _fp32_bound(x, w)
    if quantized:
        bound = bound + activation_half_steps(x) @ w.double().abs().T
    return ref, bound


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


# The shapes and row counts of each kernel's tests (tests/test_arm_kernels.py runs the aarch64
# build on them too).
INT8_SHAPES = [(96, 64), (97, 72), (3, 8), (5, 24), (1024, 512), (130, 1544)]
INT8_ROWS = [1, 2, 3, 6, 12, 13, 14]
F32_SHAPES = [(96, 64), (97, 72), (3, 8), (5, 20), (1024, 512), (130, 1541), (135, 40)]
F32_ROWS = [1, 2, 3, 4, 5, 6, 64]
BF16_SHAPES = [(96, 64), (97, 72), (3, 8), (5, 20), (1024, 512), (130, 1541), (135, 1040)]
BF16_ROWS = [1, 2, 3, 4, 64]


@needs_native
@pytest.mark.parametrize(("n", "k"), INT8_SHAPES)
@pytest.mark.parametrize("m", INT8_ROWS)
def test_kernel_matches_the_dequantized_matrix_in_fp32(m: int, n: int, k: int) -> None:
    """The fp32-activation int8 product (x86: ``int8_f32_mm``, what ``int8_mm`` runs from 12 rows
    on; aarch64: ``int8_mm``, with its activations' int8 rounding). Block rows and left-over rows
    (n % 4), 16-wide steps and an 8-wide tail (k % 16 == 8), rows of x one at a time and in pairs
    (odd and even m), and from 12 rows against a block converted to floats, 3 at a time (m % 3
    of 0, 1, 2); one thread and two (each output is summed by one thread: the same bits)."""
    aarch64 = native.machine() == "aarch64"
    int8_mm = native.int8_mm() if aarch64 else native.int8_f32_mm()
    assert int8_mm is not None
    w = _quantized(n, k, n + k)
    x = torch.randn(m, k)
    _assert_within_bound_at_any_thread_count(lambda: int8_mm(x, w.weight, w.scales),
                                             *_int8_bound(x, w.dequantize(), quantized=aarch64))


# k % 32 of 0, 8, 16, 24 (a partial last activation block, or only one), with and without whole blocks
Q8_SHAPES = [*INT8_SHAPES, (7, 80), (9, 16), (66, 2048)]
needs_x86_native = pytest.mark.skipif(not SUPPORTED_HERE or native.machine() != "x86_64",
                                      reason="the x86 int8 kernel's two paths")


@needs_x86_native
@pytest.mark.parametrize(("n", "k"), Q8_SHAPES)
@pytest.mark.parametrize("m", [*INT8_ROWS, 11])
def test_int8_kernel_quantizes_decode_activations(m: int, n: int, k: int) -> None:
    """x86 ``int8_mm``: below ``INT8_Q8_MAX_ROWS`` rows, activations quantized per 32-block and
    integer dot products, within the fp32 bound plus the activations' rounding of the fp64
    reference (x in blocks of unlike magnitudes; every k % 32, 4-row blocks and left-over rows,
    one row of x and several); from there on the bits of the fp32-activation path."""
    int8_mm, int8_f32_mm = native.int8_mm(), native.int8_f32_mm()
    assert int8_mm is not None and int8_f32_mm is not None
    w = _quantized(n, k, n + k)
    x = torch.randn(m, k) * torch.rand(m, k)
    if m >= native.INT8_Q8_MAX_ROWS:
        assert torch.equal(int8_mm(x, w.weight, w.scales), int8_f32_mm(x, w.weight, w.scales))
        return
    _assert_within_bound_at_any_thread_count(lambda: int8_mm(x, w.weight, w.scales),
                                             *_int8_bound(x, w.dequantize(), quantized=True))


@needs_x86_native
def test_int8_activation_bound_is_tight_and_the_row_threshold_is_the_kernels() -> None:
    """The bound above is not loose: the quantized path's error exceeds the fp32-only bound (it
    does round the activations), and one weight row's error, the activations' rounding times
    |w|, reaches a good part of its rounding bound; ``INT8_Q8_MAX_ROWS`` is where the C kernel
    switches (one row less: quantized, not the fp32 bits; that many: the fp32 bits)."""
    int8_mm, int8_f32_mm = native.int8_mm(), native.int8_f32_mm()
    assert int8_mm is not None and int8_f32_mm is not None
    w = _quantized(256, 1024, 5)
    x = torch.randn(1, 1024)
    ref, fp32_bound = _int8_bound(x, w.dequantize(), quantized=False)
    _, bound = _int8_bound(x, w.dequantize(), quantized=True)
    error = (int8_mm(x, w.weight, w.scales).double() - ref).abs()
    assert (error > fp32_bound).any() and (error <= bound).all()
    assert (error / bound).max() > 0.05  # random rounding errors cancel: sqrt(K) of K, not 0
    below = torch.randn(native.INT8_Q8_MAX_ROWS - 1, 1024)
    at = torch.randn(native.INT8_Q8_MAX_ROWS, 1024)
    assert not torch.equal(int8_mm(below, w.weight, w.scales), int8_f32_mm(below, w.weight, w.scales))
    assert torch.equal(int8_mm(at, w.weight, w.scales), int8_f32_mm(at, w.weight, w.scales))


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
@pytest.mark.parametrize(("n", "k"), F32_SHAPES)
@pytest.mark.parametrize("m", F32_ROWS)
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
@pytest.mark.parametrize(("n", "k"), BF16_SHAPES)
@pytest.mark.parametrize("m", BF16_ROWS)
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
            "from worker.kernels import native; print('KERNEL', native.int8_mm() is not None)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=START_S, check=True)


def test_off_switch_and_missing_compiler_fall_back_with_a_log_line(tmp_path: Path) -> None:
    off = _probe({"EDGELLM_NATIVE": "0", "EDGELLM_KERNEL_CACHE": str(tmp_path)})
    assert "KERNEL False" in off.stdout and "EDGELLM_NATIVE=0" in off.stdout
    no_cc = _probe({"PATH": "/nonexistent", "EDGELLM_KERNEL_CACHE": str(tmp_path)})
    # where the CPU has no kernel (ATEN_CPU_CAPABILITY=default on x86: a Pi-like run) that is the reason given
    cpu_has_kernel = native.machine() == "aarch64" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    why = "no C compiler" if cpu_has_kernel else "kernel off (the CPU lacks"
    assert "KERNEL False" in no_cc.stdout and why in no_cc.stdout and "torch's" in no_cc.stdout
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
    code = "from worker.kernels import native; assert native.int8_mm() is not None"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env) for _ in range(3)]
    assert [p.wait(timeout=START_S) for p in procs] == [0, 0, 0]
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("kernels-") and built[0].endswith(".so")  # no temp files left
    later = _probe({"EDGELLM_KERNEL_CACHE": str(tmp_path)})
    assert "KERNEL True" in later.stdout and "compiled" not in later.stdout
    assert f"native int8_mm kernel on: {tmp_path / built[0]}" in later.stdout


def _int4(n: int, k: int, group: int, seed: int) -> QuantWeight:
    torch.manual_seed(seed)
    return QuantWeight(*quantize_int4(torch.randn(n, k) + 0.3 * torch.randn(n, 1), group), group)


def _q80_bound(x: torch.Tensor, w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 reference of ``x @ dequant(w).T`` and the error bound of int4_gemm: each activation
    rounded to a step d = max|x| / 127 of its block of 32 (off by d/2, plus 2^-21 relative for
    the float scale it goes through), then fp32 sums of the block products and the group terms
    scale * sum(x q) and (zero - 8 scale) * sum(x), whose sizes are up to 15 scale and
    |zero - 8 scale| times sum |x| (not |w|): (K + 2) * 2^-24 of those."""
    deq = w.dequantize().double()  # (N, K)
    xd = x.double()
    half_step = xd.abs().view(x.shape[0], -1, 32).amax(dim=-1).repeat_interleave(32, dim=1) / 254  # (M, K)
    rounding = (half_step + xd.abs() * 2.0 ** -21) @ deq.abs().T
    s = w.scales.double()  # (N, K/g, 2)
    terms = (15 * s[..., 0] + (s[..., 1] - 8 * s[..., 0]).abs()).repeat_interleave(w.group_size, dim=1)  # (N, K)
    summing = (x.shape[1] + 2) * 2.0 ** -24 * ((xd.abs() + half_step) @ terms.T)
    return xd @ deq.T, rounding + summing


@needs_native
@pytest.mark.parametrize(("n", "k"), [(64, 256), (67, 256), (1, 512), (6, 768), (1030, 512)])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_int4_kernel_matches_the_dequantized_matrix(m: int, n: int, k: int, group: int) -> None:
    """The edgellm-int4 kernel on weights as shards store them: 4-row blocks and the n % 4 rows
    left over, every group size (k a multiple of each), one row of x and several (the first
    streams a block, the rest reuse it), within the int8-activation bound; one thread and two
    give the same bits (1030 rows: enough blocks for two)."""
    int4_mm = native.int4_mm()
    assert int4_mm is not None
    w = _int4(n, k, group, n + k + group)
    x = torch.randn(m, k) * torch.rand(m, k)  # blocks of unlike magnitudes
    _assert_within_bound_at_any_thread_count(lambda: int4_mm(x, w.weight, w.scales, group), *_q80_bound(x, w))


@needs_native
def test_int4_bound_is_tight_enough_to_catch_a_wrong_nibble_order() -> None:
    """The bound above is not loose: the same bytes read as torch's AVX2 order (format 1) or with
    the nibbles of each byte swapped are far outside it."""
    int4_mm = native.int4_mm()
    assert int4_mm is not None
    w = _int4(64, 256, 32, 0)
    x = torch.randn(2, 256)
    ref, bound = _q80_bound(x, w)
    swapped = ((w.weight & 15) << 4) | (w.weight >> 4)
    assert ((int4_mm(x, swapped, w.scales, 32).double() - ref).abs() > bound).any()
    assert ((int4_mm(x, w.weight, w.scales, 32).double() - ref).abs() <= bound).all()


@needs_native
def test_linear_runs_edgellm_int4_natively_for_fp32_and_bf16_activations() -> None:
    int4_mm = native.int4_mm()
    assert int4_mm is not None
    w = _int4(96, 128, 64, 3)
    x = torch.randn(2, 3, 128)
    assert torch.equal(linear(x, w), int4_mm(x.view(6, 128), w.weight, w.scales, 64).view(2, 3, 96))
    in_bf16 = linear(x.bfloat16(), w)
    assert in_bf16.dtype == torch.bfloat16
    assert torch.equal(in_bf16, int4_mm(x.view(6, 128).bfloat16().float(), w.weight, w.scales, 64)
                       .bfloat16().view(2, 3, 96))
