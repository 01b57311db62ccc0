"""A rank's cache of routed experts (EdgeMoE), with its own byte budget.

Every expert of a rank has the same size, so the cache is a pool of equal preallocated
buffers. An expert is loaded on a miss (in the compute thread: it is needed now) or
prefetched on the I/O thread when the predictor expects the next layer to use it. Buffers
in use (pinned) and the experts the current layer still needs are never evicted.

By default a prefetch is a read-ahead hint to the kernel (``PREFETCH_TO``), given by the I/O
thread: it costs no buffer, so a wrong guess evicts nothing and costs only disk time, and the
page cache of a layer's wrong guesses is dropped when the layer starts (the hinted bytes stay
about one layer's prediction). A miss on a hinted expert counts as a late prefetch, not a miss.

With ``buffers``, a prefetch is read into the cache and gives way: when a layer starts, its prefetches that the
router did not ask for and that the I/O thread has not started are cancelled (their buffers
return to the pool), and a needed expert whose prefetch is still queued is read at once by the
compute thread instead of waiting behind other reads. Demand reads run outside the cache's
lock, so an I/O-thread read and a demand read can be in flight together (the disk serves two
reads faster than one after the other; bench/moe_cache.py measures it).

Eviction policies (``choose_victim`` is pure and table-tested):

- ``lru``: the least recently used expert.
- ``distance`` (EdgeMoE's idea): layers are visited cyclically, so an expert of the layer
  just computed is needed again only after every other layer; evict the expert whose layer
  is farthest ahead in that cycle, then the least often used, then the least recent.

Under either policy an expert the predictor asked for (cached already, or prefetched into a
buffer) goes only when nothing else can: a prediction that is right must not be undone by the
current layer's misses before its layer comes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from worker.io_thread import NEEDED, PREFETCH, IoThread
from worker.shard_file import ShardFile
from worker.weights import ExpertWeights, Fields, expert_block, from_fields

POLICIES = ("distance", "lru")
# Where a prefetch puts a predicted expert: "page_cache" asks the kernel to read it ahead
# (posix_fadvise WILLNEED, from the rank's I/O thread: the call itself costs ~0.3 ms per MB here
# before the kernel reads on asynchronously, time the compute thread should not pay; several
# reads in flight; a miss then copies from memory), "buffers" reads it into a cache buffer on
# the I/O thread. bench/moe_cache.py measures both; the first is the default.
PREFETCH_TO = ("page_cache", "buffers")
DEFAULT_PREFETCH_TO = "page_cache"
Key = tuple[int, int]  # (layer, expert)


@dataclass
class Entry:
    key: Key
    buffer: int
    fields: Fields | None  # None while its read is queued or in flight
    last_use: int = 0
    uses: int = 0
    job: Future | None = None  # a prefetch's I/O job, cancellable until the I/O thread starts it


def choose_victim(candidates: Iterable[Entry], layer: int, num_layers: int, policy: str) -> Entry | None:
    """The entry to evict when the model is at ``layer``; None when there is no candidate."""
    if policy == "lru":
        return min(candidates, key=lambda e: e.last_use, default=None)

    def keep(e: Entry) -> tuple[int, int, int]:  # smallest is evicted first
        ahead = (e.key[0] - layer) % num_layers  # 0: this layer, num_layers-1: just used
        return -ahead, e.uses, e.last_use

    return min(candidates, key=keep, default=None)


class ExpertCache:
    """``slots`` buffers of ``slot_bytes``; experts of ``file`` (a rank's shard) move through them."""

    def __init__(self, file: ShardFile | None, num_layers: int, num_experts: int, slots: int, slot_bytes: int,
                 io: IoThread | None, policy: str = "distance", preloaded: dict[Key, Fields] | None = None,
                 prefetch_to: str | None = None):
        """``preloaded``: every expert already in memory (sliced from a checkpoint); no file, no I/O.
        ``prefetch_to``: one of ``PREFETCH_TO`` (None: ``DEFAULT_PREFETCH_TO``)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose from {POLICIES}")
        self.prefetch_to = prefetch_to or DEFAULT_PREFETCH_TO
        if self.prefetch_to not in PREFETCH_TO:
            raise ValueError(f"unknown prefetch target {self.prefetch_to!r}; choose from {PREFETCH_TO}")
        self._hinted: dict[Key, Future] = {}  # read-ahead asked of the kernel (an I/O job), not read by us yet
        self._read_ahead: dict[Key, Future] = {}  # the same for a layer's later misses (begin_layer)
        self.prefetch_bytes = 0
        self.file = file
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.policy = policy
        self.io = io
        self.slot_bytes = slot_bytes
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(0 if preloaded else slots)]
        self._free = list(range(slots))
        self._entries: dict[Key, Entry] = {}
        self._pinned: set[Key] = set()
        self._protected: set[Key] = set()  # still needed by the layer computing now
        # cached experts predicted for a coming layer: the current layer's misses evict them last
        # (with two MoE layers the next layer is also the one just used, first to go by distance)
        self._wanted: set[Key] = set()
        self._layer = 0
        self._clock = 0
        self._cond = threading.Condition()
        self.hits = self.misses = self.late = 0
        self.stall_seconds = 0.0
        self.predicted = self.predicted_used = self.used = 0  # for recall: |P ∩ A| / |A|
        self.prefetches = self.cancelled = 0
        if preloaded is not None:
            self._entries = {key: Entry(key, -1, fields) for key, fields in preloaded.items()}
        elif slots >= num_layers * num_experts:  # everything fits: load it all now
            assert file is not None
            for layer in range(num_layers):
                for expert in range(num_experts):
                    if file.has(expert_block(layer, expert)):
                        self._insert((layer, expert), self._free.pop(), sync=True)

    @property
    def nbytes(self) -> int:
        if not self.buffers:
            return sum(sum(t.numel() * t.element_size() for t in e.fields.values())
                       for e in self._entries.values() if e.fields is not None)
        return len(self.buffers) * self.slot_bytes

    def begin_layer(self, layer: int, needed: Iterable[int]) -> None:
        """The model enters ``layer``'s experts; ``needed`` are those it will ask for. Its
        prefetches of other experts that have not started are cancelled. When two or more of
        ``needed`` are neither cached nor prefetched, the I/O thread asks the kernel to read the
        second and later ones ahead (``WILLNEED``) while the compute thread reads the first, so
        the demand reads overlap on disk instead of queuing one by one (at queue depth 2-4 this
        VM's disk reads 1.2-1.4x faster than at 1)."""
        with self._cond:
            self._layer = layer
            needed = list(needed)
            self._protected = {(layer, e) for e in needed}
            self._wanted = {k for k in self._wanted if k[0] != layer}  # needed ones are protected now
            if self.file is not None and self.io is not None:
                misses = [(layer, e) for e in needed if (layer, e) not in self._entries and (layer, e) not in self._hinted]
                for key in misses[1:]:  # the model asks for them in ``needed`` order: it reads misses[0] now
                    self._read_ahead[key] = self.io.submit(
                        NEEDED, lambda k=key: self._advise(k, os.POSIX_FADV_WILLNEED))  # type: ignore[misc]
            for key, entry in list(self._entries.items()):
                if (key[0] == layer and key not in self._protected and entry.job is not None
                        and entry.job.cancel()):
                    del self._entries[key]
                    self._free.append(entry.buffer)
                    self.cancelled += 1
            for key in [k for k in self._hinted if k[0] == layer and k not in self._protected]:
                if not self._hinted.pop(key).cancel() and self.io is not None:  # a wrong guess, read:
                    self.io.submit(PREFETCH, lambda k=key: self._advise(k, os.POSIX_FADV_DONTNEED))  # type: ignore[misc]
                self.cancelled += 1

    def end_layer(self) -> None:
        with self._cond:
            self._protected = set()

    def _victim(self, evict_protected: bool = False) -> int | None:
        """A free buffer, or one freed by evicting (caller holds the lock). Experts the current
        layer still needs are spared unless ``evict_protected`` (a demand miss with no other choice)."""
        if self._free:
            return self._free.pop()
        candidates = [e for k, e in self._entries.items() if e.fields is not None and k not in self._pinned
                      and (evict_protected or k not in self._protected)]
        victim = (choose_victim((e for e in candidates if e.key not in self._wanted), self._layer, self.num_layers,
                                self.policy)
                  or choose_victim(candidates, self._layer, self.num_layers, self.policy))
        if victim is None:
            return None
        del self._entries[victim.key]
        return victim.buffer

    def _insert(self, key: Key, buffer: int, sync: bool) -> Entry:
        """A new entry for ``key`` in ``buffer``, read now (``sync``) or queued on the I/O thread."""
        assert self.file is not None and self.io is not None
        entry = Entry(key, buffer, None)
        self._entries[key] = entry
        if sync:
            entry.fields = self.file.read_into(expert_block(*key), self.buffers[buffer])
        else:
            entry.job = self.io.submit(PREFETCH, lambda: self._read(entry))
        return entry

    def _read(self, entry: Entry) -> None:
        """Fill ``entry`` from disk, without holding the lock; on failure the entry is dropped."""
        assert self.file is not None
        try:
            fields = self.file.read_into(expert_block(*entry.key), self.buffers[entry.buffer])
        except BaseException:
            with self._cond:
                if self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
                    self._free.append(entry.buffer)
                self._cond.notify_all()
            raise
        with self._cond:
            entry.fields = fields
            self._cond.notify_all()

    def _advise(self, key: Key, advice: int) -> None:
        assert self.file is not None
        self.file.advise(expert_block(*key), advice)

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Start reading ``layer``'s ``experts`` that are not cached: ask the kernel to read them
        ahead, or read them into buffers on the I/O thread as far as buffers allow."""
        with self._cond:
            for expert in experts:
                key = (layer, expert)
                if key in self._entries:
                    self._wanted.add(key)  # cached already: kept through this layer's misses
                    continue
                if key in self._hinted or self.file is None:
                    continue
                if self.prefetch_to == "page_cache":
                    assert self.io is not None
                    self._hinted[key] = self.io.submit(
                        PREFETCH, lambda k=key: self._advise(k, os.POSIX_FADV_WILLNEED))  # type: ignore[misc]
                else:
                    buffer = self._victim()
                    if buffer is None:
                        return
                    self._insert(key, buffer, sync=False)
                    self._wanted.add(key)
                self.prefetches += 1
                self.prefetch_bytes += self.file.block_bytes(expert_block(*key))

    def record_prediction(self, predicted: set[int], actual: set[int]) -> None:
        self.predicted += len(predicted)
        self.predicted_used += len(predicted & actual)
        self.used += len(actual)

    @contextmanager
    def get(self, layer: int, expert: int) -> Iterator[ExpertWeights]:
        """The expert's weights, pinned until the block exits; loads it on a miss."""
        key = (layer, expert)
        start = time.perf_counter()
        with self._cond:
            self._clock += 1
            entry = self._entries.get(key)
            read = entry is None
            if entry is None:
                if key in self._hinted:
                    self._hinted.pop(key).cancel()  # a hint still queued is moot: the read below does it
                    self.late += 1  # prefetched into the page cache: the read below copies it
                else:
                    self.misses += 1
                if (hint := self._read_ahead.pop(key, None)) is not None:
                    hint.cancel()  # not started yet: the read below does it, the hint would only read it again
                entry = Entry(key, self._buffer_for_miss(), None)
                self._entries[key] = entry
            elif entry.fields is None:
                self.late += 1  # prefetched, not read yet
                read = entry.job is not None and entry.job.cancel()  # still queued: read it now instead
            else:
                self.hits += 1
            self._pinned.add(key)
        if read:
            try:
                self._read(entry)  # outside the lock: the I/O thread may read another expert meanwhile
            except BaseException:
                with self._cond:
                    self._pinned.discard(key)
                raise
        with self._cond:
            while entry.fields is None:
                if self._entries.get(key) is not entry:
                    self._pinned.discard(key)
                    raise RuntimeError(f"expert cache: the read of expert {expert} of layer {layer} failed")
                self._cond.wait(1.0)
            entry.last_use, entry.uses = self._clock, entry.uses + 1
            self.stall_seconds += time.perf_counter() - start
            fields = entry.fields
        try:
            yield from_fields(ExpertWeights, fields)
        finally:
            with self._cond:
                self._pinned.discard(key)
                self._protected.discard(key)  # each expert runs once per layer

    def _buffer_for_miss(self) -> int:
        """A buffer for an expert needed now (caller holds the lock): evicts even an expert the
        current layer still needs if nothing else can go, and waits while every buffer is pinned
        or being read."""
        buffer = self._victim()
        while buffer is None:
            buffer = self._victim(evict_protected=True)
            if buffer is None:
                if all(e.fields is not None for e in self._entries.values()):
                    raise RuntimeError("expert cache: every buffer is pinned (the cache is too small)")
                self._cond.wait(1.0)
        return buffer

    def close(self) -> None:
        """Close the experts' shard file (after the I/O thread that reads it has stopped)."""
        if self.file is not None:
            self.file.close()

    def stats(self) -> dict[str, float]:
        lookups = self.hits + self.misses + self.late
        return {
            "expert_cache_bytes": self.nbytes,
            "expert_cache_slots": len(self.buffers) or len(self._entries),
            "expert_hits": self.hits + self.late,
            "expert_misses": self.misses,
            "expert_hit_rate": (self.hits + self.late) / lookups if lookups else 1.0,
            "expert_late_prefetches": self.late,
            "expert_prefetches": self.prefetches,
            "expert_cancelled_prefetches": self.cancelled,
            "expert_prefetch_bytes": self.prefetch_bytes,  # asked of the disk ahead, right or wrong
            "expert_prediction_recall": self.predicted_used / self.used if self.used else 0.0,
            "expert_prediction_precision": self.predicted_used / self.predicted if self.predicted else 0.0,
            "expert_predicted": self.predicted,  # the counts behind recall and precision
            "expert_predicted_used": self.predicted_used,
            "expert_used": self.used,
            "expert_bytes_read": self.file.bytes_read if self.file else 0,
            "expert_read_seconds": self.file.read_seconds if self.file else 0.0,
            "expert_stall_seconds": self.stall_seconds,
        }
