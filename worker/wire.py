"""The data-plane wire format: a fixed binary header frame plus raw tensor frames.

No pickle: every frame is either this struct header or the raw bytes of a tensor whose
dtype and shape the header names. Decoding validates sizes before touching the bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np
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
        header = Header.unpack(raw[i])
        if (header.kind, header.step, header.seq) != (first.kind, first.step, first.seq):
            raise WireError("frames of one message disagree on kind/step/seq")
        tensors.append(decode_tensor(header, raw[i + 1]))
    return Message(first.kind, first.step, first.seq, tensors)


def decode_tensor(header: Header, payload: bytes | memoryview) -> torch.Tensor:
    """Rebuild the tensor a header describes, checking the byte count first."""
    itemsize = torch.empty((), dtype=header.dtype).element_size()
    expected = int(np.prod(header.shape, dtype=np.int64)) * itemsize
    if len(payload) != expected:
        raise WireError(f"payload of {len(payload)} bytes, header says {header.shape} {header.dtype}")
    if expected == 0:
        return torch.empty(header.shape, dtype=header.dtype)
    raw = np.frombuffer(payload, dtype=np.uint8).copy()  # own the memory; frames are reused
    return torch.from_numpy(raw).view(header.dtype).view(header.shape)
