"""bench/paced_disk.py: the benches' paced disk serves bytes at its speed, one piece after
another for every thread, banks no idle time, and leaves the bytes read as they are."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import paced_disk  # noqa: E402

from worker.config import ModelConfig  # noqa: E402
from worker.shards.shard_file import ShardFile, aligned_buffer  # noqa: E402
from worker.shards.shard_writer import write_shards  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402
from worker.shards.weights import expert_block, rank_shard_path  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bookings_queue_behind_each_other_and_idle_time_is_not_banked() -> None:
    clock = FakeClock()
    disk = paced_disk.PacedDisk(100, clock)  # 100 MB/s: 1 MB takes 10 ms
    assert disk.book(1_000_000) == pytest.approx(100.010)
    assert disk.book(2_000_000) == pytest.approx(100.030)  # behind the first, whoever books it
    clock.now = 101.0  # the disk idle for almost a second
    # starts now: the idle second gives no credit (the kernel's throttle gives a 100 ms slice's)
    assert disk.book(1_000_000) == pytest.approx(101.010)


def test_a_speed_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        paced_disk.PacedDisk(0)


def test_paced_reads_read_the_same_bytes_and_take_at_least_the_disks_time(checkpoints, tmp_path: Path) -> None:
    model_dir = checkpoints("mixtral")
    config = ModelConfig.from_dir(model_dir)
    shards = plan_shards(config, [1.0])
    path = rank_shard_path(write_shards(model_dir, shards, tmp_path / "shards", progress=False), shards[0])
    blocks = [expert_block(m, e) for m in range(config.num_layers) for e in range(config.num_experts)]

    class Paced(ShardFile):  # pacing patches this class only, not the ShardFile of the other tests
        pass

    def read_all(cls: type[ShardFile]) -> list[torch.Tensor]:
        file = cls(path, random_access=True)
        try:
            out = []
            for block in blocks:
                buffer = aligned_buffer(file.block_bytes(block))
                raw = file.place(block, buffer)
                file.read_part(block, raw, 0, file.block_bytes(block))
                out.append(raw[: file.block_bytes(block)].clone())
            return out
        finally:
            file.close()

    nbytes = sum(ShardFile(path).block_bytes(b) for b in blocks)
    mb_per_s = nbytes / 0.5 / 1e6  # the whole read takes half a second on the paced disk
    paced_disk.pace_reads(Paced, mb_per_s)
    with pytest.raises(RuntimeError, match="paced already"):
        paced_disk.pace_reads(Paced, mb_per_s)
    plain = read_all(ShardFile)
    start = time.perf_counter()
    paced = read_all(Paced)
    # a floor the pacing sets, not a speed measured: a slower machine only adds to it
    assert time.perf_counter() - start >= 0.5
    assert all(torch.equal(a, b) for a, b in zip(plain, paced, strict=True))


def test_threads_share_one_disk() -> None:
    """Two readers at once get half the speed each: the paced disk serves one piece at a time.
    (A clock that stands still: with the real one, a thread started late on a loaded machine
    found the disk already free.)"""
    disk = paced_disk.PacedDisk(10, FakeClock())  # 10 MB/s
    done: list[float] = []
    threads = [threading.Thread(target=lambda: done.append(disk.book(1_000_000))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert abs(done[0] - done[1]) == pytest.approx(0.1, abs=1e-3)
