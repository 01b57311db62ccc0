"""The data-plane frame format: round trips, and malformed frames refused before use."""

from __future__ import annotations

import pytest
import torch

from worker.comm.wire import Header, Kind, WireError, decode_message, encode_message
from worker.rank.runtime import spans_from_tensor, validate_step
from worker.rank.step import SeqSpan


def _bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("tensor", [
    torch.randn(3, 64), torch.randn(0, 8), torch.arange(12, dtype=torch.int64).view(4, 3),
    torch.randn(5).to(torch.bfloat16), torch.randint(-128, 127, (7,), dtype=torch.int8),
])
def test_round_trip(tensor: torch.Tensor) -> None:
    msg = decode_message(_bytes(encode_message(Kind.PARTIAL, [tensor], step=7, seq=3)))
    assert (msg.kind, msg.step, msg.seq) == (Kind.PARTIAL, 7, 3)
    assert msg.tensors[0].dtype == tensor.dtype and torch.equal(msg.tensors[0], tensor)


def test_multi_tensor_and_header_only_messages() -> None:
    spans, hidden = torch.tensor([[0, 0, 2]]), torch.randn(2, 4)
    msg = decode_message(_bytes(encode_message(Kind.STEP, [spans, hidden], step=1)))
    assert torch.equal(msg.tensors[0], spans) and torch.equal(msg.tensors[1], hidden)
    assert decode_message(_bytes(encode_message(Kind.STOP))).tensors == []


def _corrupt_header(frames: list[bytes], offset: int, value: bytes) -> list[bytes]:
    header = bytearray(frames[0])
    header[offset:offset + len(value)] = value
    return [bytes(header), *frames[1:]]


GOOD = _bytes(encode_message(Kind.PARTIAL, [torch.randn(2, 4)], step=1, seq=1))


@pytest.mark.parametrize("frames", [
    [],
    [b"short"],
    [b"\x00" * len(GOOD[0])],  # bad magic
    _corrupt_header(GOOD, 4, b"\x63"),  # unknown kind
    _corrupt_header(GOOD, 5, b"\x63"),  # unknown dtype
    _corrupt_header(GOOD, 6, b"\x09"),  # too many dims
    [GOOD[0], GOOD[1][:-4]],  # payload shorter than the header says
    [GOOD[0], GOOD[1] + b"xxxx"],  # longer
    [GOOD[0], GOOD[1], GOOD[0]],  # odd frame count
    [GOOD[0], GOOD[1], *_bytes(encode_message(Kind.REDUCED, [torch.randn(1)], step=1, seq=1))],
])
def test_malformed_frames_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        decode_message(frames)


def test_header_pack_unpack() -> None:
    header = Header(Kind.REDUCED, step=2**40, seq=9, dtype=torch.float16, shape=(1, 2, 3))
    assert Header.unpack(header.pack()) == header


@pytest.mark.parametrize(("spans", "hidden"), [
    ([SeqSpan(0, 0, 3)], torch.zeros(2, 8)),  # lengths != rows
    ([SeqSpan(9, 0, 2)], torch.zeros(2, 8)),  # slot outside the cache
    ([SeqSpan(0, 127, 2)], torch.zeros(2, 8)),  # past max_context
    ([SeqSpan(0, 0, 2)], torch.zeros(2, 9)),  # wrong hidden width
])
def test_steps_that_would_index_outside_the_cache_are_refused(spans: list[SeqSpan], hidden: torch.Tensor) -> None:
    with pytest.raises(WireError):
        validate_step(spans, hidden, hidden_size=8, max_batch=4, max_context=128)


def test_spans_tensor_shape_is_checked() -> None:
    with pytest.raises(WireError):
        spans_from_tensor(torch.zeros(2, 2, dtype=torch.int64))
    assert spans_from_tensor(torch.tensor([[1, 2, 3]])) == [SeqSpan(1, 2, 3)]
