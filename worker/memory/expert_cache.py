"""A rank's cache of routed experts (EdgeMoE), with its own byte budget.

Every expert buffer has the size of the rank's largest expert, so the cache is a pool of equal
preallocated buffers. Experts move into them through ``worker.memory.expert_reads``: a layer's missed
experts are read as soon as the router names them (``begin_layer``), several pieces in flight,
while the compute thread computes the experts it has; the predictor's guesses for the next layer
are read ahead only while the disk would otherwise idle, in pieces that stop when the guess is
known wrong. Buffers in use (pinned) and the experts the current layer still needs are never
evicted.

Whether a layer's guesses are read ahead at all is decided per layer by ``PrefetchGate`` from
what the cache measures: the predictor's recent precision at that layer, the demand reads already
queued (the I/O queue as the bottleneck), and whether a read can land before the layer starts.
When the layer starts, its prefetches the router did not ask for are cancelled (their buffers
return to the pool once their piece in flight is done), and those it asked for become demand
reads where they stand: nothing is read twice.

Eviction policies (``choose_victim`` is pure and table-tested):

- ``lru``: the least recently used expert.
- ``distance`` (EdgeMoE's idea): layers are visited cyclically, so an expert of the layer
  just computed is needed again only after every other layer; evict the expert whose layer
  is farthest ahead in that cycle, then the least often used, then the least recent.
- ``frequency``: the expert least likely to be used at its layer's next step (an exponential
  average of how often the router picked it there, ``FREQUENCY_DECAY``), then the farthest ahead:
  on a trained model a few experts of each layer take most tokens, and those are worth keeping
  across the whole cycle of layers.

A prefetch takes a free buffer. Otherwise only a guess whose layer's guesses are right at least
``KEEP_PRECISION`` of the time (``PrefetchGate.sure``) may evict anything, and only the expert that
its layer's own first miss would evict (``_victim_for_next``), once the current layer is done with
it: a right guess then reads what on demand reads, only earlier; a wrong one costs one eviction,
undone if the guess is cancelled before it read a byte (``_undo_displace``). A wrong guess must not
cost the step an expert it was about to use, and a right one must not cost a later step one: every
rule that let guesses evict "free of cost" experts (rarely used ones, those of layers whose experts
seldom outlive the cycle) made prefetch need more bytes per token than on demand somewhere (session
29: up to 10.5% on the random MoE with a 25% cache, 3% on the trained one with a 2x cache), and on
a disk of Pi speed every byte is time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from worker.kernels.quant import kernel_layout
from worker.memory import expert_reads
from worker.memory.expert_reads import Read, ReadQueue
from worker.memory.prefetch_gate import PrefetchGate
from worker.shards.shard_file import ShardFile, aligned_buffer
from worker.shards.weights import ExpertWeights, Fields, expert_block, from_fields

POLICIES = ("distance", "lru", "frequency")
GATED = True  # PrefetchGate decides per layer; False reads every guess (a switch for bench/moe_cache.py)
DEFAULT_READ_DEPTH = 2  # reads in flight for a layer's demand misses (bench/moe_cache.py's disk figures)
# A guess may cost an eviction (``keep``, ``_victim_for_next``) only where its layer's guesses are
# right at least this often (``PrefetchGate.sure``); elsewhere the policy's own choice stands.
KEEP_PRECISION = 0.7
# ... and ``_victim_for_next`` only where the bytes a wrong guess costs, in expectation, are at most
# this share of an expert: (1 - sure) x the chance its victim would have been a hit (``kept``)
WRONG_GUESS_COST = 0.05
FREQUENCY_DECAY = 0.9  # ``frequency`` policy: weight of the past in an expert's use rate at its layer
Key = tuple[int, int]  # (layer, expert)


@dataclass(eq=False)
class Entry:
    key: Key
    buffer: int
    fields: Fields | None  # None while its read is queued or in flight
    last_use: int = 0
    uses: int = 0
    read: Read | None = None  # its read, until done
    fetched: bool = True  # read from the file and not used since: its first use counts in ``fetched_bytes``
    guess: bool = False  # read ahead on a prediction, not yet asked for
    missed: bool = False  # read on demand from ``begin_layer``: a miss when asked for, landed or not
    laid_out: bool = True  # ``fields`` in the running int4 kernel's layout; False: as read (``get`` converts)
    displaced: Entry | None = None  # a guess's: the expert evicted for its buffer, back if no byte was read


def choose_victim(candidates: Iterable[Entry], layer: int, num_layers: int, policy: str,
                  rate: dict[Key, float] | None = None) -> Entry | None:
    """The entry to evict when the model is at ``layer``; None when there is no candidate.
    ``rate``: each expert's use rate at its layer (``frequency``; 0 when absent)."""
    if policy == "lru":
        return min(candidates, key=lambda e: e.last_use, default=None)

    def ahead(e: Entry) -> int:  # 0: this layer, num_layers-1: just used
        return (e.key[0] - layer) % num_layers

    if policy == "frequency":
        rates = rate or {}
        return min(candidates, key=lambda e: (rates.get(e.key, 0.0), -ahead(e), e.last_use), default=None)
    return min(candidates, key=lambda e: (-ahead(e), e.uses, e.last_use), default=None)


