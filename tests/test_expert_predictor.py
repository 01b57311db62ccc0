"""The expert predictors' choices, and the expert cache's handling of speculative prefetches:
read-ahead hints to the kernel that take no buffer and are dropped when wrong; buffered
prefetches cancelled when the layer turns out not to need them and read at once by the compute
thread when needed but still queued; demand reads that leave the cache's lock free."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.config import ModelConfig
from worker.expert_cache import ExpertCache
from worker.models.moe import Predictor
from worker.shard_file import ShardFile
from worker.shard_writer import write_shards
from worker.sharding import plan_shards
from worker.weights import expert_block, rank_shard_path

# Layer 1's router sends a hidden state with a positive first feature to experts 2 and 3.
ROUTER = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # (E=4, d=2)
HIDDEN = torch.tensor([[1.0, 0.5]])  # (T=1, d=2)


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


class HeldIo:
    """An I/O thread that runs nothing until told: prefetches stay queued (cancellable)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Future, Callable[[], Any]]] = []

    def submit(self, priority: int, job: Callable[[], Any]) -> Future:
        future: Future = Future()
        self.jobs.append((future, job))
        return future

    def run_all(self) -> None:
        for future, job in self.jobs:
            if future.set_running_or_notify_cancel():
                future.set_result(job())
        self.jobs = []


@pytest.fixture
def shard_file(checkpoints, tmp_path: Path):
    model_dir = checkpoints("mixtral")  # 2 layers, 4 experts
    config = ModelConfig.from_dir(model_dir)
    shards = plan_shards(config, [1.0])
    shard_dir = write_shards(model_dir, shards, tmp_path / "shards", progress=False)
    file = ShardFile(rank_shard_path(shard_dir, shards[0]))
    yield file
    file.close()


def _cache(file: ShardFile, io: Any, prefetch_to: str = "buffers", slots: int = 4) -> ExpertCache:
    slot_bytes = max(file.block_bytes(expert_block(layer, e)) for layer in range(2) for e in range(4))
    return ExpertCache(file, 2, 4, slots, slot_bytes, io, prefetch_to=prefetch_to)


def _same(got: Any, block: str, file: ShardFile) -> bool:
    want = file.read(block)
    return torch.equal(got.w_gate_up, want["w_gate_up"]) and torch.equal(got.w_down, want["w_down"])


def test_unneeded_queued_prefetches_are_cancelled_and_their_buffers_reused(shard_file: ShardFile) -> None:
    io = HeldIo()
    cache = _cache(shard_file, io)
    cache.prefetch(1, [0, 1, 2])
    assert cache.prefetches == 3 and len(cache._free) == 1
    cache.begin_layer(1, [1])  # the router asks for expert 1 only
    assert cache.cancelled == 2 and len(cache._free) == 3
    with cache.get(1, 1) as weights:  # still queued: read by the caller, not waited for
        assert _same(weights, expert_block(1, 1), shard_file)
    cache.end_layer()
    io.run_all()  # the cancelled jobs and the taken-over one do nothing
    assert cache.late == 1 and cache.misses == 0
    assert set(cache._entries) == {(1, 1)}
    assert cache.stats()["expert_cancelled_prefetches"] == 2


def test_started_prefetches_are_not_cancelled(shard_file: ShardFile) -> None:
    io = HeldIo()
    cache = _cache(shard_file, io)
    cache.prefetch(0, [0, 3])
    io.run_all()
    cache.begin_layer(0, [0])
    assert cache.cancelled == 0
    with cache.get(0, 0) as weights:
        assert _same(weights, expert_block(0, 0), shard_file)
    cache.end_layer()
    assert cache.hits == 1 and (0, 3) in cache._entries


