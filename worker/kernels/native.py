"""Native CPU kernels: C compiled on first use with the system's C compiler, loaded with ctypes.

Matrix products, in ``kernels/<isa>/matmul.c``, each reading every weight from memory once for
all rows of x (the figures below are x86's, measured on this project's AVX2 machine):

- ``int8_mm``: times an int8 shard matrix. torch's ``_weight_int8pack_mm`` reads a decode
  step's weights from DRAM at about 8 GB/s on 2 threads here (no prefetch); this prefetches and
  reads them at 14-17 GB/s (512x8 shape) and 26-30 GB/s (1.1B shape). Below
  ``INT8_Q8_MAX_ROWS`` rows (decode) x86 quantizes the activations to int8 per 32 inputs and
  runs integer dot products (``kernels/x86/int8.c``: 1.24-1.48x the fp32-activation loop with
  the weights in cache, which was bound by its int8 -> float conversions); from there on, and
  in ``int8_f32_mm``, fp32 activations, more exact than the torch kernel's bf16 ones. Measured
  on the 512x8 shape's matrices (8 layers, cold caches, ms for all 32 matmuls, native / torch),
  fp32 activations, before the last two speed-ups of its loop: 1 row 1.3-1.8 / 2.5-3.2, 2 rows
  1.9-2.3 / 3.7, 8 rows 6.0-6.4 / 7.8-8.8, 64 rows 37 / 49-56 (from 12 rows on, each weight
  block is converted to floats once), 128 rows 71-75 / 100-104.
- ``int4_mm``: times an int4 matrix in edgellm's format (``worker.kernels.quant``), read as stored, in
  ``kernels/int4.c``: the activations quantized to int8 per 32 inputs, integer dot products
  (``int4_f32_mm``: the same with fp32 activations, slower; kept for bench/int4_kernels.py).
- ``f32_mm``: times a float32 matrix, for up to ``F32_MAX_ROWS`` rows (decode, batches, short
  prompts; longer prompts are GEMM-bound and go to MKL). MKL's sgemv/sgemm streams 16-22 GB/s
  at 1 row and 5-9 GB/s at 2-8 rows on 2 threads here; this reads 28-34 GB/s and 19-34 GB/s
  (1.1B shape's 2048-wide matrices, cold). At 1 thread the two are even at 1 row.
- ``bf16_mm``: bfloat16 activations times a bfloat16 matrix, summed in fp32 and rounded once,
  for up to ``F32_MAX_ROWS`` rows. On a CPU without bf16 instructions torch's bf16 F.linear
  streams half the bytes at half the rate; a 6-layer 1.1B-shape bf16 decode went from 14-17 to
  20-21 tok/s with it (fp32: 16).

The small fp32 operations between a decode step's products, in ``kernels/<isa>/decode.c`` (its
header says why: after a product has streamed the weights, each small torch op runs from cold
caches): ``rms_norm``, ``silu_mul`` (the gated MLP's activation) and ``decode_attention``
(RoPE, KV-cache write and attention of one new token per sequence).

Kernels per instruction set, one directory each, the same C functions and contracts
(``COMPILE_UNITS``): ``kernels/x86/`` (AVX2 and FMA) on Linux x86-64 where torch reports AVX2 or
AVX-512; ``kernels/arm/`` (NEON, built for armv8-a) on Linux aarch64, with the int8 and int4
products' inner loops built a second time for armv8.2-a+dotprod (``kernels/arm/dotprod.c``) and
chosen once at load from ``getauxval(AT_HWCAP) & HWCAP_ASIMDDP``: the Pi 5's Cortex-A76 runs
those (``sdot``), the Pi 4's Cortex-A72 plain NEON. A log line says which kernels were chosen.
The int8/int4 products quantize activations per 32-block to int8 (their headers say why): their
results carry that rounding, except the x86 int8 product's from ``INT8_Q8_MAX_ROWS`` rows on.
tests/test_arm_kernels.py checks the aarch64 build under qemu against float64 references.

Why compiled at run time rather than at install: the project installs as pure Python (a wheel
for every platform, no build step on a Pi), and the kernels are optional. Elsewhere (another OS
or CPU, x86 without AVX2), or without a C compiler and a cached build, or with
``EDGELLM_NATIVE=0``, ``int8_mm()``, ``int4_mm()`` and ``f32_mm()`` are None and ``worker.kernels.quant.linear`` calls
torch; a log line says which.

The library is cached by a hash of its sources and flags under ``$EDGELLM_KERNEL_CACHE``
(default ``~/.cache/edgellm/kernels``), written to a temporary name and renamed into place, so
processes starting together never load a half-written file. It links OpenMP by soname
(``libgomp.so.1``), so it shares the runtime torch has already loaded and its thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

KERNELS = Path(__file__).resolve().parent  # the C sources sit beside this module, one directory per ISA


@dataclass(frozen=True)
class CompileUnit:
    """Sources compiled together with one set of flags (``-c``: each to an object file)."""

    sources: tuple[Path, ...]
    flags: tuple[str, ...]


_COMMON_FLAGS = ("-O3", "-fopenmp", "-fPIC")
# platform.machine() -> the units of that machine's library, linked into one shared object: every
# C file of the machine's directory, the aarch64 dot-product loops in a unit of their own.
# step.c, ISA-independent, composes the machine's kernels into a whole decode step.
STEP_SOURCE = KERNELS / "step.c"
COMPILE_UNITS: dict[str, tuple[CompileUnit, ...]] = {
    "x86_64": (CompileUnit((*sorted((KERNELS / "x86").glob("*.c")), STEP_SOURCE), (*_COMMON_FLAGS, "-mavx2", "-mfma")),),
    "aarch64": (CompileUnit((*sorted(p for p in (KERNELS / "arm").glob("*.c") if p.name != "dotprod.c"), STEP_SOURCE),
                            (*_COMMON_FLAGS, "-march=armv8-a")),
                # the dot-product loops: called only where the CPU reports them (arm/matmul.c)
                CompileUnit((KERNELS / "arm" / "dotprod.c",), (*_COMMON_FLAGS, "-march=armv8.2-a+dotprod"))),
}
_MACHINES = {"AMD64": "x86_64", "arm64": "aarch64"}  # other spellings of platform.machine()
LINK_FLAGS = ("-shared", "-fopenmp", "-lm")
DISABLE_ENV = "EDGELLM_NATIVE"  # "0" turns native kernels off
CACHE_ENV = "EDGELLM_KERNEL_CACHE"

# Rows of x up to which f32_mm beats MKL's sgemm here (2048x5632 and the 512x8 shape's matrices,
# cold, 1 and 2 threads); from 128 rows on it is even or slower at 1 thread. Short prompts gain
# too: a 32-token prompt's time to first token on the 1.1B shape was 674-712 ms against 1336 ms
# with MKL.
F32_MAX_ROWS = 64
# Rows of x below which the x86 int8_mm quantizes the activations to int8 (kernels/x86/int8.c's
# Q8_MAX_ROWS; tests/test_native.py checks the two agree); from here on it multiplies fp32 ones.
INT8_Q8_MAX_ROWS = 12

Int8Mm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Int4Mm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
F32Mm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Bf16Mm = F32Mm
RmsNorm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
SiluMul = Callable[[torch.Tensor], torch.Tensor]

_lock = threading.Lock()
_loaded: dict[str, Callable[..., Any] | None] = {}  # kernel name -> its wrapper, None when off
_library: list[ctypes.CDLL | str] = []  # the loaded library, or why it cannot be; at most one entry


def cache_dir() -> Path:
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgellm" / "kernels"


def machine() -> str:
    """This machine's architecture as ``COMPILE_UNITS`` names it."""
    return _MACHINES.get(platform.machine(), platform.machine())


