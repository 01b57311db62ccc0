"""The aarch64 kernels (worker/kernels/arm/) cross-compiled with worker.kernels.native's own flags and run
under qemu as a Cortex-A72 (the Pi 4: no dot-product instructions) and a Cortex-A76 (the Pi 5:
sdot), through a C harness (tests/kernel_harness.c), against float64 references: the shapes and
row counts of the x86 tests (tests/test_native.py, tests/test_decode_kernels.py) plus the
remainders the aarch64 blocks leave (32-column quantization blocks, 4-wide float steps), the
edgellm int4 format at every group size, one thread and two (the same bits). Skipped without
the cross compiler and qemu (deploy/install-system-deps.sh installs them as root)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_decode_kernels import HD, KH, LAYERS, MAX_LEN, QH, SLOTS, _reference
from tests.test_native import (
    BF16_ROWS,
    BF16_SHAPES,
    F32_ROWS,
    F32_SHAPES,
    INT8_ROWS,
    INT8_SHAPES,
    QBLOCK,
    activation_half_steps,
)
from worker.config import RopeConfig
from worker.kernels import native
from worker.models.llama import rope_inv_freq, rope_table

ROOT = Path(__file__).resolve().parents[1]
CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64-static"
MISSING = [tool for tool in (CROSS_CC, QEMU) if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not on PATH: "
                                "deploy/install-system-deps.sh installs gcc-aarch64-linux-gnu and qemu-user-static")

# qemu CPU model -> what the library must say it chose there
CPUS = {"cortex-a72": "aarch64 NEON, no dot product", "cortex-a76": "aarch64 NEON, dot product (sdot) for int8/int4"}
END, ISA, F32, INT8, INT4, BF16, RMS_NORM, SILU_MUL, ATTENTION = range(9)  # the harness's ops
OP_NAMES = {INT8: "int8", INT4: "int4", F32: "f32", BF16: "bf16", RMS_NORM: "rms_norm", SILU_MUL: "silu_mul",
            ATTENTION: "attention"}
# (op, cpu) pairs run: the quantized products on both CPUs (their inner loops are chosen per CPU),
# the float kernels (one code path) on the A72 only, to keep the emulated run short.
RUNS = [(op, cpu) for op in (INT8, INT4) for cpu in CPUS] + [(op, "cortex-a72") for op in (F32, BF16, RMS_NORM,
                                                                                            SILU_MUL, ATTENTION)]
THREADS = (2, 1)
ONE_THREAD_MAX_WORK = 1 << 21  # m * n * k up to which a case is run again on one thread (qemu time)

# Remainders of the aarch64 blocks the x86 shapes miss: k % 32 of 31 and 1 (int8), k % 4 of 3
# and 2 with n % 8 of 3 and 6 (float32).
INT8_EXTRA = [(7, 95), (6, 33)]
F32_EXTRA = [(11, 1543), (6, 30)]
INT4_SHAPES = [(96, 256), (97, 512), (3, 256), (5, 768), (130, 1536)]  # k: multiples of every group size
INT4_ROWS = [1, 3, 13]
GROUPS = (32, 64, 128, 256)


@dataclass
class Case:
    """One harness call: its header, its input arrays, and the outputs it writes back
    (dtype, shape), filled in by ``_run``."""

    op: int
    sizes: list[int]
    inputs: list[torch.Tensor]
    output_specs: list[tuple[torch.dtype, tuple[int, ...]]]
    extra: dict[str, Any] = field(default_factory=dict)  # what the reference needs beyond the inputs
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # cpu -> arrays

    @property
    def threads(self) -> int:
        return self.sizes[7] if self.op == ATTENTION else self.sizes[-1]

    def request(self) -> bytes:
        header = struct.pack("<16q", self.op, *self.sizes, *[0] * (15 - len(self.sizes)))
        return header + b"".join(t.contiguous().numpy().tobytes() for t in self.inputs)


def _threads(work: int) -> tuple[int, ...]:
    """The thread counts a case runs at: 2, and 1 again where it is small enough."""
    return THREADS if work <= ONE_THREAD_MAX_WORK else THREADS[:1]


def _float_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _bf16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().view(torch.int16)


def _fp32_bound(x: torch.Tensor, w: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``x @ w.T`` and the error bound of summing ``terms`` rounded products in fp32:
    (terms + 2) * 2^-24 of sum |x||w|."""
    x, w = x.double(), w.double()
    return x @ w.T, (terms + 2) * 2.0 ** -24 * (x.abs() @ w.abs().T)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (m, k) as the aarch64 int8/int4 products see it: per 32-block, d = max|x| / 127 and
    q = round-half-even(x * (1 / d)), all in fp32 as the kernel computes them; returns q * d in
    float64 (m, k)."""
    m, k = x.shape
    padded = torch.zeros(m, -(-k // QBLOCK) * QBLOCK)
    padded[:, :k] = x
    blocks = padded.view(m, -1, QBLOCK)  # (m, blocks, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127  # fp32, as the kernel's division
    inv = torch.where(d != 0, torch.div(1.0, d), torch.zeros_like(d))
    q = torch.round(blocks * inv)  # fp32 product, ties to even
    return (q.double() * d.double()).view(m, -1)[:, :k]


def _cases_int8() -> list[Case]:
    cases = []
    for n, k in INT8_SHAPES + INT8_EXTRA:
        for m in INT8_ROWS:
            torch.manual_seed(n * k + m)
            w = torch.randint(-128, 128, (n, k), dtype=torch.int8)  # -128 too: the int16 pairs' worst case
            scales = _bf16_bits(torch.rand(n) * 0.02 + 0.001)
            x = torch.randn(m, k) * 2
            if m > 1:
                x[0, :QBLOCK] = 0.0  # a block of zeros (scale 0)
            inputs, extra = [w, scales, x], {}  # shared by the thread counts' cases (and their cached reference)
            for threads in _threads(m * n * k):
                cases.append(Case(INT8, [m, n, k, threads], inputs, [(torch.float32, (m, n))], extra))
    return cases


def _cached(compute: Callable[[Case], tuple[torch.Tensor, torch.Tensor]]) -> Callable[[Case], tuple[torch.Tensor, ...]]:
    """``compute(case)``, kept in the case's ``extra`` (which its thread-count twin shares)."""

    def cached(case: Case) -> tuple[torch.Tensor, ...]:
        if compute.__name__ not in case.extra:
            case.extra[compute.__name__] = compute(case)
        return case.extra[compute.__name__]

    return cached