class BlockingFile(ShardFile):
    """Reads wait until ``release`` is set, after announcing themselves in ``reading``."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.reading, self.release = threading.Event(), threading.Event()

    def read_into(self, block: str, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        self.reading.set()
        assert self.release.wait(30), "test hang guard"
        return super().read_into(block, buffer)


def test_a_demand_read_does_not_hold_the_cache_lock(shard_file: ShardFile) -> None:
    file = BlockingFile(shard_file.path)
    io = HeldIo()
    cache = _cache(file, io)
    got: list[bool] = []

    def demand() -> None:
        cache.begin_layer(0, [2])
        with cache.get(0, 2) as weights:
            got.append(_same(weights, expert_block(0, 2), shard_file))

    reader = threading.Thread(target=demand)
    reader.start()
    try:
        assert file.reading.wait(30)
        # The demand read is in flight; the I/O side can still take the lock and queue a prefetch.
        acquired = cache._cond.acquire(timeout=30)
        assert acquired, "the cache lock is held during a demand read"
        cache._cond.release()
        cache.prefetch(1, [0])
        assert cache.prefetches == 1
    finally:
        file.release.set()
        reader.join(30)
        file.close()
    assert got == [True] and cache.misses == 1


def test_page_cache_prefetch_takes_no_buffer_and_forgets_wrong_guesses(shard_file: ShardFile) -> None:
    io = HeldIo()
    cache = _cache(shard_file, io, prefetch_to="page_cache")
    cache.prefetch(1, [0, 1])  # two hints for the I/O thread, no buffer
    assert len(io.jobs) == 2 and len(cache._free) == 4 and set(cache._hinted) == {(1, 0), (1, 1)}
    assert cache.stats()["expert_prefetch_bytes"] == 2 * shard_file.block_bytes(expert_block(1, 0))
    cache.prefetch(1, [1])  # asked already: not again
    assert cache.prefetches == 2 and len(io.jobs) == 2
    cache.begin_layer(1, [1, 3])
    assert set(cache._hinted) == {(1, 1)} and cache.cancelled == 1  # expert 0's read-ahead is dropped
    assert io.jobs[0][0].cancelled()  # before the I/O thread got to it
    for expert in (1, 3):
        with cache.get(1, expert) as weights:
            assert _same(weights, expert_block(1, expert), shard_file)
    cache.end_layer()
    assert (cache.late, cache.misses, cache.hits) == (1, 1, 0)  # 1 was read ahead, 3 was not
    assert cache._hinted == {}


class AdviceLog(ShardFile):
    """Records every ``posix_fadvise`` hint, and still gives it."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.advice: list[tuple[str, int]] = []

    def advise(self, block: str, advice: int) -> None:
        self.advice.append((block, advice))
        super().advise(block, advice)


def test_a_layers_misses_are_read_ahead_together(shard_file: ShardFile) -> None:
    file = AdviceLog(shard_file.path)
    io = HeldIo()
    cache = _cache(file, io)
    try:
        cache.begin_layer(0, [1])  # one miss: nothing to overlap it with, no hint
        with cache.get(0, 1):
            pass
        cache.end_layer()
        assert file.advice == []
        cache.begin_layer(0, [0, 1, 2])  # (0, 1) is cached, (0, 0) is read first: (0, 2) is read ahead
        assert file.advice == [] and len(io.jobs) == 1  # by the I/O thread, not by the caller
        io.run_all()
        assert file.advice == [(expert_block(0, 2), os.POSIX_FADV_WILLNEED)]
        for expert in (0, 1, 2):
            with cache.get(0, expert) as weights:
                assert _same(weights, expert_block(0, expert), shard_file)
        cache.end_layer()
        assert (cache.misses, cache.hits, cache.late) == (3, 1, 0)  # read ahead on demand: still misses
        file.advice.clear()
        cache.begin_layer(1, [0, 1])  # the I/O thread falls behind: (1, 1) is read before its hint runs
        for expert in (0, 1):
            with cache.get(1, expert):
                pass
        cache.end_layer()
        io.run_all()
        assert file.advice == []  # the late hint was cancelled, not given after the read
    finally:
        file.close()


def test_unknown_prefetch_target_is_refused(shard_file: ShardFile) -> None:
    with pytest.raises(ValueError, match="unknown prefetch target"):
        _cache(shard_file, HeldIo(), prefetch_to="gpu")


def test_a_cached_expert_predicted_for_the_next_layer_outlives_this_layers_misses(shard_file: ShardFile) -> None:
    """Two MoE layers: the next layer is also the one just used, so the distance policy evicts
    its experts first. One predicted for it, cached already, used to be evicted by the current
    layer's misses right after the prediction (hit rate 0.15-0.48 against recall 0.80)."""
    cache = _cache(shard_file, HeldIo(), prefetch_to="page_cache", slots=3)
    for expert in (2, 0, 1):  # layer 1's experts fill the cache; expert 2 is the least recent
        cache.begin_layer(1, [expert])
        with cache.get(1, expert):
            pass
        cache.end_layer()
    cache.begin_layer(0, [0, 1])
    cache.prefetch(1, [2])  # the predictor expects layer 1 to use expert 2 again: cached, nothing to read
    for expert in (0, 1):  # two misses: two of layer 1's experts must go
        with cache.get(0, expert):
            pass
    cache.end_layer()
    assert (1, 2) in cache._entries
    cache.begin_layer(1, [2])
    with cache.get(1, 2):
        pass
    cache.end_layer()
    assert cache.hits == 1 and cache.misses == 5
