"""The data-plane wire format: a fixed binary header frame plus raw tensor frames.

No pickle: every frame is either this struct header or the raw bytes of a tensor whose
dtype and shape the header names. Decoding validates sizes before touching the bytes.
"""

from __future__ import annotations

import ctypes
import enum
import math
import struct
from dataclasses import dataclass

import torch

MAGIC = b"EDG1"
# magic, kind, dtype code, ndim, step id, sequence number within the step, 4 dims
_HEADER = struct.Struct("<4sBBBxQI4q")
MAX_DIMS = 4


class WireError(ValueError):
    """A frame that does not follow the wire format."""


class Kind(enum.IntEnum):
    HELLO = 1  # rank -> hub after loading: payload = rank (int64); CURVE has checked its token
    STEP = 2  # hub -> ranks: payload = spans (S, 3) int64 and hidden (T, d)
    PARTIAL = 3  # rank -> hub: this rank's partial block output (T, d)
    REDUCED = 4  # hub -> ranks: the summed block output (T, d)
    STOP = 5  # hub -> ranks: leave the data-plane loop
    WELCOME = 6  # hub -> rank: HELLO accepted
    ABORT = 7  # hub -> ranks: the current step is abandoned (a rank failed); wait for the next
    LOGITS = 8  # rank -> hub, after the last layer: its (R, V_r) float32 logits of the LM head rows it holds


# Bits of a STEP message's seq field (a STEP has no allreduce sequence of its own).
STEP_ON_LANES = 1  # the step's allreduces and logits go over the lanes, not ZeroMQ
STEP_ALL_LOGITS = 2  # logits of every token of the step, not only each span's last


DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.int64,
                                  4: torch.uint8, 5: torch.int8}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Header:
    kind: Kind
    step: int = 0
    seq: int = 0
    dtype: torch.dtype = torch.float32
    shape: tuple[int, ...] = ()

    def pack(self) -> bytes:
        dims = list(self.shape) + [0] * (MAX_DIMS - len(self.shape))
        return _HEADER.pack(MAGIC, int(self.kind), DTYPE_CODES[self.dtype], len(self.shape), self.step,
                            self.seq, *dims)

    @classmethod
    def unpack(cls, frame: bytes | memoryview) -> Header:
        if len(frame) != _HEADER.size:
            raise WireError(f"header frame of {len(frame)} bytes, expected {_HEADER.size}")
        magic, kind, dtype, ndim, step, seq, *dims = _HEADER.unpack(frame)
        if magic != MAGIC:
            raise WireError("bad magic in header")
        if kind not in Kind._value2member_map_ or dtype not in DTYPES or ndim > MAX_DIMS:
            raise WireError(f"bad header fields kind={kind} dtype={dtype} ndim={ndim}")
        if any(d < 0 for d in dims[:ndim]):
            raise WireError("negative dimension in header")
        return cls(Kind(kind), step, seq, DTYPES[dtype], tuple(dims[:ndim]))


@dataclass(frozen=True)
class Message:
    kind: Kind
    step: int
    seq: int
    tensors: list[torch.Tensor]


def encode_message(kind: Kind, tensors: list[torch.Tensor] = (), step: int = 0, seq: int = 0) -> list:  # type: ignore[assignment]
    """Frames ``[header, bytes, header, bytes, ...]``; a message without tensors is one header.

    Tensor bytes are zero-copy views of contiguous CPU tensors.
    """
    if not tensors:
        return [Header(kind, step, seq).pack()]
    frames: list = []
    for tensor in tensors:
        tensor = tensor.detach().contiguous()
        frames.append(Header(kind, step, seq, tensor.dtype, tuple(tensor.shape)).pack())
        frames.append(tensor.view(torch.uint8).numpy().data)
    return frames


