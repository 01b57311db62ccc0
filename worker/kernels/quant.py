"""Weight-only int8 / int4 quantization: the shard format, and ``linear``, the one funnel every
weight matmul of a rank goes through.

On disk (``edgellm shard --quantize``) a quantized matrix ``name`` of shape (N, K) is two
tensors of its block. The bytes are edgellm's own (``QUANT_FORMAT``), the same whatever CPU
writes or reads them:

- int8, symmetric per output channel: ``name`` int8 (N, K) and ``name.scales`` bfloat16 (N,);
  ``w[n, k] ~= q[n, k] * scales[n]``.
- int4, asymmetric per group of ``g`` inputs (g in ``GROUP_SIZES``; needs K % g == 0 only):
  ``name`` uint8 (N, K/2), row-major by output row n. Each row is K/32 blocks of 16 bytes; in
  block b, byte i (0..15) is ``q[n, 32b+i] | (q[n, 32b+16+i] << 4)``: the low nibbles are the
  block's first 16 inputs, the high nibbles its last 16 (ggml Q4_0's order), q in 0..15.
  ``name.scales_zeros`` bfloat16 (N, K/g, 2): (scale, zero) of row n, group j, and
  ``w[n, k] ~= (q[n, k] - 8) * scale + zero`` with j = k // g.

Format 1 (before QUANT_FORMAT was written) stored int4 nibbles in the byte order that torch's
``_convert_weight_to_int4pack_for_cpu`` produces on AVX2; that order depends on the CPU
capability torch picks (``default`` on every ARM CPU, ``avx2``, ``avx512`` differ), so such a
shard computed garbage elsewhere. Its int4 shards are refused (``worker.shards.weights``).

Where int4 computes: the native kernel (``worker.kernels.native.int4_mm``: x86 AVX2, or NEON on aarch64)
reads these bytes as they lie in a block's buffer. Without one, ``kernel_layout`` rewrites each
int4 matrix in place, right after its block is read (``ShardFile.read_into``: resident loads,
the streamed window and the expert cache alike), into what torch's
``_weight_int4pack_mm_for_cpu`` wants under the running capability: nibbles through
``_convert_weight_to_int4pack_for_cpu`` 64 rows at a time, scales transposed to (K/g, N, 2).
It needs N % 16 == 0, so the last N % 16 rows stay in edgellm's layout and are dequantized at
each product. The conversion allocates no more than 64 rows' nibbles as int32 and one copy of
the scales; its time is in docs/quantization.md.

Scales are stored in bfloat16, the dtype the kernels run in (below): a bf16 scale is off by at
most 2^-9 (0.2%), an order of magnitude under the rounding error of the weights themselves.

Compute never builds a float copy of a weight: ``linear`` calls a kernel on the stored tensors.
int8 with fp32 activations goes to the native kernel of ``worker.kernels.native`` where it builds (x86-64
with AVX2: 1.8x torch's at decode, fp32 activations), and so does int4 with any activations
(``int4_mm``: activations in int8 per 32 inputs; 1.6-8x torch's int4 kernel, docs/quantization.md). Otherwise ``_weight_int8pack_mm`` or
``_weight_int4pack_mm_for_cpu``, both with bfloat16 activations (``KERNEL_DTYPE``): measured on
this AVX2 machine at decode (one row, 2048-5632 wide), torch's int8 kernel takes 0.25-0.45x the
time of an fp32 ``F.linear`` with bf16 activations, 3-4x with fp32 ones and 4-9x with fp16 ones,
so any other activation dtype would make quantization slower than no quantization. The
activations' bf16 rounding (0.4%) is small next to the weights' int8 (about 1%) or int4 (about
10%) rounding; ``bench/quant.py`` measures the end-to-end error.

Norms, biases, routers, the shared-expert gate and the hub's embedding stay in float: they
are a small share of the bytes read per token (the embedding is read one row per token), and
routers/gates pick discrete experts, where a small error flips a choice. The LM head (split
over the ranks by rows, ``worker.rank.head``) is int8 per output row by default
(``QuantSpec.lm_head_bits``): it is read whole at every step and
is the largest single matrix (vocab x hidden: 40% of an int8 shard's per-token bytes for a
512-wide, 8000-word model, 15% of a 1.1B step in fp32). Its error is the int8 rounding of the
weights; ``bench/quant.py`` reports it with and without (``--lm-head float``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.config import CheckpointError
from worker.kernels import native

log = logging.getLogger(__name__)

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
SCALE_DTYPE = torch.bfloat16
KERNEL_DTYPE = torch.bfloat16  # activations of the quantized kernels (module docstring); ``linear`` casts to it
# The weight matrices of a block that are quantized; everything else stays in float.
QUANTIZED_FIELDS = ("wqkv", "wo", "w_gate_up", "w_down", "shared_gate_up", "shared_down")
# Side tensors: int8 scales; int4 (scale, zero) in edgellm's layout; and the same converted in
# place for torch's kernel (``kernel_layout``), a name no shard file holds.
_SCALES, _SCALES_ZEROS, _TORCH_SCALES_ZEROS = "scales", "scales_zeros", "torch_scales_zeros"
INT8_K_MULTIPLE = 8  # _weight_int8pack_mm reads K in steps of 8 and crashes (SIGSEGV) otherwise
# The byte layout of quantized shards (module docstring); 1 was torch's AVX2 int4 order. Written
# in the shard manifest and in the quantized cache's key.
QUANT_FORMAT = 2
Q4_BLOCK = 32  # inputs per int4 block of 16 bytes
TORCH_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu's rows ("expect N to be dividable by 16")
# Rows converted at a time: a multiple of every capability's row block (32 on default/AVX2, 64 on
# AVX-512), so each chunk converts to the rows of the whole matrix's conversion.
_CONVERT_ROWS = 64


class QuantError(CheckpointError):
    """A quantization setting that cannot apply to this model or split."""


@dataclass(frozen=True)
class QuantSpec:
    """What ``edgellm shard`` quantizes: ``bits`` for the dense matrices (None: float),
    ``expert_bits`` for routed experts (None: as ``bits``), int4 groups of ``group_size``, and
    the LM head (each rank's rows of it) in int8 (``lm_head_bits`` 8) or float (None)."""

    bits: int | None = 8
    group_size: int = 64
    expert_bits: int | None = None
    lm_head_bits: int | None = 8

    def __post_init__(self) -> None:
        for what, bits in (("--quantize", self.bits), ("--expert-bits", self.expert_bits)):
            if bits is not None and bits not in BITS:
                raise QuantError(f"{what} must be int8 or int4 (8 or 4 bits), got {bits}")
        if self.lm_head_bits not in (None, 8):
            raise QuantError(f"--lm-head must be int8 or float, got {self.lm_head_bits} bits")
        if self.group_size not in GROUP_SIZES:
            raise QuantError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} "
                             f"(the int4 kernel's group sizes), got {self.group_size}")

    def bits_for(self, block: str) -> int | None:
        """Bits of the matrices of ``block`` (``layers.L.experts.E`` is a routed expert)."""
        if ".experts." in block and self.expert_bits is not None:
            return self.expert_bits
        return self.bits

    def to_dict(self) -> dict[str, int | None]:
        return {"bits": self.bits, "group_size": self.group_size, "expert_bits": self.expert_bits,
                "lm_head_bits": self.lm_head_bits}