@_cached
def _int8_reference(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 product with the quantized activations, and the bound of the kernel's fp32 sums of
    its exact per-block integer sums."""
    w_int, scales, x = case.inputs
    w = w_int.double() * scales.view(torch.bfloat16).double()[:, None]
    return _fp32_bound(quantize_activations(x), w, x.shape[1])


def _check_int8(case: Case, y: torch.Tensor) -> None:
    w_int, scales, x = case.inputs
    w = w_int.double() * scales.view(torch.bfloat16).double()[:, None]
    k = x.shape[1]
    ref_hat, bound = _int8_reference(case)
    err = (y.double() - ref_hat).abs()
    assert (err <= bound).all(), f"max error {err.max().item()} against the quantized activations"
    # the contract against the true activations: plus at most d / 2 per activation, times |w|
    ref, _ = _fp32_bound(x, w, k)
    assert ((y.double() - ref).abs() <= bound + activation_half_steps(x) @ w.abs().T).all()


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 (N, K) in 0..15 -> the edgellm int4 bytes (N, K/2): per 32-block, byte i holds
    weight i in its low nibble and weight 16 + i in its high nibble."""
    n, k = q.shape
    blocks = q.view(n, k // 32, 2, 16)  # (N, blocks, low/high half, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def _cases_int4() -> list[Case]:
    cases = []
    for group in GROUPS:
        for n, k in INT4_SHAPES:
            for m in INT4_ROWS:
                torch.manual_seed(group * n * k + m)
                q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
                scale = torch.rand(n, k // group) * 0.05 + 0.001
                zero = torch.randn(n, k // group) * 0.05
                sz = torch.stack([scale, zero], dim=-1).bfloat16()  # (N, K/g, 2)
                x = torch.randn(m, k) * 2
                inputs, extra = [x, _pack_int4(q), sz.view(torch.int16)], {"q": q}
                for threads in _threads(m * n * k):
                    cases.append(Case(INT4, [m, n, k, group, threads], inputs, [(torch.float32, (m, n))], extra))
    return cases


@_cached
def _int4_parts(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The dequantized matrix's two parts, fp64 (N, K): (q - 8) * scale, which multiplies the
    quantized activations, and zero, which multiplies the exact ones."""
    group, sz_bits = case.sizes[3], case.inputs[2]
    sz = sz_bits.view(torch.bfloat16).double().repeat_interleave(group, dim=1)  # (N, K, 2)
    return (case.extra["q"].double() - 8) * sz[..., 0], sz[..., 1]


@_cached
def _int4_reference(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 product with the quantized activations, and the bound of the kernel's fp32 sums:
    block and group terms (at most 2k), the fp32 group sums of x, the scale products."""
    x = case.inputs[0]
    centred, zero = _int4_parts(case)
    x_hat = quantize_activations(x)
    bound = (2 * x.shape[1] + 4) * 2.0 ** -24 * (x_hat.abs() @ centred.abs().T + x.double().abs() @ zero.abs().T)
    return x_hat @ centred.T + x.double() @ zero.T, bound


def _check_int4(case: Case, y: torch.Tensor) -> None:
    x = case.inputs[0]
    centred, zero = _int4_parts(case)
    ref_hat, bound = _int4_reference(case)
    err = (y.double() - ref_hat).abs()
    assert (err <= bound).all(), f"max error {err.max().item()} against the quantized activations"
    ref = x.double() @ (centred + zero).T  # the dequantized matrix (worker/kernels/quant.py's format)
    assert ((y.double() - ref).abs() <= bound + activation_half_steps(x) @ centred.abs().T).all()


def _cases_f32() -> list[Case]:
    cases = []
    for n, k in F32_SHAPES + F32_EXTRA:
        for m in F32_ROWS:
            torch.manual_seed(m * n + k)
            x, w = torch.randn(m, k), torch.randn(n, k)
            inputs = [w, x]
            for threads in _threads(m * n * k):
                cases.append(Case(F32, [m, n, k, threads], inputs, [(torch.float32, (m, n))]))
    return cases


def _check_f32(case: Case, y: torch.Tensor) -> None:
    w, x = case.inputs
    ref, bound = _fp32_bound(x, w, x.shape[1])
    assert ((y.double() - ref).abs() <= bound).all()


def _cases_bf16() -> list[Case]:
    cases = []
    for n, k in BF16_SHAPES:
        for m in BF16_ROWS:
            torch.manual_seed(m * n + k)
            inputs = [_bf16_bits(torch.randn(n, k)), _bf16_bits(torch.randn(m, k))]  # w, x
            for threads in _threads(m * n * k):
                cases.append(Case(BF16, [m, n, k, threads], inputs, [(torch.int16, (m, n))]))
    return cases


def _check_bf16(case: Case, y_bits: torch.Tensor) -> None:
    """fp32 sums rounded once to bf16: within the fp32 bound plus half a bf16 ulp, and nearly
    always the exact result rounded (as tests/test_native.py's bf16 test)."""
    w, x = (t.view(torch.bfloat16).float() for t in case.inputs)
    y = y_bits.view(torch.bfloat16)
    ref, bound = _fp32_bound(x, w, x.shape[1])
    assert ((y.double() - ref).abs() <= bound + 2.0 ** -8 * (ref.abs() + bound)).all()
    assert (y == ref.bfloat16()).double().mean() > 0.97


def _cases_small_ops() -> list[Case]:
    """RMSNorm, SiLU and attention in the shapes of tests/test_decode_kernels.py."""
    cases = []
    for shape in [(1, 2048), (3, 100), (8, 12), (2, 7)]:  # a decode row, 4-wide tails of 0 and 3, q/k-norm heads
        torch.manual_seed(shape[1])
        x, weight = torch.randn(shape) * 3, torch.randn(shape[1])
        cases.append(Case(RMS_NORM, [shape[0], shape[1], _float_bits(1e-6)], [x, weight], [(torch.float32, shape)]))
    for width in (5632, 13):
        torch.manual_seed(width)
        gate_up = torch.randn(2, 2 * width) * 8
        gate_up[0, :6] = torch.tensor([-120.0, -87.5, -30.0, 0.0, 30.0, 120.0])  # beyond the clamp and near it
        cases.append(Case(SILU_MUL, [2, width], [gate_up], [(torch.float32, (2, width))]))
    cos, sin = rope_table(rope_inv_freq(RopeConfig(theta=10000.0), HD), MAX_LEN, torch.float32)
    for window in (0, 8):
        torch.manual_seed(window)
        k_cache, v_cache = torch.randn(LAYERS, SLOTS, KH, MAX_LEN, HD), torch.randn(LAYERS, SLOTS, KH, MAX_LEN, HD)
        qkv = torch.randn(2, (QH + 2 * KH) * HD)
        slots, positions = torch.tensor([3, 0]), torch.tensor([5, 590])
        cache_shape = (SLOTS, KH, MAX_LEN, HD)
        inputs = [qkv, cos, sin, k_cache[1], v_cache[1], slots, positions]  # layer 1 of the caches
        for threads in THREADS:
            cases.append(Case(ATTENTION, [2, QH, KH, HD, MAX_LEN, window, _float_bits(HD ** -0.5), threads, SLOTS],
                              inputs, [(torch.float32, (2, QH * HD)), (torch.float32, cache_shape),
                                       (torch.float32, cache_shape)], {"caches": (k_cache, v_cache)}))
    return cases


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float, floor: float = 1e-30) -> None:
    err = (got.double() - ref).abs()
    assert (err <= rel * ref.abs() + floor).all(), f"max error {err.max().item()}"


def _check_small_op(case: Case, *outputs: torch.Tensor) -> None:
    if case.op == RMS_NORM:
        x, weight = (t.double() for t in case.inputs)
        _close(outputs[0], x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight, rel=1e-5)
    elif case.op == SILU_MUL:
        gate, up = case.inputs[0].double().chunk(2, dim=-1)
        _close(outputs[0], gate * torch.sigmoid(gate) * up, rel=2e-6)
    else:  # the tolerances of tests/test_decode_kernels.py's attention test
        k_cache, v_cache = case.extra["caches"]
        qkv, cos, sin, _, _, slots, positions = case.inputs
        window = case.sizes[5] or None
        ref, ref_k, ref_v = _reference(qkv, k_cache, v_cache, cos, sin, 1, slots.tolist(), positions.tolist(), window)
        out, k_out, v_out = outputs
        _close(out, ref, rel=1e-4, floor=1e-5)
        _close(k_out, ref_k[1], rel=1e-6, floor=1e-6)
        assert torch.equal(v_out, ref_v[1].float())
        written = torch.zeros(k_out.shape, dtype=torch.bool)
        for slot, pos in zip(slots.tolist(), positions.tolist(), strict=True):
            written[slot, :, pos] = True
        assert torch.equal(k_out[~written], k_cache[1][~written]) and torch.equal(v_out[~written], v_cache[1][~written])


CHECKS: dict[int, Callable[..., None]] = {INT8: _check_int8, INT4: _check_int4, F32: _check_f32, BF16: _check_bf16,
                                          RMS_NORM: _check_small_op, SILU_MUL: _check_small_op,
                                          ATTENTION: _check_small_op}


def _run(harness: Path, cpu: str, cases: list[Case]) -> str:
    """Every case through the harness on qemu's ``cpu``; fills in each case's outputs and returns
    the kernel set the library chose there."""
    request = struct.pack("<16q", ISA, *[0] * 15) + b"".join(c.request() for c in cases) + bytes(128)
    done = subprocess.run([QEMU, "-cpu", cpu, str(harness)], input=request, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    reply = memoryview(done.stdout)
    isa, offset = bytes(reply[:64]).rstrip(b"\0").decode(), 64
    for case in cases:
        arrays = []
        for dtype, shape in case.output_specs:
            size = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
            arrays.append(torch.frombuffer(bytearray(reply[offset:offset + size]), dtype=dtype).view(shape))
            offset += size
        case.outputs[cpu] = arrays
    assert offset == len(reply)
    return isa


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Case], dict[str, str]]:
    """The harness built from worker.kernels.native's aarch64 compile units, and every case run on both
    CPU models (in parallel): (the cases with their outputs, cpu -> the kernels it chose)."""
    out = tmp_path_factory.mktemp("arm")
    objects = native.compile_objects("aarch64", CROSS_CC, out)
    harness = out / "kernel_harness"
    subprocess.run([CROSS_CC, "-O2", "-static", "-fopenmp", str(ROOT / "tests" / "kernel_harness.c"),
                    *map(str, objects), "-lm", "-o", str(harness)], check=True, capture_output=True, timeout=120)
    cases = _cases_int8() + _cases_int4() + _cases_f32() + _cases_bf16() + _cases_small_ops()

    def run(cpu: str) -> str:
        return _run(harness, cpu, [c for c in cases if (c.op, cpu) in RUNS])

    with ThreadPoolExecutor(len(CPUS)) as pool:
        chosen = dict(zip(CPUS, pool.map(run, CPUS), strict=True))
    return cases, chosen


@pytest.mark.parametrize("cpu", CPUS)
def test_the_cpu_gets_its_kernels(runs: tuple[list[Case], dict[str, str]], cpu: str) -> None:
    """HWCAP_ASIMDDP picks the dot-product loops on the A76 and plain NEON on the A72."""
    assert runs[1][cpu] == CPUS[cpu]


@pytest.mark.parametrize(("op", "cpu"), RUNS, ids=[f"{OP_NAMES[op]}-{cpu}" for op, cpu in RUNS])
def test_kernel_against_float64(runs: tuple[list[Case], dict[str, str]], cpu: str, op: int) -> None:
    """Each case within its bound of the float64 reference; a case run at 2 threads and then 1
    (adjacent cases) gives the same bits."""
    cases = [c for c in runs[0] if c.op == op]
    assert cases
    for case in cases:
        CHECKS[op](case, *case.outputs[cpu])
    if op in (RMS_NORM, SILU_MUL):  # one thread by design
        return
    pairs = [(two, one) for two, one in zip(cases, cases[1:], strict=False) if two.inputs is one.inputs]
    assert pairs
    for two, one in pairs:
        assert (two.threads, one.threads) == THREADS
        assert all(torch.equal(a, b) for a, b in zip(two.outputs[cpu], one.outputs[cpu], strict=True))


@pytest.mark.parametrize("op", [INT8, INT4], ids=["int8", "int4"])
def test_quantized_results_agree_across_cpus(runs: tuple[list[Case], dict[str, str]], op: int) -> None:
    """The A72 (widening multiplies) and A76 (sdot) loops sum the same exact integers per block
    from the same quantized activations; only the order of their fp32 sums may differ: within
    twice the fp32 bound of each other."""
    a72, a76 = CPUS
    reference = _int8_reference if op == INT8 else _int4_reference
    for case in (c for c in runs[0] if c.op == op):
        _, bound = reference(case)
        assert ((case.outputs[a72][0].double() - case.outputs[a76][0].double()).abs() <= 2 * bound).all()
