"""Reads of routed experts into the expert cache's buffers, by the compute thread and a few reader
threads.

An expert is one contiguous byte range of the rank's file (``edgellm shard`` writes a block's
tensors back to back). A layer's first missed expert is read by the compute thread itself
(``own``): nothing to hand over, no thread to wake, and the compute thread would only wait for it
anyway. Its other misses go to the reader threads at once, so that as many reads are in flight as
the layer misses experts, and each is computed as soon as it lands, while the next is still read.
A demand read of an expert of ``SPLIT_BYTES`` or more is cut into ``depth`` pieces (this VM's
disk read 9 MB experts up to 1.5x faster at depth 2 than at 1; bench/moe_cache.py measures depth
1/2/4); a smaller one is one piece. A prefetch is cut into pieces of ``PREFETCH_PIECE`` bytes, so
that it can be given up between two.

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
# a demand read this large is cut into ``depth`` pieces read at once; a smaller one is one piece (one
# hand-off less: the 1.6 MB fp32 experts of the trained tiny MoE, and int8/int4 experts)
SPLIT_BYTES = 4 << 20
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
    own: bool = False  # the compute thread reads it (``help``); readers leave it alone until it starts

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
    are called from inside the cache's critical sections. ``cond`` is notified when a read is done
    (the compute thread waits on it); ``work``, a condition on the same lock, when there are pieces
    to take (the readers wait on it). Apart, a piece that lands wakes no idle reader, and new work
    does not wake the compute thread: on a loaded 2-core machine every needless wake-up is a slice
    of a core. Without ``work``, both are ``cond``."""

    def __init__(self, file: ShardFile, cond: threading.Condition, depth: int, threads: int | None = None,
                 work: threading.Condition | None = None):
        self.file, self._cond, self.depth = file, cond, max(1, depth)
        self._work = work or cond
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
               on_done: Callable[[Read], None] | None = None, own: bool = False) -> Read:
        """Queue ``block``'s read into ``buffer`` (caller holds the lock). ``own``: a demand read
        the compute thread makes itself (``help``): no reader is woken for it."""
        nbytes = self.file.block_bytes(block)
        if demand:
            parts = pieces(nbytes, count=self.depth if nbytes >= SPLIT_BYTES else 1)
        else:
            parts = pieces(nbytes, size=PREFETCH_PIECE)
        read = Read(block, buffer, nbytes, parts, demand, on_done, own=own and demand)
        self._reads.append(read)
        if not read.own:
            self._work.notify_all()
        return read

    def promote(self, read: Read) -> None:
        """A prefetch the layer now needs: its remaining pieces go first (caller holds the lock)."""
        if read.demand:
            return
        read.demand = read.promoted = True
        self._work.notify_all()

    def release(self, read: Read) -> None:
        """Let the readers take the pieces of an ``own`` read (caller holds the lock): once the
        compute thread has started it, or where it will not (``ExpertCache.end_layer``)."""
        if read.own:
            read.own = False
            if read.todo:
                self._work.notify_all()

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
            if read.demand and read.todo and not read.own:
                return read
        if self._demand_active():  # an own read not started yet counts: the compute thread is on its way
            return None
        return next((read for read in self._reads if read.todo and not read.own), None)

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
                    self._work.wait(1.0)
                    read = self._next()
                piece = self._take(read)
                if self._next() is not None:  # more to take: the next idle reader
                    self._work.notify()
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
                if self._next() is not None:  # e.g. prefetch pieces that waited for this demand read
                    self._work.notify()

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
                self.release(read)  # an own read's other pieces (a large expert): readers may help now
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
            self._work.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
