"""Where a rank's dense blocks (attention and MLP of every layer) live while it computes.

``ResidentStore`` holds them all. ``WindowStore`` holds a sliding window (TPI-LLM): a
bounded pool of reusable, preallocated buffers that the I/O thread fills with the coming
blocks, in the order compute uses them (attention 0, MLP 0, attention 1, ... MLP L-1, then
attention 0 of the next step), while the current block computes and communicates. A block
is released as soon as its compute is done, and its buffer is refilled with the block
``slots`` positions ahead.

The model asks for blocks with ``with store.attention(layer) as w:``; requests must follow
the cyclic order, and a request out of order (a step abandoned half-way) restarts the
window at the requested block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import torch

from worker.memory.budget import WindowPlan
from worker.memory.io_thread import WINDOW, IoThread
from worker.shards.shard_file import ShardFile
from worker.shards.weights import (
    AttentionWeights,
    Fields,
    attn_block,
    fields_nbytes,
    from_fields,
    mlp_block,
)

log = logging.getLogger(__name__)

B = TypeVar("B")  # a block dataclass of worker.shards.weights


def dense_order(num_layers: int) -> list[str]:
    """The blocks in the order one forward pass uses them."""
    return [name for layer in range(num_layers) for name in (attn_block(layer), mlp_block(layer))]


class WeightStore:
    """Base: typed access to blocks, and the stats every store exports."""

    mode = "resident"

    def attention(self, layer: int) -> AbstractContextManager[AttentionWeights]:
        return self._typed(attn_block(layer), AttentionWeights)

    def mlp(self, layer: int, cls: type[B]) -> AbstractContextManager[B]:
        """The MLP block as ``cls`` (``MlpWeights`` or ``MoeWeights``: the model knows which)."""
        return self._typed(mlp_block(layer), cls)

    def _typed(self, name: str, cls: type[B]) -> AbstractContextManager[B]:
        return self._held_block(name, cls)

    @contextmanager
    def _held_block(self, name: str, cls: type[B]) -> Iterator[B]:
        """``name`` acquired for the ``with`` body, as ``cls``, and released after it."""
        fields = self._acquire(name)
        try:
            yield from_fields(cls, fields)
        finally:
            self._release(name)

    def _acquire(self, name: str) -> Fields:
        raise NotImplementedError

    def _release(self, name: str) -> None:
        pass

    @property
    def nbytes(self) -> int:
        """Bytes of weight memory this store holds (resident blocks or window buffers)."""
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        return {"weight_bytes": self.nbytes, "window_slots": 0, "weight_bytes_read": 0,
                "io_read_seconds": 0.0, "io_stall_seconds": 0.0, "overlap_ratio": 1.0}

    def close(self) -> None:
        pass


class ResidentStore(WeightStore):
    def __init__(self, blocks: dict[str, Fields]):
        self.blocks = blocks
        self._built: dict[tuple[str, type], Any] = {}  # (block, class) -> typed block, built once

    def _typed(self, name: str, cls: type[B]) -> AbstractContextManager[B]:
        """Nothing to acquire or release: the typed block is built on first use and kept (a
        decode step asks for 2 blocks per layer, and building them is pure Python overhead)."""
        built = self._built.get((name, cls))
        if built is None:
            built = self._built[(name, cls)] = from_fields(cls, self.blocks[name])
        return nullcontext(built)

    def _acquire(self, name: str) -> Fields:
        return self.blocks[name]

    @property
    def nbytes(self) -> int:
        return sum(fields_nbytes(f) for f in self.blocks.values())


class WindowStore(WeightStore):
    """A sliding window of ``plan.slots`` buffers over the blocks of ``order`` (cyclic)."""

    mode = "window"

    def __init__(self, file: ShardFile, order: list[str], plan: WindowPlan, io: IoThread):
        if plan.slots < 2 or plan.slots >= len(order):
            raise ValueError(f"a window needs 2 <= slots < {len(order)} blocks, got {plan.slots}")
        self.file = file
        self.order = order
        self.index = {name: i for i, name in enumerate(order)}
        self.plan = plan
        self.io = io
        self.buffers = [torch.empty(plan.slot_bytes, dtype=torch.uint8) for _ in range(plan.slots)]
        for buf in self.buffers:
            buf.fill_(0)  # touch the pages now: the budget is committed at start, not mid-step
        self._cond = threading.Condition()
        self._free: deque[int] = deque(range(plan.slots))
        self._pending: dict[str, int] = {}  # block -> buffer, read in flight
        self._ready: dict[str, tuple[int, Fields]] = {}  # block -> (buffer, its tensors)
        self._held: dict[str, int] = {}  # block -> buffer, acquired by compute
        self._window: deque[str] = deque()  # scheduled blocks, oldest first: the next to acquire
        self._cursor = 0  # position in ``order`` of the next block to schedule
        self._generation = 0  # bumped when the window restarts; stale reads are dropped
        self._error: BaseException | None = None
        self.stall_seconds = 0.0
        self.acquires = 0
        self.restarts = 0
        with self._cond:
            self._schedule()


    def close(self) -> None:
        """Close the shard file (after the I/O thread that reads it has stopped)."""
        self.file.close()
    def _schedule(self) -> None:
        """Fill every free buffer with the next blocks in order (caller holds the lock)."""
        while self._free:
            name = self.order[self._cursor]
            self._cursor = (self._cursor + 1) % len(self.order)
            buffer = self._free.popleft()
            self._pending[name] = buffer
            self._window.append(name)
            generation = self._generation
            self.io.submit(WINDOW, lambda n=name, b=buffer, g=generation: self._load(n, b, g))  # type: ignore[misc]

    def _load(self, name: str, buffer: int, generation: int) -> None:
        try:
            fields = self.file.read_into(name, self.buffers[buffer])
        except BaseException as exc:
            with self._cond:
                self._error = exc
                self._cond.notify_all()
            raise
        with self._cond:
            if generation != self._generation:
                self._free.append(buffer)  # a read for a window that was restarted
                self._schedule()
                self._cond.notify_all()  # an acquire may be waiting for a buffer to schedule into
                return
            del self._pending[name]
            self._ready[name] = (buffer, fields)
            self._cond.notify_all()

    def _restart(self, name: str) -> None:
        """Drop the window and start it again at ``name`` (caller holds the lock). Held blocks
        stay valid until released."""
        log.info("weight window restarts at %s", name)
        self.restarts += 1
        self._generation += 1
        self._free.extend(buffer for buffer, _ in self._ready.values())
        self._ready.clear()
        self._pending.clear()  # their buffers come back when the stale reads finish
        self._window.clear()
        self._cursor = self.index[name]
        self._schedule()

    def _acquire(self, name: str) -> Fields:
        with self._cond:
            self.acquires += 1
            if not self._window or self._window[0] != name:  # not the next block: a step was cut short
                self._restart(name)
            while not self._window:  # every buffer still busy with a stale read: wait for one
                if self._error is not None:
                    raise RuntimeError(f"reading {name} failed: {self._error}")
                self._cond.wait(1.0)
            self._window.popleft()
            start = time.perf_counter()
            while name not in self._ready:
                if self._error is not None:
                    raise RuntimeError(f"reading {name} failed: {self._error}")
                self._cond.wait(1.0)
            self.stall_seconds += time.perf_counter() - start
            buffer, fields = self._ready.pop(name)
            self._held[name] = buffer
            return fields

    def _release(self, name: str) -> None:
        with self._cond:
            self._free.append(self._held.pop(name))
            self._schedule()

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    def stats(self) -> dict[str, float]:
        read_s = self.file.read_seconds
        overlap = 1.0 if read_s <= 0 else max(0.0, min(1.0, 1.0 - self.stall_seconds / read_s))
        return {"weight_bytes": self.nbytes, "window_slots": self.plan.slots,
                "weight_bytes_read": self.file.bytes_read, "io_read_seconds": read_s,
                "io_stall_seconds": self.stall_seconds, "overlap_ratio": overlap}
