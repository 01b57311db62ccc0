"""Reads of routed experts into the expert cache's buffers, by a few reader threads and the
compute thread together.

An expert is one contiguous byte range of the rank's file (``edgellm shard`` writes a block's
tensors back to back). A read is cut into pieces: a demand read (the layer computing needs the
expert) into ``depth`` pieces, so that ``depth`` reads are in flight at once (this VM's disk
reads 9 MB experts 1.5-2x faster at depth 2 than at 1; bench/moe_cache.py measures depth 1/2/4);
a prefetch into pieces of ``PREFETCH_PIECE`` bytes, so that it can be given up between two.

Demand pieces go first, and a prefetch piece starts only when no demand piece is queued or in
flight: a prefetch uses the disk only while it would otherwise be idle, and delays a demand
read by at most the one piece it has in flight. A prefetch that the layer turns out to need
becomes a demand read where it stands (``promote``): its remaining pieces are read first, the
compute thread helping (``help``); no byte is read twice. A cancelled prefetch stops after the
pieces in flight; its buffer goes back only then (``Read.on_done``), never while a reader
still writes into it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.shards.shard_file import ShardFile

log = logging.getLogger(__name__)

PREFETCH_PIECE = 1 << 20  # bytes: what a wrong prefetch may still read after it is cancelled
PAGE = 4096  # pieces start on page boundaries, so dropping one's pages from the cache drops no other's


@dataclass(eq=False)
class Read:
    """One expert's bytes on their way into ``buffer``."""

    block: str
    buffer: torch.Tensor
    nbytes: int
    todo: deque[tuple[int, int]]  # (start, stop) byte ranges of the block not started yet
    demand: bool
    on_done: Callable[[Read], None] | None = None  # called (under the lock) once no piece is left or in flight
    inflight: int = 0
    cancelled: bool = False
    error: BaseException | None = None
    started: float = 0.0  # perf_counter() when its first piece started
    read_bytes: int = 0
    promoted: bool = False  # a prefetch turned demand read: its time includes idle waits, not timed
    finished: bool = False

    @property
    def done(self) -> bool:
        return not self.todo and not self.inflight


def pieces(nbytes: int, count: int = 1, size: int | None = None) -> deque[tuple[int, int]]:
    """Byte ranges covering ``0:nbytes``: ``count`` about equal ones, or ones of ``size``; page aligned."""
    step = size or -(-nbytes // max(1, count))
    step = max(PAGE, -(-step // PAGE) * PAGE)
    return deque((start, min(nbytes, start + step)) for start in range(0, nbytes, step))


class ReadQueue:
    """The reads in progress, and ``threads`` reader threads that take their pieces.

    Shares ``cond`` (and its lock) with the expert cache: methods marked "caller holds the lock"
    are called from inside the cache's critical sections."""

    def __init__(self, file: ShardFile, cond: threading.Condition, depth: int, threads: int | None = None):
        self.file, self._cond, self.depth = file, cond, max(1, depth)
        self._reads: list[Read] = []  # unfinished, in submission order
        self._closed = False
        self.seconds_per_byte = 0.0  # EMA over demand reads: what a byte costs the step waiting on it
        self.demand_reads = 0
        self.prefetch_bytes_read = 0  # bytes prefetch pieces read, right guesses and wrong
        self._threads = [threading.Thread(target=self._run, name=f"expert-reader-{i}", daemon=True)
                         for i in range(self.depth if threads is None else threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, block: str, buffer: torch.Tensor, demand: bool,
               on_done: Callable[[Read], None] | None = None) -> Read:
        """Queue ``block``'s read into ``buffer`` (caller holds the lock)."""
        nbytes = self.file.block_bytes(block)
        parts = pieces(nbytes, count=self.depth) if demand else pieces(nbytes, size=PREFETCH_PIECE)
        read = Read(block, buffer, nbytes, parts, demand, on_done)
        self._reads.append(read)
        self._cond.notify_all()
        return read

    def promote(self, read: Read) -> None:
        """A prefetch the layer now needs: its remaining pieces go first (caller holds the lock)."""
        read.demand = read.promoted = True
        self._cond.notify_all()

    def cancel(self, read: Read) -> None:
        """Give up ``read`` after its pieces in flight (caller holds the lock)."""
        read.cancelled = True
        read.todo.clear()
        if read.done:
            self._finish(read)

    def backlog_bytes(self) -> int:
        """Bytes of demand reads not started yet (caller holds the lock)."""
        return sum(stop - start for r in self._reads if r.demand for start, stop in r.todo)

    def _demand_active(self) -> bool:
        return any(r.demand and not r.done for r in self._reads)

    def _next(self) -> Read | None:
        """The read whose next piece a reader takes: demand reads first; a prefetch only while no
        demand read is queued or in flight."""
        for read in self._reads:
            if read.demand and read.todo:
                return read
        if self._demand_active():
            return None
        return next((read for read in self._reads if read.todo), None)

    def _take(self, read: Read) -> tuple[int, int] | None:
        if not read.todo:
            return None
        read.inflight += 1
        if not read.started:
            read.started = time.perf_counter()
        return read.todo.popleft()

    def _run(self) -> None:
        while True:
            with self._cond:
                read = self._next()
                while read is None:
                    if self._closed:
                        return
                    self._cond.wait(1.0)
                    read = self._next()
                piece = self._take(read)
            assert piece is not None
            self._read_piece(read, piece)

    def _read_piece(self, read: Read, piece: tuple[int, int]) -> None:
        """Read one piece (without the lock), then account for it under the lock."""
        error = None
        try:
            self.file.read_part(read.block, read.buffer, *piece)
        except BaseException as exc:  # handed to whoever waits on the read
            log.exception("reading %s failed", read.block)
            error = exc
        with self._cond:
            read.inflight -= 1
            read.read_bytes += piece[1] - piece[0]
            if not read.demand:
                self.prefetch_bytes_read += piece[1] - piece[0]
            if error is not None:
                read.error = error
                read.todo.clear()
            if read.done:
                self._finish(read)
            self._cond.notify_all()

    def _finish(self, read: Read) -> None:
        if read.finished:
            return
        read.finished = True
        self._reads.remove(read)
        if read.demand and not read.promoted and not read.cancelled and read.error is None and read.read_bytes == read.nbytes:
            spb = (time.perf_counter() - read.started) / max(1, read.nbytes)
            self.seconds_per_byte = spb if not self.demand_reads else 0.8 * self.seconds_per_byte + 0.2 * spb
            self.demand_reads += 1
        if read.on_done is not None:
            read.on_done(read)

    def help(self, read: Read) -> None:
        """Read ``read``'s remaining pieces on the calling thread, then wait for those in flight
        (called without the lock). Raises the read's error, if one failed."""
        while True:
            with self._cond:
                piece = self._take(read)
            if piece is None:
                break
            self._read_piece(read, piece)
        with self._cond:
            while not read.done:
                self._cond.wait(1.0)
            if read.error is not None:
                raise RuntimeError(f"reading expert block {read.block} failed: {read.error}") from read.error
            if read.cancelled:
                raise RuntimeError(f"the read of {read.block} was cancelled while needed")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