def unsupported_reason() -> str | None:
    """Why the native kernel cannot run on this machine, or None when it can."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    if platform.system() != "Linux" or machine() not in COMPILE_UNITS:
        return f"written for Linux {' and '.join(COMPILE_UNITS)}, this is {platform.system()} {platform.machine()}"
    if machine() == "x86_64" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2/FMA (torch reports {torch.backends.cpu.get_cpu_capability()})"
    return None  # every aarch64 CPU has NEON; the dot-product loops are chosen in C


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def build() -> Path:
    """Compile the library into the cache now (an image build does this where a compiler is)."""
    target = library_path()
    _build(target)
    return target


def compile_objects(arch: str, compiler: str, out_dir: Path) -> list[Path]:
    """The object files of ``arch``'s units, compiled with ``compiler`` into ``out_dir`` (the
    tests cross-compile the aarch64 ones with these same flags)."""
    objects = []
    for u, unit in enumerate(COMPILE_UNITS[arch]):
        for source in unit.sources:
            obj = out_dir / f"{u}-{source.stem}.o"
            subprocess.run([compiler, *unit.flags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True,
                           text=True, timeout=120)
            objects.append(obj)
    return objects


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as objects_dir:
            objects = compile_objects(machine(), _compiler(), Path(objects_dir))
            subprocess.run([_compiler(), *map(str, objects), *LINK_FLAGS, "-o", tmp], check=True, capture_output=True,
                           text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path() -> Path:
    """Where these sources, compiler and flags build to: a machine with no compiler can still load
    a library built there before (or copied there, as an image build could)."""
    units = COMPILE_UNITS[machine()]
    headers = sorted({header for unit in units for source in unit.sources for header in source.parent.glob("*.h")})
    sources = b"".join(path.read_bytes() for path in (*(s for unit in units for s in unit.sources), *headers))
    flags = " ".join((_compiler(), *(flag for unit in units for flag in unit.flags), *LINK_FLAGS))
    digest = hashlib.sha256(sources + flags.encode()).hexdigest()[:16]
    return cache_dir() / f"kernels-{digest}.so"


def _open_library() -> ctypes.CDLL | str:
    """The loaded library, built first if need be; or why it cannot be."""
    if reason := unsupported_reason():
        return reason
    try:
        return _load_library()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{getattr(exc, 'stderr', '') or exc}"


def _load_library() -> ctypes.CDLL | str:
    target = library_path()
    if not target.exists():
        if shutil.which(_compiler()) is None:
            return f"no C compiler ({_compiler()}) on PATH and no build at {target}"
        start = time.perf_counter()
        _build(target)
        log.info("native kernels compiled in %.2f s: %s", time.perf_counter() - start, target)
    library = ctypes.CDLL(str(target))  # CDLL releases the GIL during calls
    log.info("native kernels chosen for this CPU: %s", kernel_isa(library))
    return library


def kernel_isa(library: ctypes.CDLL) -> str:
    """Which kernels ``library`` runs on this CPU: the aarch64 build says (its int8/int4 loops
    are chosen at load); the x86 build has one set."""
    try:
        isa = library.kernel_isa
    except AttributeError:
        return "x86-64 AVX2 and FMA"
    isa.argtypes, isa.restype = [], ctypes.c_char_p
    return isa().decode()


def _bind(lib: ctypes.CDLL, name: str, argtypes: list[Any]) -> Any:
    """The library's C function ``name`` (returning void) with its argument types."""
    kernel = getattr(lib, name)
    kernel.argtypes = argtypes
    kernel.restype = None
    return kernel