class ExpertCache:
    """``slots`` buffers of ``slot_bytes``; experts of ``file`` (a rank's shard) move through them."""

    def __init__(self, file: ShardFile | None, num_layers: int, num_experts: int, slots: int, slot_bytes: int,
                 policy: str = "distance", preloaded: dict[Key, Fields] | None = None,
                 read_depth: int = DEFAULT_READ_DEPTH, readers: int | None = None):
        """``preloaded``: every expert already in memory (sliced from a checkpoint); no file, no I/O.
        ``read_depth``: reads in flight for demand misses; ``readers``: reader threads (default
        ``read_depth``; 0 in tests: only the compute thread reads, prefetches wait)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose from {POLICIES}")
        self.file = file
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.policy = policy
        self.slot_bytes = slot_bytes
        # each with room to place any expert at its O_DIRECT lead (``ShardFile.place``): 12 KiB more per buffer
        self.buffers = [aligned_buffer(slot_bytes) for _ in range(0 if preloaded else slots)]
        self._free = list(range(len(self.buffers)))
        self._entries: dict[Key, Entry] = {}
        self._pinned: set[Key] = set()
        self._protected: set[Key] = set()  # still needed by the layer computing now
        # cached experts predicted for a coming layer: the current layer's misses evict them last
        # (with two MoE layers the next layer is also the one just used, first to go by distance)
        self._wanted: set[Key] = set()
        self.rate: dict[Key, float] = {}  # (layer, expert) -> EMA of "the router picked it" per layer step
        self._displaced: dict[int, Entry] = {}  # buffer -> the expert just evicted from it for a guess
        self.undone = 0  # evictions for guesses undone: the guess was cancelled before it read a byte
        self._starved: dict[int, list[int]] = {}  # layer -> guesses the gate let read that found no buffer
        self._uncached_guesses: dict[int, set[int]] = {}  # layer -> its guesses of this step not cached when made
        # layer -> EMA of the share of the experts it needed that were cached from an earlier use
        # (not read ahead): the chance that an expert of it evicted now would have been a hit
        self.kept: dict[int, float] = {}
        self.gate = PrefetchGate()
        self.gated = GATED
        self._lead_start: dict[int, float] = {}  # layer -> when its first prediction of this step came
        self._span_start: dict[int, float] = {}  # the same, kept until the layer's experts are done
        self._layer = 0
        self._in_layer = False  # between begin_layer and end_layer
        self._clock = 0
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # a read is done: the compute thread waits on it
        work = threading.Condition(lock)  # pieces to take: the reader threads wait on it
        self.hits = self.misses = self.late = 0
        self.stall_seconds = 0.0
        # bytes of the experts a step used that were not in the cache from an earlier use: what had to
        # come from disk whatever the prefetching (wrong guesses are not in it); the I/O bound's numerator
        self.fetched_bytes = 0
        self.predicted = self.predicted_used = self.used = 0  # for recall: |P ∩ A| / |A|
        self.prefetches = self.cancelled = 0
        self.prefetches_used = 0  # guesses the layer then asked for, landed or late
        self.prefetch_bytes = 0
        self.reads: ReadQueue | None = None
        if preloaded is not None:
            self._entries = {key: Entry(key, -1, fields, fetched=False) for key, fields in preloaded.items()}
            return
        assert file is not None
        self.reads = ReadQueue(file, self._cond, read_depth, readers, work)
        if slots >= num_layers * num_experts:  # everything fits: load it all now
            for layer in range(num_layers):
                for expert in range(num_experts):
                    if file.has(expert_block(layer, expert)):
                        buffer = self._free.pop()
                        fields = file.read_into(expert_block(layer, expert), self.buffers[buffer])  # once: buffered
                        self._entries[(layer, expert)] = Entry((layer, expert), buffer, fields, fetched=False)

    @property
    def nbytes(self) -> int:
        if not self.buffers:
            return sum(sum(t.numel() * t.element_size() for t in e.fields.values())
                       for e in self._entries.values() if e.fields is not None)
        return len(self.buffers) * self.slot_bytes

    def _block_bytes(self, key: Key) -> int:
        return self.file.block_bytes(expert_block(*key)) if self.file is not None else 0

    def begin_layer(self, layer: int, needed: Iterable[int]) -> list[int]:
        """The model enters ``layer``'s experts; ``needed`` are those it will ask for. Its
        prefetches of other experts are cancelled, those of needed ones become demand reads, and
        the other needed experts start reading now (a buffer permitting; else ``get`` reads it).
        Returns ``needed`` in the order to compute them: the experts already here (computed while
        the misses are read), then the rest in the order they were asked for from the disk, each
        computed as soon as it lands while the next is still read. The misses go to the reader
        threads, each in pieces read at once; the compute thread helps with the one it waits for.
        (The compute thread reading the first miss whole itself, no reader woken, decoded the
        trained tiny MoE at 0.77-0.90x main's on demand: a cold read alone got 0.5-0.8x the MB/s
        of two at once here, and the cached experts waited behind it.)"""
        with self._cond:
            self._layer = layer
            self._in_layer = True
            self._starved.pop(layer, None)
            needed = list(needed)
            self._protected = {(layer, e) for e in needed}
            self._wanted = {k for k in self._wanted if k[0] != layer}  # needed ones are protected now
            if (started := self._lead_start.pop(layer, None)) is not None:
                self.gate.observe_lead(layer, time.perf_counter() - started)
            for expert in range(self.num_experts):
                old = self.rate.get((layer, expert), 0.0)
                self.rate[(layer, expert)] = FREQUENCY_DECAY * old + (1 - FREQUENCY_DECAY) * (expert in needed)
            if self.reads is None:
                return needed
            if needed:  # how often the layer finds its experts still cached from an earlier use
                share = sum(1 for e in needed
                            if (k := self._entries.get((layer, e))) is not None and not k.guess) / len(needed)
                self.kept[layer] = FREQUENCY_DECAY * self.kept.get(layer, share) + (1 - FREQUENCY_DECAY) * share
            for key, entry in list(self._entries.items()):
                if key[0] != layer or entry.read is None:
                    continue
                if key in self._protected:
                    self.reads.promote(entry.read)
                else:
                    self._drop_guess(entry)
            here = [e for e in needed if (e2 := self._entries.get((layer, e))) is not None and e2.fields is not None]
            coming = [e for e in needed if (layer, e) in self._entries and e not in here]
            queued: list[int] = []  # for the reader threads
            for expert in needed:
                if (layer, expert) in self._entries:
                    continue
                buffer = self._victim()
                if buffer is None:
                    break
                self._start((layer, expert), buffer, demand=True).missed = True
                queued.append(expert)
            rest = [e for e in needed if e not in here and e not in coming and e not in queued]  # ``get`` reads them
            return here + coming + queued + rest

    def _drop_guess(self, entry: Entry) -> None:
        """Cancel a prefetch still reading (caller holds the lock); its buffer returns when the
        piece in flight is done."""
        assert self.reads is not None and entry.read is not None
        del self._entries[entry.key]
        self._wanted.discard(entry.key)
        self.reads.cancel(entry.read)
        self.cancelled += 1

    def end_layer(self) -> None:
        with self._cond:
            for entry in self._entries.values():  # a first piece kept for a get that never came (an error between)
                if entry.read is not None and entry.read.own and self.reads is not None:
                    self.reads.release(entry.read)
            self._protected = set()
            self._in_layer = False
            if (started := self._span_start.pop(self._layer, None)) is not None:
                self.gate.observe_span(self._layer, time.perf_counter() - started)

    def _start(self, key: Key, buffer: int, demand: bool, own: bool = False) -> Entry:
        """A new entry for ``key`` in ``buffer`` and its read (caller holds the lock); ``own``: the
        compute thread reads it in ``get``, no reader is woken for it."""
        assert self.reads is not None
        entry = Entry(key, buffer, None, guess=not demand)
        self._entries[key] = entry

        def done(read: Read) -> None:  # under the lock, from whichever thread finished the read
            if read.cancelled or read.error is not None:
                if self._entries.get(key) is entry:
                    del self._entries[key]
                if not (read.cancelled and not read.started and self._undo_displace(entry)):
                    self._free.append(buffer)
            else:
                assert self.file is not None
                entry.fields = self.file.views(read.block, read.buffer)
                entry.laid_out = False  # converted by ``get``, on the compute thread, outside the lock
            entry.read = None
            self._cond.notify_all()

        block = expert_block(*key)
        assert self.file is not None
        entry.read = self.reads.submit(block, self.file.place(block, self.buffers[buffer]), demand, done, own=own)
        return entry

    def _candidates(self, evict_protected: bool = False) -> list[Entry]:
        return [e for k, e in self._entries.items() if e.fields is not None and k not in self._pinned
                and (evict_protected or k not in self._protected)]

    def _victim(self, evict_protected: bool = False) -> int | None:
        """A free buffer, or one freed by evicting (caller holds the lock). Experts the current
        layer still needs are spared unless ``evict_protected`` (a demand miss with no other choice)."""
        if self._free:
            return self._free.pop()
        candidates = self._candidates(evict_protected)
        victim = (choose_victim((e for e in candidates if e.key not in self._wanted), self._layer, self.num_layers,
                                self.policy, self.rate)
                  or choose_victim(candidates, self._layer, self.num_layers, self.policy, self.rate))
        if victim is None:
            return None
        del self._entries[victim.key]
        self._wanted.discard(victim.key)
        return victim.buffer

    def _keeps(self, layer: int) -> bool:
        """Whether ``layer``'s guesses may keep cached experts through the current layer's misses:
        where the predictor is sure enough there (``KEEP_PRECISION``), and the gate lets the
        layer use its guesses at all. A closed layer's guesses change nothing, so that it reads
        what on-demand reads: kept on a closed layer, they had gated runs on the random MoE need
        45 MB per token against 42.5 on demand, with 0.3 MB read ahead."""
        return ((not self.gated or self.gate.open.get(layer, False))
                and self.gate.sure(layer) >= KEEP_PRECISION)

    @property
    def evicts_next_layer_last(self) -> bool:
        """Whether the policy itself evicts the experts of the MoE layer that routes next only
        when nothing else is left (``distance``: they are the nearest ahead), so that a guess for
        that layer, kept (``keep``), would not change what the current layer's misses evict: the
        model then makes the guess after ``begin_layer`` has started the misses, while they read
        (before them, the guess's compute, 0.9 ms a token on the trained tiny MoE, kept the disk
        idle). ``lru`` and ``frequency`` may evict them first (``lru``: used a whole cycle ago)."""
        return self.policy == "distance"

    def keep(self, layer: int, experts: Iterable[int]) -> None:
        """``layer``'s ``experts`` are predicted for its coming step: those cached survive the
        current layer's misses where ``_keeps`` (called before ``begin_layer``, which starts
        reading the misses, unless ``evicts_next_layer_last``)."""
        with self._cond:
            if self._keeps(layer):
                self._wanted.update(k for e in experts if (k := (layer, e)) in self._entries)

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Read ahead ``experts`` of ``layer``, the MoE layer that routes next, that are not cached
        (most likely first), as far as the gate and the buffers allow: a free buffer, else, for a
        sure guess, the one ``layer``'s own first miss would take (``_victim_for_next``). Guesses
        the gate lets read but that find no buffer yet wait, and start as the current layer's
        experts are done (``get``) or at ``layer``'s start (``prefetch_starved``)."""
        now = time.perf_counter()
        experts = list(experts)
        with self._cond:
            if experts:
                self._lead_start.setdefault(layer, now)
                self._span_start.setdefault(layer, now)
            todo = []
            for expert in experts:
                key = (layer, expert)
                if key in self._entries:
                    if self._keeps(layer):
                        self._wanted.add(key)  # cached or on its way already: kept through this layer's misses
                elif self.reads is not None:
                    todo.append(expert)
                    self._uncached_guesses.setdefault(layer, set()).add(expert)
            if not todo or self.reads is None:
                return
            todo.sort(key=lambda e: -self.rate.get((layer, e), 0.0))
            self.gate.open[layer] = True  # ungated: every layer reads its guesses; else plan() decides
            if self.gated:
                spb, nbytes = self.reads.seconds_per_byte, self._block_bytes((layer, todo[0]))
                expert_s = spb * nbytes
                available = self.gate.available(layer, now - self._lead_start[layer],
                                                spb * self.reads.backlog_bytes(), expert_s)
                todo = self.gate.plan(layer, todo, available, expert_s, spb * min(nbytes, expert_reads.PREFETCH_PIECE))
            for i, expert in enumerate(todo):
                if not self._free:
                    self._starved[layer] = todo[i:]
                    self._start_starved(layer)
                    return
                self._start_guess(layer, expert, self._free.pop())

    def prefetch_starved(self, layer: int) -> None:
        """``layer`` is about to route, the layer before it done: read its guesses still waiting
        for a buffer (``prefetch``) into the buffers its own misses would take. Call at the
        layer's start (``MoeRankModel._layer_start``)."""
        with self._cond:
            if self.reads is not None and self._next_up(layer):
                self._start_starved(layer)

    def _start_starved(self, layer: int) -> None:
        """Start ``layer``'s waiting guesses into the buffers its own first misses would take
        (``_victim_for_next``), as far as there are such buffers now (caller holds the lock); the
        rest go on waiting."""
        todo = [e for e in self._starved.pop(layer, []) if (layer, e) not in self._entries]
        sure = self.gate.sure(layer)
        for i, expert in enumerate(todo):
            buffer = self._victim_for_next(layer, sure)
            if buffer is None:
                self._starved[layer] = todo[i:]
                return
            self._start_guess(layer, expert, buffer)

    def _start_guess(self, layer: int, expert: int, buffer: int) -> None:
        self._start((layer, expert), buffer, demand=False).displaced = self._displaced.pop(buffer, None)
        self._wanted.add((layer, expert))
        self.prefetches += 1
        self.prefetch_bytes += self._block_bytes((layer, expert))

    def _next_up(self, layer: int) -> bool:
        """Whether ``layer`` routes next with nothing of the layer before it still to compute (caller
        holds the lock): between that layer's ``end_layer`` and ``layer``'s ``begin_layer``."""
        return not self._in_layer and layer != self._layer and not self._pinned

    def _victim_for_next(self, layer: int, sure: float) -> int | None:
        """A buffer for a guess for ``layer``, the MoE layer that routes next: the expert its own
        first miss would evict (the policy's choice at ``layer``; the current layer's experts
        still in use or still needed, and those predicted for ``layer``, kept), where the guess is
        right often enough (``sure``, ``PrefetchGate.sure``, at least ``KEEP_PRECISION``) and the
        victim's layer rarely finds its experts cached anyway (``kept``): a wrong guess costs that
        one eviction, and ``(1 - sure) x kept`` is what it costs in expectation, a share of an
        expert's read (``WRONG_GUESS_COST``). With a 2x cache on demand keeps almost nothing a
        whole cycle (the trained MoE: 8% hits), so a guess may go; on the random MoE with a 25%
        cache (59% hits), guesses right 75% of the time that took these buffers made prefetch
        need 4-11% more bytes per token than on demand (session 29).

        Called as the guess is made and again each time the current layer is done with one of its
        experts (``get``): by distance, ``layer``'s first miss takes an expert of the current
        layer, the farthest ahead once done with, so a right guess waits for that buffer and then
        reads what on demand reads, only earlier, while the current layer computes and
        ``layer``'s attention runs. Taken only at ``layer``'s start (until session 28), a guess
        had an attention block to be read under: with perfect guesses (the bench's oracle) on the
        trained tiny MoE, 0.04-0.57 MB of a token's 13-23 MB were read ahead, the disk idle 4.1-5.5
        ms per token while the step computed. Taken at once (the same session), whatever the
        policy chose among the experts not in use, it read ahead 0.6-1.5 MB with the disk idle
        1.2-1.9 ms, but with a cache of 2x the active experts that choice was an expert on demand
        would have kept a whole cycle: 25.2 MB needed per token against 23.1."""
        if sure < KEEP_PRECISION:
            return None
        if self._free:
            return self._free.pop()
        busy = self._pinned | self._protected  # the current layer's experts not done with yet
        candidates = [e for k, e in self._entries.items() if k not in self._wanted and k[0] != layer
                      and (e.fields is not None or k in busy)]
        victim = choose_victim(candidates, layer, self.num_layers, self.policy, self.rate)
        if victim is None or victim.key in busy:  # on demand's victim is still in use: wait for it
            return None
        if (1 - sure) * self.kept.get(victim.key[0], 1.0) > WRONG_GUESS_COST:
            return None  # its layer finds its experts cached too often: a wrong guess costs a read
        return self._displace(victim)

    def _displace(self, victim: Entry) -> int:
        """Evict ``victim`` for a guess (caller holds the lock); its buffer, for ``_start_guess``."""
        del self._entries[victim.key]
        self._displaced[victim.buffer] = victim
        return victim.buffer

    def _undo_displace(self, guess: Entry) -> bool:
        """A guess cancelled before any byte of it was read: its buffer still holds the expert it
        displaced, which is cached again (caller holds the lock). A wrong guess that never reached
        the disk (the disk busy with demand reads until the router proved it wrong) then costs
        nothing; before, it cost an eviction. Not shown to matter in bytes: on the random MoE
        with a 25% cache (2 prompts x 16 steps), gated `adaptive` and `temporal` needed 38.0-46.3
        MB per token with this and 39.2-46.3 without, 2 runs each, against on demand's 41.3; the
        bytes of one configuration move by 4-5 MB from run to run."""
        victim = guess.displaced
        if victim is None or victim.key in self._entries:
            return False
        self._entries[victim.key] = victim
        self.undone += 1
        return True

    def record_prediction(self, layer: int, predicted: set[int], actual: set[int]) -> None:
        with self._cond:
            self.predicted += len(predicted)
            self.predicted_used += len(predicted & actual)
            self.used += len(actual)
            self.gate.observe_prediction(layer, len(predicted), len(predicted & actual))
            if uncached := self._uncached_guesses.pop(layer, set()):
                self.gate.observe_uncached(layer, len(uncached), len(uncached & actual))

    @contextmanager
    def get(self, layer: int, expert: int) -> Iterator[ExpertWeights]:
        """The expert's weights, pinned until the block exits; read on a miss."""
        key = (layer, expert)
        start = time.perf_counter()
        with self._cond:
            self._clock += 1
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                entry = self._start(key, self._buffer_for_miss(), demand=True, own=True)
            elif entry.missed:
                self.misses += 1  # its demand read started in begin_layer, landed or not
            elif entry.guess and entry.fields is None:
                self.late += 1  # read ahead, not landed yet: the rest is read now, not again
            else:
                self.hits += 1
            self.prefetches_used += entry.guess
            if entry.read is not None and self.reads is not None:
                self.reads.promote(entry.read)
            entry.guess = entry.missed = False
            self._pinned.add(key)
            read = entry.read
        try:
            if read is not None:
                assert self.reads is not None
                self.reads.help(read)  # outside the lock: reader threads read other pieces meanwhile
            with self._cond:
                while entry.fields is None:  # the read's completion sets it under the lock
                    self._cond.wait(1.0)
                entry.last_use, entry.uses = self._clock, entry.uses + 1
                if entry.fetched:
                    entry.fetched = False
                    self.fetched_bytes += self._block_bytes(key)
                self.stall_seconds += time.perf_counter() - start
                fields = entry.fields
                convert = not entry.laid_out
            if convert:  # once per read; left to ``linear``, a CPU without a native int4 kernel converts at every product
                fields = kernel_layout(fields)
                with self._cond:
                    entry.fields, entry.laid_out = fields, True
        except BaseException:
            with self._cond:
                self._pinned.discard(key)
            raise
        try:
            yield from_fields(ExpertWeights, fields)
        finally:
            with self._cond:
                self._pinned.discard(key)
                self._protected.discard(key)  # each expert runs once per layer
                for waiting in [w for w in self._starved if w != layer]:  # its buffer may be on demand's next victim
                    self._start_starved(waiting)

    def _buffer_for_miss(self) -> int:
        """A buffer for an expert needed now (caller holds the lock): evicts even an expert the
        current layer still needs if nothing else can go, then takes one from a prefetch still
        reading, and waits while every buffer is pinned or being read."""
        for _ in range(600):  # bounded: a minute of 0.1 s waits
            buffer = self._victim()
            if buffer is None:
                buffer = self._victim(evict_protected=True)
            if buffer is not None:
                return buffer
            guesses = [e for e in self._entries.values() if e.read is not None and e.key not in self._protected]
            for entry in guesses:
                self._drop_guess(entry)  # its buffer comes back when its piece in flight is done
            if not guesses and all(e.fields is not None for e in self._entries.values()):
                raise RuntimeError("expert cache: every buffer is pinned (the cache is too small)")
            self._cond.wait(0.1)
        raise RuntimeError("expert cache: no buffer came free for a minute")

    def close(self) -> None:
        """Stop the reader threads and close the experts' shard file."""
        if self.reads is not None:
            self.reads.close()
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
            "expert_prefetch_bytes": self.prefetch_bytes,  # asked ahead, right or wrong
            "expert_prefetch_bytes_read": self.reads.prefetch_bytes_read if self.reads else 0,
            "expert_prefetch_skipped": self.gate.skipped,  # guesses the gate did not read ahead
            "expert_prediction_recall": self.predicted_used / self.used if self.used else 0.0,
            "expert_prediction_precision": self.predicted_used / self.predicted if self.predicted else 0.0,
            "expert_predicted": self.predicted,  # the counts behind recall and precision
            "expert_predicted_used": self.predicted_used,
            "expert_used": self.used,
            "expert_bytes_read": self.file.bytes_read if self.file else 0,
            "expert_read_seconds": self.file.read_seconds if self.file else 0.0,
            "expert_stall_seconds": self.stall_seconds,
            "expert_fetched_bytes": self.fetched_bytes,
            "expert_prefetches_used": self.prefetches_used,
            # the gate's state: MoE layers whose last guesses it let read ahead
            "expert_prefetch_layers_open": sum(self.gate.open.values()),
            "expert_prefetch_layers_off": sum(self.gate.losing(layer) for layer in self.gate.open),
        }
