"""The expert predictors' choices, and the expert cache's handling of speculative prefetches:
cancelled when the layer turns out not to need them, finished by the compute thread (never read
twice) when needed but not landed, read only while no demand read waits, never at the cost of an
expert the step is about to use, and not at all where the prefetch gate expects no gain."""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.config import ModelConfig
from worker.memory import expert_reads
from worker.memory.expert_cache import KEEP_PRECISION, Entry, ExpertCache, choose_victim
from worker.memory.expert_reads import PAGE, PREFETCH_PIECE, ReadQueue, pieces
from worker.memory.prefetch_gate import MIN_SPANS, PROBE_EVERY, REPROBE_EVERY, PrefetchGate
from worker.models.moe import Predictor
from worker.shards.shard_file import ShardFile, aligned_buffer
from worker.shards.shard_writer import write_shards
from worker.shards.sharding import plan_shards
from worker.shards.weights import expert_block, rank_shard_path

# Layer 1's router sends a hidden state with a positive first feature to experts 2 and 3.
ROUTER = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # (E=4, d=2)
HIDDEN = torch.tensor([[1.0, 0.5]])  # (T=1, d=2)


def _record(gate: PrefetchGate, layer: int, precision: float) -> None:
    """Give ``layer`` a long record of guesses right ``precision`` of the time (``precision`` and
    ``sure``, about ``precision`` less 0.05)."""
    gate.precision[layer] = precision
    gate.guessed[layer], gate.right[layer] = 100.0, 100.0 * precision


def _predictor(mode: str) -> Predictor:
    return Predictor({0: ROUTER, 1: ROUTER}, {0: torch.ones(2), 1: torch.ones(2)}, 1e-6, top_k=2, mode=mode)


def test_adaptive_predictor_follows_the_guess_that_is_right_in_that_layer() -> None:
    predictor = _predictor("adaptive")
    assert predictor.predict(1, HIDDEN) == {2, 3}  # no record, no history: the router
    predictor.observe(1, {0, 1})
    assert predictor.record[1] == {"router": [0, 2]}
    assert predictor.predict(1, HIDDEN) == {0, 1, 2, 3}  # the only scored guess is never right: both
    predictor.observe(1, {0, 1})
    assert predictor.record[1] == {"router": [0, 4], "temporal": [2, 2]}
    assert predictor.predict(1, HIDDEN) == {0, 1}  # the temporal guess, right every time
    predictor.observe(1, {0, 2})  # each guess half right: router 1/6, temporal 3/4
    assert predictor.record[1] == {"router": [1, 6], "temporal": [3, 4]}
    assert predictor.predict(1, HIDDEN) == {0, 2}  # temporal is right 0.75 >= unsure_below of the time
    assert predictor.predict(0, HIDDEN) == {2, 3}  # layer 0 has its own record (none): the router


def test_adaptive_predictor_prefers_the_router_on_a_tie() -> None:
    predictor = _predictor("adaptive")
    predictor.predict(1, HIDDEN)
    predictor.observe(1, {2, 3})  # the router was right; temporal has no record yet
    assert predictor.predict(1, HIDDEN) == {2, 3}
    predictor.observe(1, {2, 3})  # both right: a tie
    predictor.last_used[1] = {0, 3}  # a different temporal guess, to tell them apart
    assert predictor.predict(1, HIDDEN) == {2, 3}


# A hidden state that layer 1's router sends to experts 0 and 1 (negative first feature).
LATER_HIDDEN = torch.tensor([[-1.0, 0.5]])  # (T=1, d=2)


def test_input_predictor_guesses_when_the_layer_starts() -> None:
    predictor = _predictor("input")
    assert predictor.predict(1, HIDDEN) == set()  # nothing a block ahead
    assert predictor.predict_at_input(1, LATER_HIDDEN) == {0, 1}  # the router on the layer's own input


def test_early_predictors_add_nothing_at_the_layers_input() -> None:
    for mode in ("router", "temporal", "union"):
        assert _predictor(mode).predict_at_input(1, LATER_HIDDEN) == set()


def _adaptive_step(predictor: Predictor, early_hidden: torch.Tensor, used: set[int]) -> tuple[set[int], set[int]]:
    """One step of layer 1: (what is read a block ahead, what is read when the layer starts)."""
    early = predictor.predict(1, early_hidden)
    late = predictor.predict_at_input(1, LATER_HIDDEN)
    predictor.observe(1, used)
    return early, late


def test_adaptive_predictor_waits_for_the_input_guess_where_it_is_clearly_surer() -> None:
    predictor = _predictor("adaptive")
    # Layer 1 uses experts 0 and 1 at every step: the block-ahead router (2, 3) is always wrong,
    # the input router (0, 1) always right; temporal (from the second step) right too.
    assert _adaptive_step(predictor, HIDDEN, {0, 1}) == ({2, 3}, set())  # no record: the router, early
    assert predictor.record[1] == {"router": [0, 2], "input": [2, 2]}
    predictor.last_used.pop(1)  # keep temporal out: the early choice is the router alone
    early, late = _adaptive_step(predictor, HIDDEN, {0, 1})
    assert (early, late) == (set(), {0, 1})  # input right 1.0 > router 0.0 + margin: wait for it
    assert predictor.record[1]["input"] == [4, 4]


def test_adaptive_predictor_keeps_the_early_guess_unless_input_is_surer_by_the_margin() -> None:
    predictor = _predictor("adaptive")
    # The early router and the input router both name 2 and 3; the layer uses 2 and 3: a tie.
    predictor.predict(1, HIDDEN)
    predictor.predict_at_input(1, HIDDEN)
    predictor.observe(1, {2, 3})
    early, late = predictor.predict(1, HIDDEN), predictor.predict_at_input(1, HIDDEN)
    assert (early, late) == ({2, 3}, set())  # a block of lead time is worth more than no gain