def _wrap_int8(lib: ctypes.CDLL, name: str = "int8_gemm") -> Int8Mm:
    kernel = _bind(lib, name, [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4)

    def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x fp32 (M, K) contiguous, weight int8 (N, K) contiguous, scales bf16 (N,) -> fp32 (M, N)."""
        m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
        y = torch.empty(m, n)
        kernel(weight.data_ptr(), scales.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
        return y

    return int8_mm


def _wrap_int4(lib: ctypes.CDLL, name: str = "int4_gemm") -> Int4Mm:
    kernel = _bind(lib, name, [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5)

    def int4_mm(x: torch.Tensor, weight: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
        """x fp32 (M, K) contiguous, weight uint8 (N, K/2) and scales_zeros bf16 (N, K/g, 2) in
        edgellm's int4 layout (``worker.kernels.quant``), contiguous -> fp32 (M, N)."""
        m, n, k = x.shape[0], weight.shape[0], 2 * weight.shape[1]
        y = torch.empty(m, n)
        kernel(weight.data_ptr(), scales_zeros.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k, group,
               torch.get_num_threads())
        return y

    return int4_mm


def _wrap_f32(lib: ctypes.CDLL) -> F32Mm:
    kernel = _bind(lib, "f32_gemm", [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4)

    def f32_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x fp32 (M, K) contiguous, weight fp32 (N, K) contiguous -> fp32 (M, N) = x @ weight.T."""
        m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
        y = torch.empty(m, n)
        kernel(weight.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
        return y

    return f32_mm


def _wrap_bf16(lib: ctypes.CDLL) -> Bf16Mm:
    kernel = _bind(lib, "bf16_gemm", [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4)

    def bf16_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x bf16 (M, K) contiguous, weight bf16 (N, K) contiguous -> bf16 (M, N) = x @ weight.T,
        summed in fp32."""
        m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
        y = torch.empty(m, n, dtype=torch.bfloat16)
        scratch = torch.empty(m, k)  # x as floats
        kernel(weight.data_ptr(), x.data_ptr(), y.data_ptr(), scratch.data_ptr(), m, n, k, torch.get_num_threads())
        return y

    return bf16_mm


def _wrap_rms_norm(lib: ctypes.CDLL) -> RmsNorm:
    kernel = _bind(lib, "rms_norm_rows", [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float])

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x fp32 (..., d) contiguous, weight fp32 (d,) -> fp32 of x's shape."""
        d = x.shape[-1]
        out = torch.empty(x.shape)
        kernel(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // d, d, eps)
        return out

    return rms_norm


def _wrap_silu_mul(lib: ctypes.CDLL) -> SiluMul:
    kernel = _bind(lib, "silu_mul_rows", [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2)

    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up fp32 (T, 2w) contiguous, each row [gate | up] -> silu(gate) * up, fp32 (T, w)."""
        m, w = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(m, w)
        kernel(gate_up.data_ptr(), out.data_ptr(), m, w)
        return out

    return silu_mul


class TokenAttention:
    """The attention of one new token per sequence over one model's KV cache (RoPE, cache write,
    attention: ``kernels/x86/decode.c`` says what it computes). Made once per model: the cache and
    RoPE tables never move, so their addresses and sizes are read here, not at every layer (a
    decode step's small calls run from cold caches, where each tensor method call counts)."""

    def __init__(self, kernel: Callable[..., None], k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                 signed_sin: torch.Tensor, num_q_heads: int, window: int | None, scale: float):
        """k_cache and v_cache fp32 (layers, slots, kh, max_len, hd), cos and signed_sin fp32
        (max_len, 1, hd), all contiguous."""
        for t in (k_cache, v_cache, cos, signed_sin):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError("TokenAttention takes contiguous float32 caches and tables")
        self._kernel = kernel
        self._tensors = (k_cache, v_cache, cos, signed_sin)  # kept alive: the kernel gets their addresses
        self._layer_bytes = k_cache.stride(0) * k_cache.element_size()
        self._k, self._v = k_cache.data_ptr(), v_cache.data_ptr()
        self._tables = (cos.data_ptr(), signed_sin.data_ptr())
        _, _, self._kh, self._max_len, self._hd = k_cache.shape
        self._qh, self._window, self._scale = num_q_heads, window or 0, scale
        self.width = (num_q_heads + 2 * self._kh) * self._hd  # floats of one token's q, k and v

    def __call__(self, layer: int, qkv: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """qkv fp32 (B, width): each row a token's q, k, v side by side, columns contiguous;
        slots and positions int64 (B,), which the caller has checked against the cache.
        Returns fp32 (B, qh * hd)."""
        batch = qkv.shape[0]
        out = torch.empty(batch, self._qh * self._hd)
        offset = layer * self._layer_bytes
        self._kernel(qkv.data_ptr(), qkv.stride(0), *self._tables, self._k + offset, self._v + offset,
                     slots.data_ptr(), positions.data_ptr(), batch, self._qh, self._kh, self._hd, self._max_len,
                     self._window, self._scale, out.data_ptr(), torch.get_num_threads())
        return out


def _wrap_decode_attention(lib: ctypes.CDLL) -> Callable[..., TokenAttention]:
    kernel = _bind(lib, "decode_attention", [ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 6,
                                             *[ctypes.c_int] * 6, ctypes.c_float, ctypes.c_void_p, ctypes.c_int])
    return partial(TokenAttention, kernel)


@dataclass(frozen=True)
class StepKernel:
    """``kernels/step.c``: a rank's whole decode step in one call (``worker.models.native_step``
    builds its arguments)."""

    run: Callable[..., int]  # decode_step(model, hidden, batch, slots, positions, scratch, first, seq, threads,
    #                                      failed_stage, allreduce_ns) -> 0 or an allreduce's error code
    scratch_floats: Callable[[Any, int], int]  # step_scratch_floats(model, batch)


def _wrap_decode_step(lib: ctypes.CDLL) -> Callable[[], StepKernel]:
    p, c_int = ctypes.c_void_p, ctypes.c_int
    run = lib.decode_step
    run.argtypes, run.restype = [p, p, c_int, p, p, p, c_int, ctypes.c_uint32, c_int, p, p], c_int
    scratch = lib.step_scratch_floats
    scratch.argtypes, scratch.restype = [p, c_int], ctypes.c_int64
    kernel = StepKernel(run, scratch)
    return lambda: kernel


_WRAPPERS: dict[str, tuple[Callable[[ctypes.CDLL], Callable[..., Any]], str]] = {
    "int8_mm": (_wrap_int8, "quantized layers use torch's _weight_int8pack_mm"),
    "int8_f32_mm": (partial(_wrap_int8, name="int8_gemm_f32"), "(an x86 variant for tests and bench/int4_kernels.py)"),
    "int4_mm": (_wrap_int4, "int4 layers are converted at load for torch's _weight_int4pack_mm_for_cpu"),
    "int4_f32_mm": (partial(_wrap_int4, name="int4_gemm_f32"), "(a variant for bench/int4_kernels.py)"),
    "f32_mm": (_wrap_f32, "float32 layers use torch's F.linear"),
    "bf16_mm": (_wrap_bf16, "bfloat16 layers use torch's F.linear"),
    "rms_norm": (_wrap_rms_norm, "RMSNorm runs in torch"),
    "silu_mul": (_wrap_silu_mul, "the gated MLP's activation runs in torch"),
    "decode_attention": (_wrap_decode_attention, "decode attention runs in torch (scaled_dot_product_attention)"),
    "decode_step": (_wrap_decode_step, "decode steps run layer by layer from Python"),
}


def _kernel(name: str) -> Callable[..., Any] | None:
    """The wrapper of kernel ``name``, or None where the library is not available (logged once
    per kernel)."""
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            if not _library:
                _library.append(_open_library())
            library, (wrap, fallback) = _library[0], _WRAPPERS[name]
            if isinstance(library, str):
                log.info("native %s kernel off (%s): %s", name, library, fallback)
                _loaded[name] = None
            else:
                try:
                    _loaded[name] = wrap(library)
                except AttributeError:  # a kernel this machine's sources do not have
                    log.info("native %s kernel off (not in the %s build): %s", name, machine(), fallback)
                    _loaded[name] = None
                else:
                    log.info("native %s kernel on: %s", name, library._name)
    return _loaded[name]


def int8_mm() -> Int8Mm | None:
    """The native int8 matmul, or None where it is not available."""
    return _kernel("int8_mm")


def int8_f32_mm() -> Int8Mm | None:
    """x86: the int8 product with fp32 activations for any row count (what ``int8_mm`` runs from
    12 rows on), for tests and the bench; None elsewhere."""
    return _kernel("int8_f32_mm")


def int4_mm() -> Int4Mm | None:
    """The native edgellm-int4 matmul (int8-quantized activations), or None where it is not available."""
    return _kernel("int4_mm")


def int4_f32_mm() -> Int4Mm | None:
    """The same product with fp32 activations (dequantize and FMA), kept for the bench."""
    return _kernel("int4_f32_mm")


def f32_mm() -> F32Mm | None:
    """The native float32 matmul for few rows (``F32_MAX_ROWS``), or None where it is not available."""
    return _kernel("f32_mm")


def bf16_mm() -> Bf16Mm | None:
    """The native bfloat16 matmul for few rows (``F32_MAX_ROWS``), or None where it is not available."""
    return _kernel("bf16_mm")


def rms_norm() -> RmsNorm | None:
    """The native fp32 RMSNorm, or None where it is not available."""
    return _kernel("rms_norm")


def silu_mul() -> SiluMul | None:
    """The native fp32 SiLU-gated activation, or None where it is not available."""
    return _kernel("silu_mul")


def token_attention() -> Callable[..., TokenAttention] | None:
    """``TokenAttention``'s constructor with the native kernel bound (the rest of its arguments
    to give), or None where the kernel is not available."""
    return _kernel("decode_attention")


def decode_step() -> StepKernel | None:
    """The native whole-step kernel (``kernels/step.c``), or None where it is not available."""
    make = _kernel("decode_step")
    return None if make is None else make()
