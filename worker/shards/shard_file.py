"""Direct reads of one rank's shard file (safetensors), block by block, with ``os.preadv``.

A block is every tensor under one name prefix (``layers.3.attn``, ``layers.3.mlp``,
``layers.3.experts.5``); ``edgellm shard`` writes each block's tensors back to back, so a
block is one contiguous byte range and loads with one read straight into a caller's
buffer, without a copy and without mmap (mapped file pages would count in the RSS the
budget is about).

A block's int4 matrices come back as the running int4 kernel reads them
(``worker.kernels.quant.kernel_layout``: as stored where the native kernel runs, else converted in
place in the caller's buffer for torch's kernel), so every reader (the resident load, the
streamed window, the expert cache) computes right on any CPU.

After every read the range is dropped from the page cache (``posix_fadvise(DONTNEED)``), so
each pass over the shard really reads the disk: the memory stays within the budget, and the
I/O figures are cold-cache figures.

``direct=True`` (the expert cache's descriptor) also opens the file with ``O_DIRECT`` where the
file system allows it: ``read_part`` then reads straight from the disk into the caller's buffer,
with no copy through the page cache and nothing to drop. A cold buffered read cost 0.6-0.9 ms
of CPU per MB on this VM, an ``O_DIRECT`` one 0.12-0.25 ms (``bench/moe_breakdown.py``'s notes
in docs/moe-streaming.md), and a streamed decode's reader threads share 2 cores with its compute.
``O_DIRECT`` wants file offset, length and memory address aligned (``DIRECT_ALIGN``), and an
expert block starts anywhere in the file: a buffer placed by ``place`` has the block's first byte
at the same offset modulo ``DIRECT_ALIGN`` as in the file, with room around it for the aligned
pages that hold the block's first and last bytes.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.config import CheckpointError
from worker.kernels.quant import kernel_layout

log = logging.getLogger(__name__)

DIRECT_ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and addresses (a page: any block size up to it)
TENSOR_ALIGN = 64  # what a fresh torch allocation guarantees, and what a placed block keeps (``lead``)
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
           "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


@dataclass(frozen=True)
class TensorEntry:
    name: str  # field name inside its block (e.g. "wqkv")
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset inside the block


@dataclass(frozen=True)
class BlockEntry:
    offset: int  # absolute file offset of the block's first byte
    nbytes: int
    tensors: tuple[TensorEntry, ...]


def block_of(name: str) -> tuple[str, str]:
    """``layers.3.experts.5.w_down`` -> (``layers.3.experts.5``, ``w_down``); ``head.lm_head.scales``
    -> (``head``, ``lm_head.scales``)."""
    parts = name.split(".")
    if parts[0] != "layers":
        return parts[0], ".".join(parts[1:])
    cut = 4 if len(parts) > 4 and parts[2] == "experts" else 3
    return ".".join(parts[:cut]), ".".join(parts[cut:])


class ShardFile:
    """Block index of a shard file plus thread-safe direct reads (``os.preadv`` is positional)."""

    def __init__(self, path: str | Path, drop_page_cache: bool = True, random_access: bool = False,
                 direct: bool = False):
        """``random_access``: blocks are read in no particular order (a rank's experts), so the
        kernel reads no further than asked (``POSIX_FADV_RANDOM``): its default read-ahead carried
        a 9 MB expert read on ~50% past the block's end on this VM, bytes of other experts
        read from disk and mostly never used. ``direct``: ``read_part`` into a buffer from
        ``place`` bypasses the page cache (``O_DIRECT``, the module docstring), where the file
        system allows it (``self.direct``)."""
        self.path = Path(path)
        self.drop_page_cache = drop_page_cache
        self._fd = os.open(self.path, os.O_RDONLY)
        if random_access:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._direct_fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:  # e.g. tmpfs: buffered reads, pages dropped after each
                log.info("%s: no O_DIRECT (%s); expert reads go through the page cache", self.path, exc)
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.read_seconds = 0.0
        try:
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (struct.error, json.JSONDecodeError) as exc:
            self.close()
            raise CheckpointError(f"{self.path}: not a safetensors file ({exc})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        data_start = 8 + header_len
        grouped: dict[str, list[tuple[int, int, str, dict]]] = {}
        for name, info in header.items():
            block, field = block_of(name)
            begin, end = info["data_offsets"]
            grouped.setdefault(block, []).append((begin, end, field, info))
        self.blocks: dict[str, BlockEntry] = {}
        for block, items in grouped.items():
            items.sort(key=lambda item: item[0])
            first = items[0][0]
            tensors = []
            for (begin, end, field, info), nxt in zip(items, [*items[1:], None], strict=True):
                if nxt is not None and nxt[0] != end:
                    raise CheckpointError(f"{self.path}: block {block} is not contiguous; re-run `edgellm shard`")
                tensors.append(TensorEntry(field, _DTYPES[info["dtype"]], tuple(info["shape"]), begin - first))
            self.blocks[block] = BlockEntry(data_start + first, items[-1][1] - first, tuple(tensors))

    def block_bytes(self, block: str) -> int:
        return self.blocks[block].nbytes

    def has(self, block: str) -> bool:
        return block in self.blocks

    def read_into(self, block: str, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Read ``block`` into the start of ``buffer`` (uint8, contiguous); return its tensors as
        views, int4 matrices in the running kernel's layout (the module docstring)."""
        entry = self.blocks[block]
        if buffer.dtype != torch.uint8 or buffer.numel() < entry.nbytes:
            raise ValueError(f"buffer of {buffer.numel()} bytes cannot hold {block} ({entry.nbytes} bytes)")
        view = memoryview(buffer.numpy())[: entry.nbytes]  # type: ignore[arg-type]
        start = time.perf_counter()
        done = 0
        while done < entry.nbytes:
            n = os.preadv(self._fd, [view[done:]], entry.offset + done)
            if n == 0:
                raise CheckpointError(f"{self.path}: truncated at byte {entry.offset + done}")
            done += n
        if self.drop_page_cache:
            os.posix_fadvise(self._fd, entry.offset, entry.nbytes, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.bytes_read += entry.nbytes
            self.read_seconds += time.perf_counter() - start
        return kernel_layout({t.name: _view(buffer, t) for t in entry.tensors})

    def read_part(self, block: str, buffer: torch.Tensor, start: int, stop: int) -> None:
        """Bytes ``start:stop`` of ``block`` into the same bytes of ``buffer`` (uint8, contiguous):
        one piece of a block that several threads read at once, or that a read gives up between
        pieces. ``views`` then gives the block's tensors."""
        entry = self.blocks[block]
        if buffer.dtype != torch.uint8 or buffer.numel() < entry.nbytes or not 0 <= start <= stop <= entry.nbytes:
            raise ValueError(f"cannot read bytes {start}:{stop} of {block} ({entry.nbytes} bytes) into a buffer "
                             f"of {buffer.numel()}")
        begin = time.perf_counter()
        if self._direct_fd >= 0 and self._read_direct(entry, buffer, start, stop):
            with self._lock:
                self.bytes_read += stop - start
                self.read_seconds += time.perf_counter() - begin
            return
        view = memoryview(buffer.numpy())[start:stop]  # type: ignore[arg-type]
        done = 0
        while done < stop - start:
            n = os.preadv(self._fd, [view[done:]], entry.offset + start + done)
            if n == 0:
                raise CheckpointError(f"{self.path}: truncated at byte {entry.offset + start + done}")
            done += n
        if self.drop_page_cache:
            os.posix_fadvise(self._fd, entry.offset + start, stop - start, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.bytes_read += stop - start
            self.read_seconds += time.perf_counter() - begin

    @property
    def direct(self) -> bool:
        """Whether ``read_part`` reads with ``O_DIRECT`` (into buffers from ``place``)."""
        return self._direct_fd >= 0

    def lead(self, block: str) -> int:
        """Where ``block``'s first byte lies in its aligned page of the file; 0 without ``O_DIRECT``,
        and for a block that does not start on a ``TENSOR_ALIGN`` boundary of the file (a shard
        written before its data section started on a page): placed at its lead, its tensors
        would lie less aligned in memory than in a fresh allocation, and the float products of
        torch's ``default`` CPU kernels then gave other bits than all resident; such a block is
        read through the page cache into an aligned buffer, as before."""
        offset = self.blocks[block].offset
        return offset % DIRECT_ALIGN if self.direct and offset % TENSOR_ALIGN == 0 else 0

    def place(self, block: str, raw: torch.Tensor) -> torch.Tensor:
        """The bytes of ``raw`` (uint8, from ``aligned_buffer``) that ``block`` is read into: at its
        ``lead``, so that ``read_part`` can read the aligned pages around it straight in."""
        lead = self.lead(block)
        return raw[lead: lead + self.blocks[block].nbytes]

    def _read_direct(self, entry: BlockEntry, buffer: torch.Tensor, start: int, stop: int) -> bool:
        """Bytes ``start:stop`` of the block at ``entry`` into ``buffer``, with ``O_DIRECT``: the aligned
        pages that hold them, into the same place of ``buffer``'s storage. False (nothing read) where
        ``buffer`` was not placed for it (its address not at the block's offset modulo the alignment,
        or no room around it for the first and last pages)."""
        first, last = entry.offset + start, entry.offset + stop  # file offsets
        low = first - first % DIRECT_ALIGN
        high = -(-last // DIRECT_ALIGN) * DIRECT_ALIGN
        if (buffer.data_ptr() - entry.offset) % DIRECT_ALIGN:
            return False
        storage = torch.empty(0, dtype=torch.uint8).set_(buffer.untyped_storage())  # the whole allocation
        at = buffer.storage_offset() + start - (first - low)  # where file offset ``low`` goes
        if at < 0 or at + high - low > storage.numel():
            return False
        view = memoryview(storage.numpy())[at: at + high - low]  # type: ignore[arg-type]
        done = 0
        while done < last - low:  # past the end of the file the read is short: enough once ``last`` is in
            n = os.preadv(self._direct_fd, [view[done:]], low + done)
            if n == 0:
                raise CheckpointError(f"{self.path}: truncated at byte {low + done}")
            done += n
        return True

    def views(self, block: str, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """``block``'s tensors as views of ``buffer``, which holds its bytes from the start, as they lie
        in the file: int4 matrices in edgellm's layout (the expert cache applies ``kernel_layout``
        once the read is whole: its pieces land from several threads)."""
        return {t.name: _view(buffer, t) for t in self.blocks[block].tensors}

    def read_field(self, block: str, field: str) -> torch.Tensor:
        """One tensor of ``block``, into fresh memory (for the small resident routers and norms)."""
        entry = self.blocks[block]
        t = next((t for t in entry.tensors if t.name == field), None)
        if t is None:
            raise CheckpointError(f"{self.path}: {block} has no {field}")
        out = torch.empty(t.shape, dtype=t.dtype)
        raw = memoryview(out.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        if os.preadv(self._fd, [raw], entry.offset + t.start) != len(raw):
            raise CheckpointError(f"{self.path}: truncated in {block}.{field}")
        return out

    def read(self, block: str) -> dict[str, torch.Tensor]:
        """Read ``block`` into fresh memory of its own."""
        return self.read_into(block, torch.empty(self.blocks[block].nbytes, dtype=torch.uint8))

    def advise(self, block: str, advice: int) -> None:
        """``posix_fadvise`` on ``block``'s byte range (e.g. WILLNEED: read ahead into the page
        cache; DONTNEED: drop it again)."""
        entry = self.blocks[block]
        os.posix_fadvise(self._fd, entry.offset, entry.nbytes, advice)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 buffer starting on a ``DIRECT_ALIGN`` boundary, with room for any block of up to
    ``nbytes`` placed at its lead (``ShardFile.place``) and the aligned pages around it."""
    raw = torch.empty(nbytes + 3 * DIRECT_ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % DIRECT_ALIGN
    return raw[skip: skip + nbytes + 2 * DIRECT_ALIGN]


def _view(buffer: torch.Tensor, t: TensorEntry) -> torch.Tensor:
    size = t.dtype.itemsize
    numel = 1
    for dim in t.shape:
        numel *= dim
    if t.start % size:
        raise CheckpointError(f"tensor {t.name} is not aligned to its {size}-byte dtype; re-run `edgellm shard`")
    return buffer[t.start: t.start + numel * size].view(t.dtype).view(t.shape)