def test_adaptive_predictor_reads_a_sure_early_guess_though_input_is_surer() -> None:
    """Router right 0.8 of the time, input 1.0: the early guess is sure enough (unsure_below 0.7),
    so the layer reads it a block ahead instead of waiting for the surer one."""
    predictor = _predictor("adaptive")
    predictor.record[1] = {"router": [8, 10], "input": [10, 10]}
    assert predictor.predict(1, HIDDEN) == {2, 3}
    assert predictor.predict_at_input(1, LATER_HIDDEN) == set()
    predictor.record[1] = {"router": [6, 10], "input": [10, 10]}  # 0.6: unsure, input 0.4 surer: wait
    assert predictor.predict(1, HIDDEN) == set()
    assert predictor.predict_at_input(1, LATER_HIDDEN) == {0, 1}


def test_adaptive_predictor_waiting_but_unsure_adds_the_early_guesses() -> None:
    predictor = _predictor("adaptive")
    predictor.record[1] = {"router": [0, 10], "input": [6, 10]}  # input 0.6: surer, but under unsure_below
    early = predictor.predict(1, HIDDEN)
    assert early == set()
    assert predictor.predict_at_input(1, LATER_HIDDEN) == {0, 1, 2, 3}  # input's guess and the router's


def test_union_predictor_names_both_guesses() -> None:
    predictor = _predictor("union")
    assert predictor.predict(1, HIDDEN) == {2, 3}
    predictor.observe(1, {0, 2})
    assert predictor.predict(1, HIDDEN) == {0, 2, 3}


@pytest.fixture(params=[False, True], ids=["buffered", "direct"])
def shard_file(checkpoints, tmp_path: Path, request: pytest.FixtureRequest):
    """The tiny Mixtral's rank file, read through the page cache or with O_DIRECT (as the loader opens it)."""
    model_dir = checkpoints("mixtral")  # 2 layers, 4 experts
    config = ModelConfig.from_dir(model_dir)
    shards = plan_shards(config, [1.0])
    shard_dir = write_shards(model_dir, shards, tmp_path / "shards", progress=False)
    file = ShardFile(rank_shard_path(shard_dir, shards[0]), random_access=True, direct=request.param)
    if request.param and not file.direct:
        file.close()
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    yield file
    file.close()


def _cache(file: ShardFile, slots: int = 4, readers: int = 0, policy: str = "distance") -> ExpertCache:
    """No reader threads by default: only the compute thread reads, prefetches stay queued."""
    slot_bytes = max(file.block_bytes(expert_block(layer, e)) for layer in range(2) for e in range(4))
    return ExpertCache(file, 2, 4, slots, slot_bytes, policy=policy, readers=readers)


def _same(got: Any, block: str, file: ShardFile) -> bool:
    want = file.read(block)
    return torch.equal(got.w_gate_up, want["w_gate_up"]) and torch.equal(got.w_down, want["w_down"])


def _open_gate(cache: ExpertCache) -> None:
    cache.gated = False  # these tests are about what a prefetch does, not whether the gate lets it


def _won(gate: PrefetchGate, layer: int) -> None:
    """``layer`` as if reading ahead had measured twice as fast as not: the gate's time check lets
    it read, and only its model-based tests decide."""
    for arm, seconds in ((True, 0.001), (False, 0.002)):
        gate.spans[(layer, arm)], gate.span[(layer, arm)] = MIN_SPANS, seconds


def test_unneeded_prefetches_are_cancelled_and_their_buffers_reused(shard_file: ShardFile) -> None:
    cache = _cache(shard_file)
    _open_gate(cache)
    cache.prefetch(1, [0, 1, 2])
    assert cache.prefetches == 3 and len(cache._free) == 1
    cache.begin_layer(1, [1])  # the router asks for expert 1 only
    assert cache.cancelled == 2 and len(cache._free) == 3
    with cache.get(1, 1) as weights:  # still queued: read by the caller now
        assert shard_file.bytes_read == shard_file.block_bytes(expert_block(1, 1))  # the guesses read nothing
        assert _same(weights, expert_block(1, 1), shard_file)
    cache.end_layer()
    assert cache.late == 1 and cache.misses == 0
    assert set(cache._entries) == {(1, 1)}
    cache.close()


def test_a_guess_without_a_buffer_is_read_into_on_demands_own_victim_once_it_is_free(
        shard_file: ShardFile) -> None:
    """Layer 0's two experts fill both buffers, so the guess for layer 1 made as layer 0 routes
    finds none. As soon as layer 0 is done with its experts, before layer 1 starts, it takes the
    buffer layer 1's own miss would take, and is read: a right guess, so the step reads exactly
    what on demand reads."""
    cache = _cache(shard_file, slots=2)
    _open_gate(cache)
    _record(cache.gate, 1, 1.0)
    assert cache.begin_layer(0, [0, 1]) == [0, 1]
    cache.prefetch(1, [2])  # as layer 0 routes: both buffers hold layer 0's experts, in use
    assert cache.prefetches == 0 and (1, 2) not in cache._entries
    cache.prefetch_starved(1)  # too early: layer 0 still computes, nothing is taken from it
    assert cache.prefetches == 0
    for expert in (0, 1):
        with cache.get(0, expert):
            pass
    assert cache.prefetches == 1 and cache._entries[(1, 2)].guess  # before layer 0 ends
    cache.end_layer()
    cache.prefetch_starved(1)  # layer 1's start: nothing left waiting
    assert len([k for k in cache._entries if k[0] == 0]) == 1  # one of layer 0's, as a miss of layer 1 would
    cache.begin_layer(1, [2, 3])
    for expert in (2, 3):
        with cache.get(1, expert) as weights:
            assert _same(weights, expert_block(1, expert), shard_file)
    cache.end_layer()
    bytes_per_expert = shard_file.block_bytes(expert_block(0, 0))
    assert cache.stats()["expert_fetched_bytes"] == 4 * bytes_per_expert  # on demand's bytes
    assert cache.prefetches_used == 1 and cache.misses == 3 and cache.cancelled == 0
    cache.close()