def decode_message(frames: list) -> Message:
    """Parse and validate the frames of one message (``bytes`` or ``zmq.Frame``)."""
    raw = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    if not raw:
        raise WireError("empty message")
    first = Header.unpack(raw[0])
    if len(raw) == 1:
        return Message(first.kind, first.step, first.seq, [])
    if len(raw) % 2:
        raise WireError(f"odd number of frames ({len(raw)}) in a tensor message")
    tensors = []
    for i in range(0, len(raw), 2):
        header = first if i == 0 else Header.unpack(raw[i])
        if (header.kind, header.step, header.seq) != (first.kind, first.step, first.seq):
            raise WireError("frames of one message disagree on kind/step/seq")
        tensors.append(decode_tensor(header, raw[i + 1]))
    return Message(first.kind, first.step, first.seq, tensors)


def decode_tensor(header: Header, payload: bytes | memoryview) -> torch.Tensor:
    """Rebuild the tensor a header describes, checking the byte count first."""
    itemsize = header.dtype.itemsize
    expected = math.prod(header.shape) * itemsize  # exact: huge header dims cannot wrap around
    if len(payload) != expected:
        raise WireError(f"payload of {len(payload)} bytes, header says {header.shape} {header.dtype}")
    if expected == 0:
        return torch.empty(header.shape, dtype=header.dtype)
    # Zero-copy: the tensor views the received frame's memory (a writable zmq.Frame buffer, kept
    # alive by the tensor). Read-only ``bytes`` and misaligned buffers are copied first.
    view = memoryview(payload)
    if view.readonly:
        view = memoryview(bytearray(view))
    tensor = torch.frombuffer(view, dtype=header.dtype)
    if tensor.data_ptr() % itemsize:
        tensor = tensor.clone()
    return tensor.view(header.shape)


# --- a STEP on a lane ------------------------------------------------------------------------------
# One lane frame carries two buffers back to back and names only the first one's dtype, so a
# STEP there is an int64 layout (spans count, hidden's dtype code, ndim, 4 dims) and the (S, 3)
# int64 spans, followed by the hidden states' bytes. Built and read with struct and one copy
# each: torch's small ops cost 1-3 µs apiece, and both ends of a STEP are on a token's path.
_STEP_LAYOUT = struct.Struct(f"<{3 + MAX_DIMS}q")


def lane_step_layout(spans: torch.Tensor, hidden: torch.Tensor) -> bytes:
    """The first part of a STEP frame on a lane: the layout and the (S, 3) int64 spans; the
    hidden states (contiguous) follow it in the frame."""
    dims = list(hidden.shape) + [0] * (MAX_DIMS - hidden.dim())
    return _STEP_LAYOUT.pack(spans.shape[0], DTYPE_CODES[hidden.dtype], hidden.dim(), *dims) \
        + spans.to(torch.int64).contiguous().numpy().tobytes()


def decode_lane_step(address: int, nbytes: int) -> list[torch.Tensor]:
    """[spans (S, 3) int64, hidden] of the STEP frame payload of ``nbytes`` at ``address`` (a lane's
    buffer, which the step's allreduces reuse), checked against its layout and copied out."""
    if nbytes < _STEP_LAYOUT.size:
        raise WireError(f"a STEP frame of {nbytes} bytes")
    count, code, ndim, *dims = _STEP_LAYOUT.unpack(ctypes.string_at(address, _STEP_LAYOUT.size))
    if code not in DTYPES or not 0 <= ndim <= MAX_DIMS or count < 0 or any(d < 0 for d in dims[:ndim]):
        raise WireError(f"bad STEP layout: {count} spans, dtype code {code}, {ndim} dims {dims}")
    dtype, shape = DTYPES[code], tuple(dims[:ndim])
    spans_end = _STEP_LAYOUT.size + 24 * count
    if nbytes != spans_end + math.prod(shape) * dtype.itemsize:  # exact: huge dims cannot wrap around
        raise WireError(f"a STEP frame of {nbytes} bytes for {count} spans and {shape} {dtype}")
    spans = torch.empty((count, 3), dtype=torch.int64)
    hidden = torch.empty(shape, dtype=dtype)  # (T, d)
    for tensor, start, end in ((spans, _STEP_LAYOUT.size, spans_end), (hidden, spans_end, nbytes)):
        if end > start:
            ctypes.memmove(tensor.data_ptr(), address + start, end - start)
    return [spans, hidden]


