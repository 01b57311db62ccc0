"""Reads of routed experts into the expert cache's buffers, by the compute thread and a few reader
threads.

An expert is one contiguous byte range of the rank's file (``edgellm shard`` writes a block's
tensors back to back). A layer's missed experts go to the reader threads as soon as it routes,
each cut into ``depth`` pieces read at once (page-aligned; this VM's disk reads one cold read at a
time at 0.5-0.8x the MB/s of two, bench/moe_cache.py's disk figures); the compute thread computes
the experts it has meanwhile, and then helps with the pieces of the expert it waits for
(``help``). A miss that no buffer could take at routing is read when asked for (``own``): the
compute thread reads its first piece, the readers may take the others at once. A prefetch is cut
into pieces of ``PREFETCH_PIECE`` bytes, so that it can be given up between two.

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
# a demand read is cut into up to ``depth`` pieces read at once, none smaller than this (main's way:
# every expert): one cold read at a time got 0.5-0.8x the MB/s of two here (bench/moe_cache.py's disk
# figures); reading the trained tiny MoE's 1.6 MB fp32 experts whole decoded at 0.77-0.90x main's
SPLIT_BYTES = 4096
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
    # an ``own`` read's first piece, kept for the compute thread (``help``): readers take the others at once
    reserved: tuple[int, int] | None = None

    @property
    def own(self) -> bool:
        return self.reserved is not None

    @property
    def done(self) -> bool:
        return not self.todo and not self.inflight and self.reserved is None


def pieces(nbytes: int, count: int = 1, size: int | None = None, lead: int = 0) -> deque[tuple[int, int]]:
    """Byte ranges covering ``0:nbytes``: ``count`` about equal ones, or ones of ``size``; cut on page
    boundaries of the file, where the block starts ``lead`` bytes into a page (``ShardFile.lead``),
    so that two pieces read with ``O_DIRECT`` never share a page."""
    step = size or -(-(lead + nbytes) // max(1, count))
    step = max(PAGE, -(-step // PAGE) * PAGE)
    return deque((max(0, start - lead), min(nbytes, start + step - lead)) for start in range(0, lead + nbytes, step)
                 if start + step > lead)


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
        # seconds with at least one piece in flight (the disk busy for us): bench/moe_cache.py bounds a
        # run by the MB/s its reads got while busy where that beats the disk it probed around the run
        self.busy_seconds = 0.0
        self._in_flight = 0
        self._busy_since = 0.0
        self._threads = [threading.Thread(target=self._run, name=f"expert-reader-{i}", daemon=True)
                         for i in range(self.depth if threads is None else threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, block: str, buffer: torch.Tensor, demand: bool,
               on_done: Callable[[Read], None] | None = None, own: bool = False) -> Read:
        """Queue ``block``'s read into ``buffer`` (caller holds the lock). ``own``: a demand read
        the compute thread makes itself (``help``): no reader is woken for it."""
        nbytes, lead = self.file.block_bytes(block), self.file.lead(block)
        if demand:
            parts = pieces(nbytes, count=min(self.depth, max(1, nbytes // SPLIT_BYTES)), lead=lead)
        else:
            parts = pieces(nbytes, size=PREFETCH_PIECE, lead=lead)
        read = Read(block, buffer, nbytes, parts, demand, on_done)
        if own and demand:
            read.reserved = parts.popleft()
        self._reads.append(read)
        if read.todo:
            self._work.notify_all()
        return read

    def promote(self, read: Read) -> None:
        """A prefetch the layer now needs: its remaining pieces go first (caller holds the lock)."""
        if read.demand:
            return
        read.demand = read.promoted = True
        self._work.notify_all()

    def release(self, read: Read) -> None:
        """Let the readers take the first piece of an ``own`` read too (caller holds the lock):
        where the compute thread will not read it (``ExpertCache.end_layer``)."""
        if read.reserved is not None:
            read.todo.appendleft(read.reserved)
            read.reserved = None
            self._work.notify_all()

    def cancel(self, read: Read) -> None:
        """Give up ``read`` after its pieces in flight (caller holds the lock)."""
        read.cancelled = True
        read.todo.clear()
        read.reserved = None
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
        if self._demand_active():  # an own piece not started yet counts: the compute thread is on its way
            return None
        return next((read for read in self._reads if read.todo), None)

    def _take(self, read: Read, mine: bool = False) -> tuple[int, int] | None:
        """The read's next piece, now in flight: for the compute thread (``mine``, from ``help``) its
        reserved first piece if any, else the next one queued; None when none is left."""
        if mine and read.reserved is not None:
            piece, read.reserved = read.reserved, None
        elif read.todo:
            piece = read.todo.popleft()
        else:
            return None
        read.inflight += 1
        if not read.started or not self._in_flight:
            now = time.perf_counter()
            read.started = read.started or now
            if not self._in_flight:
                self._busy_since = now
        self._in_flight += 1
        return piece

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
            self._in_flight -= 1
            if not self._in_flight:
                self.busy_seconds += time.perf_counter() - self._busy_since
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
                piece = self._take(read, mine=True)
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
