"""A disk of a chosen speed without bursts, for the expert-streaming benches.

Every piece the expert cache reads (``ShardFile.read_part``: demand reads, guesses, the disk
probes) books its bytes on one timeline shared by all reading threads, at ``mb_per_s``: a piece
starts when the disk is free and takes ``bytes / speed``. The bytes are really read, through the
same code and ``O_DIRECT``; then the reading thread waits until the paced disk would be done. A
disk that is idle gains nothing from it, as with an SD card or an NVMe drive whose throughput is
what it is.

Why not only the kernel's throttle (``disk_throttle``): blk-throttle meters in slices (100 ms on
this VM's disk, which reports itself rotational) and lets a whole slice's bytes through at once,
so it caps the average over 100 ms, not the speed while reading: at 400 MB/s, 40 MB, three
tokens of the trained tiny MoE. Idle gaps shorter than that cost a run nothing there: capped at
400 MB/s, on demand and every gated prefetch predictor decoded the same 17.2 tok/s with the 2x
cache (session 29), with reads in flight getting 440-460 MB/s.

The pacing is a model of a disk on top of this VM's: where the real disk is slower than the pace
at some moment, the real time counts too (``bench/moe_cache.py``'s probes show it).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from disk_throttle import capped_reads

_PATCHED = "_paced_original"


class PacedDisk:
    """One timeline of disk time at ``mb_per_s``; ``book(n)`` returns when ``n`` bytes booked now are done."""

    def __init__(self, mb_per_s: float, clock: Callable[[], float] = time.perf_counter):
        if mb_per_s <= 0:
            raise ValueError(f"a disk speed must be positive, not {mb_per_s} MB/s")
        self.seconds_per_byte = 1 / (mb_per_s * 1e6)
        self._lock = threading.Lock()
        self._clock = clock
        self._free_at = 0.0  # ``clock`` time at which the disk has served every booked byte

    def book(self, nbytes: int) -> float:
        """Book ``nbytes`` after everything booked before; the time (``perf_counter``) they are done."""
        with self._lock:
            start = max(self._clock(), self._free_at)
            self._free_at = start + nbytes * self.seconds_per_byte
            return self._free_at


def pace_reads(shard_file_class: Any, mb_per_s: float) -> PacedDisk:
    """Make every ``read_part`` of ``shard_file_class`` (``worker.shards.shard_file.ShardFile``,
    of whichever checkout) take at least the paced disk's time, for the rest of the process."""
    if hasattr(shard_file_class, _PATCHED):
        raise RuntimeError("reads are paced already in this process")
    disk = PacedDisk(mb_per_s)
    original: Callable[..., None] = shard_file_class.read_part

    def read_part(self: Any, block: str, buffer: Any, start: int, stop: int) -> None:
        done_at = disk.book(stop - start)
        original(self, block, buffer, start, stop)
        if (wait := done_at - time.perf_counter()) > 0:
            time.sleep(wait)

    setattr(shard_file_class, _PATCHED, original)
    shard_file_class.read_part = read_part
    return disk


def add_disk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--disk-mbps", type=float, default=None,
                        help="run the whole bench on a disk of this many MB/s (a Pi's SD card: ~90, USB 3 SSD: "
                             "~350, Pi 5 NVMe: ~400-900); default: this machine's disk as it is")
    parser.add_argument("--disk-model", choices=("paced", "cgroup"), default="paced",
                        help="paced: every expert read waits for its turn on a disk of that speed "
                             "(bench/paced_disk.py); cgroup: the kernel's block-I/O throttle (root only; "
                             "it caps the average over 100 ms slices, bursts pass)")


@contextmanager
def disk_of_speed(path: Path, mb_per_s: float | None, model: str, shard_file_class: Any) -> Iterator[None]:
    """This process's expert reads on a disk of ``mb_per_s`` (``model``: ``paced`` or ``cgroup``,
    the throttle holding ``path``'s disk); the disk as it is where ``mb_per_s`` is None."""
    if mb_per_s is None:
        yield
    elif model == "cgroup":
        with capped_reads(path, mb_per_s):
            yield
    else:
        pace_reads(shard_file_class, mb_per_s)  # for the rest of the process: a bench runs once
        yield