def test_an_unsure_guess_takes_no_buffer_at_its_layers_start(shard_file: ShardFile) -> None:
    cache = _cache(shard_file, slots=2)
    _open_gate(cache)
    _record(cache.gate, 1, 0.5)  # under KEEP_PRECISION: a wrong guess would cost an eviction too often
    cache.begin_layer(0, [0, 1])
    cache.prefetch(1, [2])
    for expert in (0, 1):
        with cache.get(0, expert):
            pass
    cache.end_layer()
    cache.prefetch_starved(1)
    assert cache.prefetches == 0 and len(cache._entries) == 2
    cache.close()


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefetch pieces of 16 KiB: the tiny model's experts (72 KiB) are read in several."""
    monkeypatch.setattr(expert_reads, "PREFETCH_PIECE", 16 << 10)


def test_a_needed_prefetch_half_read_is_finished_not_read_again(shard_file: ShardFile, small_pieces: None) -> None:
    cache = _cache(shard_file)
    _open_gate(cache)
    cache.prefetch(0, [3])
    read = cache._entries[(0, 3)].read
    assert read is not None and cache.reads is not None
    nbytes = read.nbytes
    with cache._cond:  # a reader thread reads its first piece, as it would while the disk idles
        piece = cache.reads._take(read)
    assert piece is not None
    cache.reads._read_piece(read, piece)
    assert shard_file.bytes_read == piece[1] - piece[0] < nbytes
    cache.begin_layer(0, [3])
    with cache.get(0, 3) as weights:
        assert _same(weights, expert_block(0, 3), shard_file)
    cache.end_layer()
    assert shard_file.bytes_read == nbytes + nbytes  # its own bytes once, and _same's check read
    assert cache.late == 1 and cache.stats()["expert_fetched_bytes"] == nbytes
    cache.close()


def test_a_landed_prefetch_is_a_hit_and_is_not_cancelled(shard_file: ShardFile) -> None:
    cache = _cache(shard_file, readers=1)
    _open_gate(cache)
    cache.prefetch(0, [0, 3])
    with cache._cond:
        assert cache._cond.wait_for(lambda: all(e.fields is not None for e in cache._entries.values()), 30)
    cache.begin_layer(0, [0])
    assert cache.cancelled == 0
    with cache.get(0, 0) as weights:
        assert _same(weights, expert_block(0, 0), shard_file)
    cache.end_layer()
    assert cache.hits == 1 and (0, 3) in cache._entries
    cache.close()


def test_a_layers_misses_start_reading_when_it_routes(shard_file: ShardFile) -> None:
    cache = _cache(shard_file, readers=2)
    order = cache.begin_layer(0, [0, 1, 2])  # all three are read by the reader threads, before any get
    assert order == [0, 1, 2]
    with cache._cond:
        assert cache._cond.wait_for(lambda: all(cache._entries[(0, e)].fields is not None for e in (0, 1, 2)), 30)
    assert set(cache._entries) == {(0, 0), (0, 1), (0, 2)}
    for expert in order:
        with cache.get(0, expert) as weights:
            assert _same(weights, expert_block(0, expert), shard_file)
    cache.end_layer()
    assert (cache.misses, cache.hits, cache.late) == (3, 0, 0)  # read on demand, early: still misses
    cache.close()


class ThreadRecordingFile(ShardFile):
    """A real shard file that notes which thread read each block."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.readers: dict[str, set[str]] = {}

    def read_part(self, block: str, buffer: torch.Tensor, start: int, stop: int) -> None:
        self.readers.setdefault(block, set()).add(threading.current_thread().name)
        super().read_part(block, buffer, start, stop)


def test_cached_experts_are_computed_first_while_the_readers_read_the_misses(shard_file: ShardFile) -> None:
    file = ThreadRecordingFile(shard_file.path)
    cache = _cache(file, slots=4, readers=1)
    for expert in (0, 3):  # two of layer 0's experts cached (4 buffers: nothing evicted)
        cache.begin_layer(0, [expert])
        with cache.get(0, expert):
            pass
        cache.end_layer()
    file.readers.clear()
    before = file.bytes_read
    order = cache.begin_layer(0, [1, 2, 3])
    assert order == [3, 1, 2]  # the cached expert, then the misses in the order they were queued
    with cache._cond:  # else the compute thread, there first, would read pieces itself (it may, when no reader has)
        assert cache._cond.wait_for(lambda: all(cache._entries[(0, e)].fields is not None for e in (1, 2)), 30)
    for expert in order:
        with cache.get(0, expert) as weights:
            assert _same(weights, expert_block(0, expert), shard_file)
    cache.end_layer()
    assert file.readers == {expert_block(0, 1): {"expert-reader-0"}, expert_block(0, 2): {"expert-reader-0"}}
    assert file.bytes_read - before == 2 * file.block_bytes(expert_block(0, 1))  # each miss read once
    cache.close()


def test_an_own_read_the_layer_never_asked_for_goes_to_the_readers(shard_file: ShardFile) -> None:
    """A layer that stops between routing and its experts (an error) leaves no read that only a
    ``get`` would make: its buffer would never come back."""
    cache = _cache(shard_file, readers=1)
    cache.begin_layer(0, [2])
    cache.end_layer()
    with cache._cond:
        assert cache._cond.wait_for(lambda: cache._entries[(0, 2)].fields is not None, 30)
    with cache.get(0, 2) as weights:
        assert _same(weights, expert_block(0, 2), shard_file)
    cache.close()


def test_an_own_read_keeps_its_first_piece_for_the_compute_thread(shard_file: ShardFile,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A miss that ``get`` starts itself: the compute thread reads the first piece, the readers may
    take the others at once; a prefetch waits for both."""
    monkeypatch.setattr(expert_reads, "SPLIT_BYTES", PAGE)  # the tiny experts count as large
    cond = threading.Condition()
    queue = ReadQueue(shard_file, cond, depth=2, threads=0)
    size = shard_file.block_bytes(expert_block(0, 0))
    with cond:
        read = queue.submit(expert_block(0, 0), torch.empty(size, dtype=torch.uint8), demand=True, own=True)
        guess = queue.submit(expert_block(0, 1), torch.empty(size, dtype=torch.uint8), demand=False)
        assert read.own and len(read.todo) == 1 and queue._next() is read
        second = queue._take(read)  # a reader takes the second piece, never the reserved first
        assert second is not None and second[0] > 0 and read.own
        assert queue._next() is None  # the first piece waits for the compute thread: no prefetch yet
        assert queue._take(read, mine=True) == (0, second[0]) and not read.own
    assert guess.todo
    queue.close()