# --- allreduce payloads in the cluster's sync dtype ---------------------------------------------
# fp32 is exact: partials travel in the model's own dtype. fp16/bf16 halve the bytes; int8
# carries blocks of 32 values with one float32 absmax scale per block (1.125 bytes a value, as
# distributed-llama's Q80 but with a float32 scale: a partial as small as 1e-8 keeps its digits),
# the values (..., d) then the scales (..., d / 32). kernels/lane.c computes the same format with
# the same float operations in the same order, so a step summed in C and one summed here give
# the same bits (tests/test_lane.py checks it).
SYNC_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                                       "int8": torch.int8}
_SYNC_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # the planner's spelling
INT8_LEVELS = 127
INT8_BLOCK = 32  # values per int8 scale (kernels/lane.c's Q8_BLOCK)
# Narrower payloads go exact whatever the setting: their bytes are negligible, and they are
# statistics (OLMoE's (T, 2) sums of squares) whose range fp16 cannot hold. So do int8 payloads
# whose width is not a whole number of blocks.
LOSSY_MIN_WIDTH = 64


def sync_dtype_name(name: str) -> str:
    """The canonical sync dtype name (``fp32``, ``fp16``, ``bf16``, ``int8``) of a name or alias."""
    canonical = _SYNC_ALIASES.get(name, name)
    if canonical not in SYNC_DTYPES:
        raise ValueError(f"unknown sync dtype {name!r} (choose from {', '.join(SYNC_DTYPES)})")
    return canonical


def effective_sync(sync: str, shape: tuple[int, ...]) -> str:
    """The sync dtype a payload of ``shape`` travels in: ``sync``, or fp32 below ``LOSSY_MIN_WIDTH``
    (and, for int8, where the width is not a multiple of ``INT8_BLOCK``)."""
    if not shape or shape[-1] < LOSSY_MIN_WIDTH or (sync == "int8" and shape[-1] % INT8_BLOCK):
        return "fp32"
    return sync


def _int8_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-1], shape[-1] // INT8_BLOCK)


def sync_payload(tensor: torch.Tensor, sync: str) -> list[torch.Tensor]:
    """The tensors that carry ``tensor`` in ``sync``: one, or (int8) the values and their block scales."""
    sync = effective_sync(sync, tuple(tensor.shape))
    if sync == "fp32":
        return [tensor]
    if sync != "int8":
        return [tensor.to(SYNC_DTYPES[sync])]
    shape = tuple(tensor.shape)
    blocks = tensor.float().reshape(*shape[:-1], -1, INT8_BLOCK)  # (..., d / 32, 32)
    # (..., d / 32, 1); the floor keeps an all-zero block's scale positive: its values stay exactly 0
    scale = blocks.abs().amax(dim=-1, keepdim=True).div_(INT8_LEVELS).clamp_(min=torch.finfo(torch.float32).tiny)
    quantized = blocks.div(scale).round_().clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return [quantized.view(shape), scale.view(_int8_scale_shape(shape))]


def check_sync_payload(tensors: list[torch.Tensor], sync: str, shape: tuple[int, ...],
                       exact_dtype: torch.dtype) -> None:
    """Refuse (``WireError``) anything but a ``sync`` payload of ``shape``: tensor count, dtypes,
    shapes, and (int8) a finite float32 scale per block. ``exact_dtype``: what fp32 sync travels in
    (the model's dtype)."""
    sync = effective_sync(sync, shape)
    expected = exact_dtype if sync == "fp32" else SYNC_DTYPES[sync]
    count = 2 if sync == "int8" else 1
    if len(tensors) != count:
        raise WireError(f"{sync} payload of {len(tensors)} tensors, expected {count}")
    values = tensors[0]
    if values.dtype != expected or tuple(values.shape) != tuple(shape):
        raise WireError(f"{sync} payload is {tuple(values.shape)} {values.dtype}, expected {tuple(shape)} {expected}")
    if sync != "int8":
        return
    scale = tensors[1]
    scale_shape = _int8_scale_shape(shape)
    if scale.dtype != torch.float32 or tuple(scale.shape) != scale_shape:
        raise WireError(f"int8 scale is {tuple(scale.shape)} {scale.dtype}, expected {scale_shape} float32")
    if not bool(torch.isfinite(scale).all()):
        raise WireError("int8 scale holds a non-finite value")