@dataclass(frozen=True)
class QuantWeight:
    """A quantized (N, K) matrix as the kernels take it (views into a block's buffer)."""

    weight: torch.Tensor  # int8 (N, K), or uint8 (N, K/2) in edgellm's int4 layout (pack_int4)
    scales: torch.Tensor  # int8: (N,); int4: (N, K/g, 2) scale and zero
    group_size: int  # 0 for int8
    # int4 converted for torch's kernel (``kernel_layout``): weight holds its first N - N % 16
    # rows in _convert_weight_to_int4pack_for_cpu's order and scales is (K/g, N - N % 16, 2);
    # the rest of the rows, in edgellm's layout, are ``tail`` (None when N % 16 == 0).
    torch_layout: bool = False
    tail: QuantWeight | None = None

    @property
    def bits(self) -> int:
        return 4 if self.group_size else 8

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.weight.shape
        return n + (self.tail.shape[0] if self.tail else 0), k * (2 if self.group_size else 1)

    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.weight, self.scales))
        return own + (self.tail.nbytes() if self.tail else 0)

    def dequantize(self) -> torch.Tensor:
        """The fp32 (N, K) matrix this weight stands for (tests, error checks and the rows torch's
        int4 kernel cannot take; the products never call it otherwise)."""
        s = self.scales.float()
        if not self.group_size:
            return self.weight.float() * s[:, None]
        if self.torch_layout:
            parts = [self.tail] if self.tail else []
            if self.weight.shape[0]:
                parts.insert(0, QuantWeight(pack_int4(unpack_torch_int4(self.weight)), self.scales.transpose(0, 1),
                                            self.group_size))
            return torch.cat([part.dequantize() for part in parts])
        n, k = self.shape
        q = unpack_int4(self.weight).float().view(n, k // self.group_size, self.group_size)  # (N, K/g, g)
        scale, zero = s[..., 0, None], s[..., 1, None]  # (N, K/g, 1) each
        return ((q - 8) * scale + zero).view(n, k)


Weight = torch.Tensor | QuantWeight


# The native kernel of a float dtype (both operands in it), for few rows; None where it is off.
_FLOAT_KERNELS: dict[torch.dtype, Callable[[], native.F32Mm | None]] = {torch.float32: native.f32_mm,
                                                                         torch.bfloat16: native.bf16_mm}


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a float or a quantized weight: (..., K) -> (..., N) in ``x``'s dtype.
    fp32 activations go to the native kernels where they run (``worker.kernels.native``): every int8
    matrix, and float32 ones for up to ``native.F32_MAX_ROWS`` rows; so do bfloat16 activations
    times bfloat16 matrices. int4 in edgellm's layout goes to the native int4 kernel, int4
    converted at load (``kernel_layout``) to torch's."""
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (T, K)
    if isinstance(w, torch.Tensor):
        native_kernel = _FLOAT_KERNELS.get(x.dtype) if x.dtype == w.dtype else None
        kernel = native_kernel() if native_kernel and flat.shape[0] <= native.F32_MAX_ROWS and w.is_contiguous() \
            else None
        if kernel is None:
            return F.linear(x, w, bias)
        y = kernel(flat.contiguous(), w)  # (T, N)
    elif (not w.group_size and x.dtype == torch.float32 and w.scales.dtype == SCALE_DTYPE
            and (int8_mm := native.int8_mm()) is not None):
        y = int8_mm(flat.contiguous(), w.weight.contiguous(), w.scales.contiguous())  # (T, N)
    elif w.group_size and not w.torch_layout:
        y = _edgellm_int4(flat, w).to(x.dtype)  # (T, N)
    else:
        y = _torch_kernel(flat, w)  # (T, N) in KERNEL_DTYPE
        # .bfloat16() / .float() rather than .to(dtype): the same copy, half the Python-side cost
        # (about 3 us instead of 6 here), and a decode step makes 2 per matmul.
        y = y.float() if x.dtype == torch.float32 else y.to(x.dtype)
    if x.dim() != 2:
        y = y.view(*x.shape[:-1], y.shape[-1])  # (..., N)
    return y if bias is None else y + bias


def _torch_kernel(flat: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """torch's weight-only kernel for ``w`` on rows ``flat`` (T, K): (T, N) in ``KERNEL_DTYPE``."""
    scales = w.scales if w.scales.dtype == KERNEL_DTYPE else w.scales.to(KERNEL_DTYPE)
    if not w.group_size:
        return torch.ops.aten._weight_int8pack_mm(flat.bfloat16(), w.weight, scales)
    parts = []
    if w.weight.shape[0]:
        parts.append(torch.ops.aten._weight_int4pack_mm_for_cpu(flat.bfloat16(), w.weight, w.group_size, scales))
    if w.tail is not None:  # (T, N % 16): as the kernel does, bf16 x and fp32 sums
        parts.append(F.linear(flat.bfloat16().float(), w.tail.dequantize()).bfloat16())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (T, N)


_warned_unconverted: list[bool] = []


def _edgellm_int4(flat: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """An int4 weight in edgellm's layout on rows ``flat`` (T, K): (T, N) in fp32, by the native
    kernel; without one, converted for torch's kernel at every call (a block that did not come
    through ``kernel_layout``: correct, slow, and said once)."""
    if (int4_mm := native.int4_mm()) is not None:
        return int4_mm(flat.float().contiguous(), w.weight.contiguous(), w.scales.contiguous(), w.group_size)
    if not _warned_unconverted:
        _warned_unconverted.append(True)
        log.warning("an int4 matrix in edgellm's layout is converted for torch's kernel at every product; "
                    "blocks read through ShardFile are converted once, as they load")
    converted = to_torch_layout(w.weight.clone(), w.scales.clone(), w.group_size)
    return _torch_kernel(flat, converted).float()


def field(fields: dict[str, torch.Tensor], name: str) -> Weight | None:
    """Field ``name`` of a block: a ``QuantWeight`` when the block stores it quantized."""
    w = fields.get(name)
    if w is None:
        return None
    if (scales := fields.get(f"{name}.{_SCALES}")) is not None:
        _check_int8(name, w.shape[0], w.shape[1])
        return QuantWeight(w, scales, 0)
    if (scales_zeros := fields.get(f"{name}.{_SCALES_ZEROS}")) is not None:
        n, k = w.shape[0], 2 * w.shape[1]
        group = k // max(1, scales_zeros.shape[1])
        _check_int4(name, n, k, group)
        return QuantWeight(w, scales_zeros, group)
    if (converted := fields.get(f"{name}.{_TORCH_SCALES_ZEROS}")) is not None:
        return to_torch_layout(w, converted, 2 * w.shape[1] // converted.shape[1], in_place=False)
    return w


def quantize_lm_head(lm_head: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The hub file's ``lm_head`` fields in int8 (per output row), or None when its width does
    not suit the kernel (it then stays in float)."""
    if lm_head.shape[1] % INT8_K_MULTIPLE:
        log.warning("LM head %s stays in float: int8 needs a hidden size divisible by %d",
                    tuple(lm_head.shape), INT8_K_MULTIPLE)
        return None
    q, scales = quantize_int8(lm_head)
    return {"lm_head": q, f"lm_head.{_SCALES}": scales}


def is_aux(name: str) -> bool:
    """Whether a block field is a quantization side tensor (kept in its stored dtype)."""
    return name.endswith((f".{_SCALES}", f".{_SCALES_ZEROS}", f".{_TORCH_SCALES_ZEROS}"))


def block_bits(fields: dict[str, torch.Tensor]) -> set[int]:
    """The bit widths of a block's quantized matrices (empty for a float block)."""
    return {8 if n.endswith(f".{_SCALES}") else 4 for n in fields if is_aux(n)}


def _check_int8(name: str, n: int, k: int) -> None:
    if k % INT8_K_MULTIPLE:
        raise QuantError(f"{name} ({n}x{k}): int8 needs an input width divisible by {INT8_K_MULTIPLE}; "
                         f"change the split (--weights) or leave it in float")


def _check_int4(name: str, n: int, k: int, group: int) -> None:
    if group not in GROUP_SIZES or k % group:
        raise QuantError(f"{name} ({n}x{k}): int4 with --group-size {group} needs an input width divisible "
                         f"by {group}; use a group size that divides {k}, another split (--weights) or int8")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8: (q int8 (N, K), scales (N,) bf16) with w ~= q * scales."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)  # (N,)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)  # from the stored scale
    return q, scales


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` inputs (min/max): (packed uint8 (N, K/2) in
    edgellm's layout, scales_zeros (N, K/g, 2) bf16) with w ~= (q - 8) * scale + zero."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)  # (N, K/g, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, K/g)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)  # (N, K/g, g)
    return pack_int4(q.view(n, k).to(torch.uint8)), torch.stack([scale, zero], dim=-1)  # (N, K/g, 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Nibbles (N, K) in 0..15 -> uint8 (N, K/2) in edgellm's layout: per block of 32 inputs,
    byte i holds input i (low nibble) and input 16 + i (high)."""
    n, k = q.shape
    v = q.to(torch.uint8).view(n, k // Q4_BLOCK, 2, Q4_BLOCK // 2)  # (N, K/32, half, 16)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).view(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: uint8 (N, K/2) -> nibbles uint8 (N, K)."""
    n, half = packed.shape
    v = packed.reshape(n, half // 16, 1, 16)  # (N, K/32, 1, 16)
    return torch.cat([v & 15, v >> 4], dim=2).view(n, 2 * half)  # (N, K/32, half, 16) -> (N, K)


def unpack_torch_int4(packed: torch.Tensor) -> torch.Tensor:
    """Nibbles uint8 (N, K) of a matrix in torch's packed order for the running capability (the
    inverse of _convert_weight_to_int4pack_for_cpu, read back through its own kernel: the
    product with the identity, groups of 32, scale 1 and zero 8, returns q). For tests."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    ones = torch.ones(k // 32, n, 2, dtype=torch.bfloat16)
    ones[..., 1] = 8
    eye = torch.eye(k, dtype=torch.bfloat16)
    q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, 32, ones)  # (K, N): q.T exactly (0..15 in bf16)
    return q.t().round().to(torch.uint8).contiguous()


def to_torch_layout(weight: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                    in_place: bool = True) -> QuantWeight:
    """An int4 matrix in edgellm's layout (weight uint8 (N, K/2), scales_zeros (N, K/g, 2)) as
    torch's ``_weight_int4pack_mm_for_cpu`` takes it under the running CPU capability, written
    over the same memory (``in_place``; else the memory already holds it, as ``kernel_layout``
    left it): the first N16 = N - N % 16 rows through ``_convert_weight_to_int4pack_for_cpu``
    (which needs N % 16 == 0) in chunks of ``_CONVERT_ROWS`` rows, their scales transposed to
    (K/g, N16, 2) at the start of the scales' memory; the last rows stay as they were (``tail``)."""
    n, half = weight.shape
    groups = scales_zeros.shape[1]
    n16 = n - n % TORCH_INT4_N_MULTIPLE
    if in_place:
        for r in range(0, n16, _CONVERT_ROWS):
            e = min(r + _CONVERT_ROWS, n16)
            nibbles = unpack_int4(weight[r:e]).to(torch.int32)  # (rows, K)
            weight[r:e].copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1))
        head_scales = scales_zeros[:n16].transpose(0, 1).contiguous()  # (K/g, N16, 2)
        scales_zeros.view(-1)[: head_scales.numel()].copy_(head_scales.view(-1))
    flat = scales_zeros.view(-1)
    tail = None
    if n16 < n:
        tail = QuantWeight(weight[n16:], flat[n16 * groups * 2:].view(n - n16, groups, 2), group)
    return QuantWeight(weight[:n16], flat[: n16 * groups * 2].view(groups, n16, 2), group, torch_layout=True,
                       tail=tail)


def kernel_layout(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A block's fields as the running int4 kernel reads them: as they are where the native int4
    kernel runs; otherwise each int4 matrix converted in place for torch's kernel, its scales
    renamed so that ``field`` knows. Called on every block read from a shard (``ShardFile``)."""
    int4 = [name for name in fields if name.endswith(f".{_SCALES_ZEROS}")]
    if not int4 or native.int4_mm() is not None:
        return fields
    out = dict(fields)
    for aux in int4:
        name = aux.removesuffix(f".{_SCALES_ZEROS}")
        w, scales_zeros = out[name], out.pop(aux)
        to_torch_layout(w, scales_zeros, 2 * w.shape[1] // scales_zeros.shape[1])
        out[f"{name}.{_TORCH_SCALES_ZEROS}"] = scales_zeros
    return out


def quantize_block(block: str, fields: dict[str, torch.Tensor], bits: int | None, group_size: int,
                   float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A block's fields with its weight matrices quantized to ``bits`` (None: none) and every
    other float field in ``float_dtype``. Fields come out widest dtype first, so each tensor
    starts aligned to its element size in the block's contiguous byte range."""
    out: dict[str, torch.Tensor] = {}
    for name, t in fields.items():
        where = f"{block}.{name}"
        if bits is None or name not in QUANTIZED_FIELDS:
            out[name] = t.to(float_dtype) if t.is_floating_point() else t
        elif bits == 8:
            _check_int8(where, *t.shape)
            out[name], out[f"{name}.{_SCALES}"] = quantize_int8(t)
        else:
            _check_int4(where, t.shape[0], t.shape[1], group_size)
            out[name], out[f"{name}.{_SCALES_ZEROS}"] = quantize_int4(t, group_size)
    return dict(sorted(out.items(), key=lambda item: -item[1].element_size()))