def test_prefetch_pieces_wait_while_a_demand_read_is_queued_or_in_flight(shard_file: ShardFile,
                                                                         small_pieces: None) -> None:
    cond = threading.Condition()
    queue = ReadQueue(shard_file, cond, depth=2, threads=0)
    size = shard_file.block_bytes(expert_block(0, 0))
    with cond:
        guess = queue.submit(expert_block(1, 0), torch.empty(size, dtype=torch.uint8), demand=False)
        assert queue._next() is guess  # the disk is idle: the guess may read
        demand = queue.submit(expert_block(0, 0), torch.empty(size, dtype=torch.uint8), demand=True)
        # a demand read is ``depth`` pieces read at once; a prefetch, pieces that can stop between two
        assert len(demand.todo) == 2 and len(guess.todo) == -(-size // expert_reads.PREFETCH_PIECE) > 2
        assert queue._next() is demand
        queue._take(demand)
        assert queue._next() is demand  # one piece still queued
        queue._take(demand)  # in flight, none queued
        assert queue._next() is None  # the guess still waits
    queue.close()


def test_a_cancelled_read_returns_its_buffer_only_when_its_piece_in_flight_is_done(shard_file: ShardFile,
                                                                                  small_pieces: None) -> None:
    cache = _cache(shard_file)
    _open_gate(cache)
    cache.prefetch(1, [2])
    read = cache._entries[(1, 2)].read
    assert read is not None and cache.reads is not None
    with cache._cond:
        piece = cache.reads._take(read)  # a reader is writing into the buffer
    free = len(cache._free)
    cache.begin_layer(1, [0])  # a wrong guess: cancelled; the needed expert takes a free buffer
    assert cache.cancelled == 1 and len(cache._free) == free - 1  # the guess's not yet: its piece is in flight
    assert piece is not None
    cache.reads._read_piece(read, piece)
    assert len(cache._free) == free and not read.todo
    assert shard_file.bytes_read == piece[1] - piece[0]  # the rest of the wrong guess was never read
    with cache.get(1, 0):
        pass
    cache.end_layer()
    cache.close()


def test_pieces_cover_the_block_on_page_boundaries() -> None:
    for nbytes, kw in ((10 * PAGE + 5, {"count": 2}), (3 * PREFETCH_PIECE + 1, {"size": PREFETCH_PIECE}),
                       (100, {"count": 4})):
        parts = list(pieces(nbytes, **kw))
        assert parts[0][0] == 0 and parts[-1][1] == nbytes
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
        assert all(start % PAGE == 0 for start, _ in parts)
    assert pieces(10 * PAGE, count=2) == deque([(0, 5 * PAGE), (5 * PAGE, 10 * PAGE)])


def test_pieces_cut_on_the_files_page_boundaries_where_the_block_starts_inside_a_page() -> None:
    for lead in (0, 8, PAGE - 8):
        for nbytes, kw in ((10 * PAGE + 5, {"count": 2}), (3 * PREFETCH_PIECE + 1, {"size": PREFETCH_PIECE}),
                           (100, {"count": 4}), (2 * PAGE, {"count": 1})):
            parts = list(pieces(nbytes, lead=lead, **kw))
            assert parts[0][0] == 0 and parts[-1][1] == nbytes
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            assert all((stop + lead) % PAGE == 0 for _, stop in parts[:-1])  # no page of the file in two pieces
            if "count" in kw:
                assert len(parts) <= kw["count"]


def test_direct_reads_of_every_block_and_piece_equal_buffered_ones(shard_file: ShardFile) -> None:
    """Every block of the file (the last one ends at its end: a short O_DIRECT read), cut as the
    read queue cuts it, read with O_DIRECT into a placed buffer; and into an unplaced one, where
    ``read_part`` falls back to a buffered read."""
    direct = ShardFile(shard_file.path, random_access=True, direct=True)
    if not direct.direct:
        direct.close()
        pytest.skip("no O_DIRECT on this file system")
    try:
        last = max(direct.blocks, key=lambda b: direct.blocks[b].offset)
        assert direct.blocks[last].offset + direct.blocks[last].nbytes == shard_file.path.stat().st_size
        leads = set()
        for block, entry in direct.blocks.items():
            expected = torch.empty(entry.nbytes, dtype=torch.uint8)
            shard_file.read_into(block, expected)
            leads.add(direct.lead(block))
            for count in (1, 2, 3):
                placed = direct.place(block, aligned_buffer(entry.nbytes))
                unplaced = torch.zeros(entry.nbytes + 1, dtype=torch.uint8)[1:]
                for start, stop in pieces(entry.nbytes, count=count, lead=direct.lead(block)):
                    direct.read_part(block, placed, start, stop)
                    direct.read_part(block, unplaced, start, stop)
                assert torch.equal(placed, expected) and torch.equal(unplaced, expected), (block, count)
        assert len(leads) > 1  # the blocks do start inside pages
        assert all(lead % 64 == 0 for lead in leads)  # placed tensors as aligned as fresh allocations
    finally:
        direct.close()


class BlockingFile(ShardFile):
    """Reads wait until ``release`` is set, after announcing themselves in ``reading``."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.reading, self.release = threading.Event(), threading.Event()

    def read_part(self, block: str, buffer: torch.Tensor, start: int, stop: int) -> None:
        self.reading.set()
        assert self.release.wait(30), "test hang guard"
        super().read_part(block, buffer, start, stop)


def test_a_demand_read_does_not_hold_the_cache_lock(shard_file: ShardFile) -> None:
    file = BlockingFile(shard_file.path)
    cache = _cache(file)
    _open_gate(cache)
    got: list[bool] = []

    def demand() -> None:
        with cache.get(0, 2) as weights:
            got.append(_same(weights, expert_block(0, 2), shard_file))

    reader = threading.Thread(target=demand)
    reader.start()
    try:
        assert file.reading.wait(30)
        # The demand read is in flight; another thread can still take the lock and queue a prefetch.
        acquired = cache._cond.acquire(timeout=30)
        assert acquired, "the cache lock is held during a demand read"
        cache._cond.release()
        cache.prefetch(1, [0])
        assert cache.prefetches == 1
    finally:
        file.release.set()
        reader.join(30)
        cache.close()
    assert got == [True] and cache.misses == 1


def test_a_guess_never_evicts_an_expert_needed_sooner(shard_file: ShardFile) -> None:
    """Three buffers: layer 1's expert 0 (needed next) and layer 0's experts 0 and 1 (the layer
    routing now, its experts still to compute). The guess for layer 1, made as layer 0 routes
    (as ``MoeRankModel`` makes it), finds no buffer it may take, and is not read."""
    cache = _cache(shard_file, slots=3)
    _open_gate(cache)
    cache.begin_layer(1, [0])
    with cache.get(1, 0):
        pass
    cache.end_layer()
    cache.begin_layer(0, [0, 1])
    cache.prefetch(1, [3])  # layer 0's experts are still needed; layer 1's expert is as near as the guess
    assert cache.prefetches == 0 and set(cache._entries) == {(1, 0), (0, 0), (0, 1)}
    for expert in (0, 1):
        with cache.get(0, expert):
            pass
    cache.end_layer()
    cache.close()


@pytest.mark.parametrize(("precision", "taken"), [(0.9, True), (0.6, False)])
def test_a_sure_guess_takes_on_demands_own_victim_once_the_current_layer_is_done_with_it(
        shard_file: ShardFile, precision: float, taken: bool) -> None:
    """At layer 0, a guess for layer 1 (the layer that routes next) where no buffer is free of
    cost: by distance, layer 1's own first miss would evict layer 0's expert (the farthest ahead
    once used), not layer 2's, which is used often. The guess waits while layer 0 still needs its
    expert, and takes that buffer as soon as layer 0 is done with it, where its guesses are right
    at least KEEP_PRECISION of the time: a right guess then reads what on demand reads, only
    earlier, while layer 1's attention runs. Layer 2's expert stays either way. (Taking layer 2's
    at once, as the guess was made, cost the trained tiny MoE with a 2x cache 25.2 MB per token
    against on demand's 23.1: an expert on demand keeps a whole cycle.)"""
    slot_bytes = max(shard_file.block_bytes(expert_block(layer, e)) for layer in range(2) for e in range(4))
    cache = ExpertCache(shard_file, 3, 4, 2, slot_bytes, readers=0)
    _open_gate(cache)
    cache.begin_layer(0, [0])
    assert cache.kept[0] == 0.0  # layer 0 found none of its experts cached
    cache._entries[(2, 1)] = Entry((2, 1), cache._free.pop(), {}, fetched=False)
    cache.rate[(2, 1)] = 0.9
    _record(cache.gate, 1, precision)
    cache.prefetch(1, [3])
    assert cache.prefetches == 0 and set(cache._entries) == {(0, 0), (2, 1)}  # layer 0's expert is still needed
    with cache.get(0, 0):
        assert cache.prefetches == 0  # in use
    assert (cache.prefetches == 1) == taken
    assert set(cache._entries) == ({(1, 3), (2, 1)} if taken else {(0, 0), (2, 1)})
    cache.end_layer()
    cache.close()


def test_a_sure_guess_leaves_on_demands_victim_where_that_layer_usually_finds_its_experts_cached(
        shard_file: ShardFile) -> None:
    """As above, 90% sure, but layer 0 finds 60% of its experts cached when it comes: the 10% of
    wrong guesses would each cost a read 60% of the time (6% of an expert per guess, over
    WRONG_GUESS_COST), so the guess waits for a free buffer instead."""
    slot_bytes = max(shard_file.block_bytes(expert_block(layer, e)) for layer in range(2) for e in range(4))
    cache = ExpertCache(shard_file, 3, 4, 2, slot_bytes, readers=0)
    _open_gate(cache)
    cache.begin_layer(0, [0])
    cache.kept[0] = 0.6
    cache._entries[(2, 1)] = Entry((2, 1), cache._free.pop(), {}, fetched=False)
    _record(cache.gate, 1, 0.9)
    cache.prefetch(1, [3])
    with cache.get(0, 0):
        pass
    assert cache.prefetches == 0 and set(cache._entries) == {(0, 0), (2, 1)}
    cache.end_layer()
    cache.close()


def test_a_wrong_guess_cancelled_before_it_read_a_byte_gives_its_victim_back(shard_file: ShardFile) -> None:
    """Two buffers: layer 1's expert 2, cached, and layer 0's expert 0. The guess for layer 1
    takes layer 0's expert's buffer once layer 0 is done with it, but no reader starts it (none
    here; on a busy disk, demand reads go first) before layer 1 routes, to expert 2 alone.
    Cancelled unread, the buffer still holds layer 0's expert: it is cached again, with its own
    bytes, and its next use is a hit, not a read."""
    slot_bytes = max(shard_file.block_bytes(expert_block(layer, e)) for layer in range(2) for e in range(4))
    cache = ExpertCache(shard_file, 2, 4, 2, slot_bytes, readers=0)
    _open_gate(cache)
    buffer = cache._free.pop()
    fields = shard_file.read_into(expert_block(1, 2), cache.buffers[buffer])
    cache._entries[(1, 2)] = Entry((1, 2), buffer, fields, fetched=False)
    _record(cache.gate, 1, 0.9)
    cache.begin_layer(0, [0])
    cache.prefetch(1, [3])
    with cache.get(0, 0):
        pass
    cache.end_layer()
    assert cache.prefetches == 1 and set(cache._entries) == {(1, 2), (1, 3)}  # (0, 0) went for the guess
    read_before = shard_file.bytes_read
    cache.begin_layer(1, [2])  # the guess was wrong: cancelled, unread
    assert cache.cancelled == 1 and cache.undone == 1 and set(cache._entries) == {(1, 2), (0, 0)}
    with cache.get(1, 2):
        pass
    cache.end_layer()
    cache.begin_layer(0, [0])
    with cache.get(0, 0) as weights:
        assert _same(weights, expert_block(0, 0), shard_file)
    cache.end_layer()
    assert shard_file.bytes_read == read_before + shard_file.block_bytes(expert_block(0, 0))  # only _same's check
    assert (cache.hits, cache.misses) == (2, 1)
    cache.close()


def test_an_unsure_guess_evicts_nothing_not_even_a_rarely_used_expert(shard_file: ShardFile) -> None:
    """Three layers (the file's two, and a third whose one cached expert is placed by hand): at
    layer 0, a guess for layer 1, right 60% of the time, finds no free buffer. Layer 2's expert is
    needed later and rarely used (routed 5% of the time), but the guess leaves it: an expert a
    guess evicts is read again whenever it is used again, and with a quarter of the random MoE's
    experts cached, guesses allowed to take rarely used experts made prefetch need 51.7 MB per
    token against on demand's 46.8 (session 29). A sure guess waits for on demand's own victim
    instead (the test above)."""
    slot_bytes = max(shard_file.block_bytes(expert_block(layer, e)) for layer in range(2) for e in range(4))
    cache = ExpertCache(shard_file, 3, 4, 1, slot_bytes, readers=0)
    _open_gate(cache)
    cache._entries[(2, 1)] = Entry((2, 1), cache._free.pop(), {}, fetched=False)
    cache.rate[(2, 1)] = 0.05
    _record(cache.gate, 1, 0.6)  # under KEEP_PRECISION
    cache.prefetch(1, [3])
    assert cache.prefetches == 0 and set(cache._entries) == {(2, 1)}
    cache.close()


def test_frequency_policy_evicts_the_least_used_then_the_farthest_ahead() -> None:
    entries = [Entry((0, 1), 0, {}), Entry((1, 2), 1, {}), Entry((2, 3), 2, {})]
    victim = choose_victim(entries, 0, 3, "frequency", {(0, 1): 0.05, (1, 2): 0.1, (2, 3): 0.2})
    assert victim is not None and victim.key == (0, 1)  # the least used, though it is this layer's
    victim = choose_victim(entries, 0, 3, "frequency", {(0, 1): 0.5, (1, 2): 0.1, (2, 3): 0.1})
    assert victim is not None and victim.key == (2, 3)  # a tie: layer 2 is used after layer 1


@pytest.mark.parametrize(("precision", "available", "expected"), [
    (None, 0.010, [5, 6]),  # no record: the prior lets it try, two reads fit in the lead
    (0.9, 0.030, [5, 6, 7]),  # room for all three
    (0.9, 0.004, [5]),  # less than one read's time: the likeliest only
    (0.9, 0.0, []),  # demand reads fill the lead: the I/O queue is the bottleneck
    (0.9, -0.5, []),
    (0.1, 0.002, []),  # 0.1 * 2 ms < 0.9 * 1 ms: a wrong guess costs more than a right one saves
    (0.3, 0.010, [5, 6]),  # 0.3 * 5 ms > 0.7 * 1 ms
])
def test_prefetch_gate(precision: float | None, available: float, expected: list[int]) -> None:
    gate = PrefetchGate()
    _won(gate, 3)
    if precision is not None:
        gate.precision[3] = precision
    assert gate.plan(3, [5, 6, 7], available, expert_s=0.005, piece_s=0.001) == expected
    assert gate.skipped == 3 - len(expected)


def test_prefetch_gate_measures_precision_and_lead() -> None:
    gate = PrefetchGate()
    gate.observe_prediction(1, guessed=2, right=2)
    gate.observe_prediction(1, guessed=2, right=0)
    assert gate.precision[1] == pytest.approx(0.8)  # an exponential average: the past weighs 0.8
    assert gate.available(1, elapsed=0.0, backlog_s=0.0, expert_s=0.004) == 0.004  # no lead measured yet
    gate.observe_lead(1, 0.010)
    assert gate.available(1, elapsed=0.002, backlog_s=0.003, expert_s=0.004) == pytest.approx(0.005)


def test_sure_needs_a_long_record_and_is_not_fooled_by_a_lucky_stretch() -> None:
    """``sure`` decides which guesses may cost an eviction. One perfect step proves nothing; a
    layer right 60% of the time (the random MoE's) stays under KEEP_PRECISION through a lucky
    stretch that lifts the 5-step ``precision`` over it; one right 90% of the time passes."""
    gate = PrefetchGate()
    assert gate.sure(1) < KEEP_PRECISION  # no record
    for observe in (gate.observe_prediction, gate.observe_uncached):
        observe(1, 2, 2)
    assert gate.precision[1] == 1.0 and gate.sure(1) < KEEP_PRECISION
    for right in [2, 1, 1, 2, 0] * 8 + [2, 2, 2]:  # 60%, then three steps right
        for observe in (gate.observe_prediction, gate.observe_uncached):
            observe(2, 2, right)
    assert gate.precision[2] >= KEEP_PRECISION > gate.sure(2)
    for right in [2, 2, 2, 2, 1] * 8:  # 90%
        gate.observe_uncached(3, 2, right)
    assert gate.sure(3) >= KEEP_PRECISION
    gate.observe_prediction(4, 2, 2)  # right about cached experts: no record of the guesses that cost
    assert gate.sure(4) < KEEP_PRECISION


def test_sure_counts_only_the_guesses_of_experts_not_cached(shard_file: ShardFile) -> None:
    """A guess of an expert already cached costs nothing; ``sure`` is the record of those that do."""
    cache = _cache(shard_file)
    cache._entries[(1, 0)] = Entry((1, 0), cache._free.pop(), {}, fetched=False)
    cache.prefetch(1, [0, 3])
    cache.record_prediction(1, {0, 3}, {0, 2})
    assert cache.gate.precision[1] == 0.5  # both guesses
    assert (cache.gate.guessed[1], cache.gate.right[1]) == (1.0, 0.0)  # expert 3 only, wrong
    cache.close()


def test_the_gate_keeps_a_layer_with_wrong_guesses_from_reading_ahead(shard_file: ShardFile) -> None:
    cache = _cache(shard_file)
    assert cache.reads is not None
    cache.reads.seconds_per_byte = 1e-9  # as measured by demand reads
    _won(cache.gate, 1)
    for _ in range(10):
        cache.record_prediction(1, {0, 1}, {2, 3})
    cache.prefetch(1, [0, 1])
    assert cache.prefetches == 0 and cache.gate.skipped == 2
    for _ in range(10):
        cache.record_prediction(1, {0, 1}, {0, 1})
    cache.prefetch(1, [0, 1])  # right again: read ahead again
    assert cache.prefetches >= 1
    cache.close()


@pytest.mark.parametrize("gate_open", [True, False])
def test_a_cached_expert_predicted_for_the_next_layer_outlives_this_layers_misses(shard_file: ShardFile,
                                                                                   gate_open: bool) -> None:
    """Two MoE layers: the next layer is also the one just used, so the distance policy evicts
    its experts first. One predicted for it, cached already, used to be evicted by the current
    layer's misses right after the prediction (hit rate 0.15-0.48 against recall 0.80). Only on a
    layer the gate lets use its guesses: a closed one evicts as on demand."""
    cache = _cache(shard_file, slots=3)
    for expert in (2, 0, 1):  # layer 1's experts fill the cache; expert 2 is the least recent
        cache.begin_layer(1, [expert])
        with cache.get(1, expert):
            pass
        cache.end_layer()
    _record(cache.gate, 1, 0.9)  # a layer whose guesses are usually right
    cache.gate.open[1] = gate_open
    cache.keep(1, [2])  # the predictor expects layer 1 to use expert 2 again: cached, nothing to read
    cache.begin_layer(0, [0, 1])
    cache.prefetch(1, [2])
    for expert in (0, 1):  # two misses: two of layer 1's experts must go
        with cache.get(0, expert):
            pass
    cache.end_layer()
    assert ((1, 2) in cache._entries) == gate_open
    cache.begin_layer(1, [2])
    with cache.get(1, 2):
        pass
    cache.end_layer()
    assert (cache.hits, cache.misses) == ((1, 5) if gate_open else (0, 6))
    cache.close()


def test_an_unsure_guess_does_not_keep_a_cached_expert(shard_file: ShardFile) -> None:
    """Where the layer's guesses are right only half of the time, the policy's own victim choice
    stands: the predicted expert is the least recent and goes first."""
    cache = _cache(shard_file, slots=3)
    for expert in (2, 0, 1):
        cache.begin_layer(1, [expert])
        with cache.get(1, expert):
            pass
        cache.end_layer()
    _record(cache.gate, 1, 0.5)
    cache.keep(1, [2])
    cache.begin_layer(0, [0, 1])
    for expert in (0, 1):
        with cache.get(0, expert):
            pass
    cache.end_layer()
    assert (1, 2) not in cache._entries
    cache.close()


def _gate_step(gate: PrefetchGate, layer: int, seconds_if_read_ahead: float, seconds_if_not: float) -> bool:
    """One step of ``layer``: the gate's plan, then the span it took by the plan's kind."""
    read_ahead = bool(gate.plan(layer, [1, 2], available=0.01, expert_s=0.005, piece_s=0.001))
    gate.observe_span(layer, seconds_if_read_ahead if read_ahead else seconds_if_not)
    return read_ahead


def test_the_gate_starts_closed_and_keeps_closed_a_layer_where_reading_ahead_measures_slower() -> None:
    """Every model-based test passes (no record, lead time left); only the measured spans differ."""
    gate = PrefetchGate()
    steps = [_gate_step(gate, 2, 0.010, 0.005) for _ in range(8 * REPROBE_EVERY)]
    # closed until MIN_SPANS steps without reading ahead are measured, then MIN_SPANS probes with
    assert steps[:2 * MIN_SPANS] == [False] * MIN_SPANS + [True] * MIN_SPANS
    # reading ahead, slower, is off but for one re-probe in REPROBE_EVERY
    assert gate.losing(2) and not gate.winning(2)
    assert sum(steps[-4 * REPROBE_EVERY:]) == 4
    # now reading ahead pays: the re-probes see it (their average forgets the slow past in ~5 probes)
    steps = [_gate_step(gate, 2, 0.002, 0.005) for _ in range(8 * REPROBE_EVERY)]
    assert gate.winning(2) and sum(steps[-32:]) == 32 - 32 // PROBE_EVERY


def test_the_gate_opens_a_layer_where_reading_ahead_measures_faster() -> None:
    gate = PrefetchGate()
    steps = [_gate_step(gate, 2, 0.004, 0.005) for _ in range(64)]
    assert gate.winning(2) and steps[:MIN_SPANS] == [False] * MIN_SPANS
    assert sum(steps[-32:]) == 32 - 32 // PROBE_EVERY  # off only for the probes that measure the other side


def test_the_gate_keeps_closed_a_layer_where_reading_ahead_is_no_faster_than_the_margin() -> None:
    gate = PrefetchGate()
    steps = [_gate_step(gate, 2, 0.00499, 0.005) for _ in range(64)]
    assert not gate.winning(2) and sum(steps[-REPROBE_EVERY:]) == 1


def test_the_cache_scores_each_layer_span_by_whether_it_read_ahead(shard_file: ShardFile) -> None:
    cache = _cache(shard_file)
    assert cache.reads is not None
    cache.reads.seconds_per_byte = 1e-9  # as measured by demand reads: a read lands in the lead
    cache.gate.spans[(1, False)] = MIN_SPANS  # steps without reading ahead measured: the next ones probe
    for precision, read_ahead in ((0.9, True), (0.01, False)):
        _record(cache.gate, 1, precision)
        cache.prefetch(1, [0])
        cache.begin_layer(1, [0])
        with cache.get(1, 0):
            pass
        cache.end_layer()
        assert cache.gate.spans.get((1, read_ahead)) == (1 if read_ahead else MIN_SPANS + 1)
        cache._entries.clear()
        cache._free = list(range(len(cache.buffers)))
    assert cache.stats()["expert_prefetch_layers_open"] == 0
    cache.close()


def _drive(cache: ExpertCache, steps: int, guess_wrong: bool | None) -> None:
    """``steps`` decode steps of two MoE layers (top-2 of 4 experts), driven as ``MoeRankModel``
    drives the cache; ``guess_wrong``: each layer's guess for the next is the two experts it will
    not use (None: on demand, no guesses)."""
    predicted: dict[int, set[int]] = {}
    for step in range(steps):
        for layer in (0, 1):
            needed = sorted({(step + 2 * layer) % 4, (step + 2 * layer + 1) % 4})
            following = 1 - layer
            if guess_wrong is not None:
                if layer in predicted:
                    cache.record_prediction(layer, predicted.pop(layer), set(needed))
                nxt = step + (layer == 1)  # the following layer's step
                will_use = {(nxt + 2 * following) % 4, (nxt + 2 * following + 1) % 4}
                predicted[following] = set(range(4)) - will_use
                cache.keep(following, predicted[following])
            order = cache.begin_layer(layer, needed)
            if guess_wrong is not None:
                cache.prefetch(following, sorted(predicted[following]))
            for expert in order:
                with cache.get(layer, expert):
                    pass
            cache.end_layer()


def test_a_predictor_always_wrong_reads_nothing_ahead_and_no_more_bytes_than_on_demand(
        shard_file: ShardFile) -> None:
    """The gate starts closed and scores the predictor meanwhile: guesses that are never right are
    never read, on any layer, and the cache reads what on-demand reads, byte for byte."""
    files = [ShardFile(shard_file.path, random_access=True) for _ in range(2)]
    caches = [_cache(file, slots=3, readers=2) for file in files]
    try:
        _drive(caches[0], 48, guess_wrong=True)
        _drive(caches[1], 48, guess_wrong=None)
        guessing, on_demand = caches
        assert guessing.predicted > 0 and guessing.predicted_used == 0  # it did guess, always wrong
        assert guessing.prefetches == 0 and guessing.gate.skipped > 0  # the gate let no guess read
        assert guessing.reads is not None and guessing.reads.prefetch_bytes_read == 0
        assert not any(guessing.gate.open.values()) and set(guessing.gate.open) == {0, 1}
        assert files[0].bytes_read == files[1].bytes_read > 0
        assert guessing.misses == on_demand.misses
    finally:
        for cache in caches:
            cache.close()


def test_adaptive_routes_a_layers_input_for_its_record_only_once_the_layer_routed() -> None:
    """At a layer's start the disk idles until its router names the misses: the input guess that
    is not read ahead (only scored) is routed later, in ``observe``, and scored the same."""
    predictor = _predictor("adaptive")
    routed: list[int] = []
    route = predictor._route

    def counting(layer: int, hidden: torch.Tensor) -> set[int]:
        routed.append(layer)
        return route(layer, hidden)

    predictor._route = counting  # type: ignore[method-assign]
    predictor.predict(1, HIDDEN)
    routed.clear()
    assert predictor.predict_at_input(1, LATER_HIDDEN) == set()
    assert routed == []  # nothing routed at the layer's start
    predictor.observe(1, {0, 1})
    assert routed == [1]
    assert predictor.record[1]["input"] == [2, 2]  # scored as if routed at the start