def sync_value(tensors: list[torch.Tensor], sync: str, shape: tuple[int, ...],
               exact_dtype: torch.dtype, check: bool = True) -> torch.Tensor:
    """The values of a ``sync`` payload: a view of the received bytes where no conversion is
    needed, a float32 tensor otherwise. ``check=False`` only for a payload built here."""
    if check:
        check_sync_payload(tensors, sync, shape, exact_dtype)
    if effective_sync(sync, shape) != "int8":
        return tensors[0]
    return _dequantized(tensors)


def _dequantized(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The float32 values of an int8 payload: each value times its block's scale, one rounding."""
    values, scale = tensors
    blocks = values.float().view(*values.shape[:-1], -1, INT8_BLOCK)  # (..., d / 32, 32)
    return blocks.mul_(scale.unsqueeze(-1)).view(values.shape)


def add_sync_payload(total: torch.Tensor, tensors: list[torch.Tensor], sync: str) -> None:
    """``total += value`` of a payload ``sync_value`` has checked, in place. int8: the value is
    rounded on its own before the add (no fused multiply-add), as kernels/lane.c does it."""
    if effective_sync(sync, tuple(total.shape)) == "int8":
        total.add_(_dequantized(tensors))
    else:
        total.add_(tensors[0])


def sum_payloads(payloads: list[list[torch.Tensor]], sync: str, shape: tuple[int, ...],
                 exact_dtype: torch.dtype) -> torch.Tensor:
    """The float32 sum of checked ``sync`` payloads, added in the given (rank) order, as
    ``exact_dtype``. Ranks that sum the same payloads in the same order hold the same bits."""
    total = sync_value(payloads[0], sync, shape, exact_dtype, check=False).to(torch.float32, copy=True)
    for payload in payloads[1:]:
        add_sync_payload(total, payload, sync)
    return total.to(exact_dtype)


def split_sync_payload(raw: torch.Tensor, fmt: int, sync: str, shape: tuple[int, ...],
                       exact_dtype: torch.dtype) -> list[torch.Tensor]:
    """A ``sync`` payload of ``shape`` from the bytes of one lane frame (``worker.comm.lane``), where
    its tensors lie back to back and ``fmt`` is the ``DTYPES`` code of the first, as views of
    ``raw`` (uint8), checked like ``check_sync_payload``. Raises ``WireError`` when the dtype or
    the byte count does not fit (a lane frame carries no shapes: the step fixes them)."""
    sync = effective_sync(sync, shape)
    dtypes = [(exact_dtype if sync == "fp32" else SYNC_DTYPES[sync], shape)]
    if sync == "int8":
        dtypes.append((torch.float32, _int8_scale_shape(shape)))
    sizes = [math.prod(s) * d.itemsize for d, s in dtypes]
    if DTYPES.get(fmt) != dtypes[0][0]:
        raise WireError(f"{sync} payload of dtype code {fmt}, expected {dtypes[0][0]}")
    if raw.numel() != sum(sizes):
        raise WireError(f"{sync} payload of {raw.numel()} bytes, expected {sum(sizes)} for {shape}")
    tensors, offset = [], 0
    for (dtype, s), size in zip(dtypes, sizes, strict=True):
        tensors.append(raw[offset:offset + size].view(dtype).view(s))
        offset += size
    check_sync_payload(tensors, sync, shape, exact_dtype)
    return tensors
