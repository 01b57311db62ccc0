"""An in-process cluster: the real hub and real worker ranks on loopback ZeroMQ, in threads.

Used where a test sweeps many rank counts (process start-up would dominate); the
multi-process path is covered by the cluster tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from worker.comm.collective import StarHub
from worker.config import ModelConfig
from worker.rank.executor import Executor
from worker.rank.runtime import RankSpec, WorkerRank
from worker.shards.sharding import plan_shards


@contextmanager
def inprocess_cluster(model_dir: Path, weights: list[float], max_batch: int = 4, max_context: int = 128,
                      dtype: torch.dtype = torch.float32, token: str = "test",
                      **spec_options: object) -> Iterator[Executor]:
    """``spec_options`` go to every rank's ``RankSpec`` (memory_budget, expert_cache_bytes, ...)."""
    config = ModelConfig.from_dir(model_dir)
    shards = plan_shards(config, weights)
    specs = [RankSpec(str(model_dir), config, s, max_batch, max_context, dtype, **spec_options)  # type: ignore[arg-type]
             for s in shards]
    hub = StarHub(len(shards), token=token, timeout_s=120)
    workers = [WorkerRank(spec, hub.address, token) for spec in specs[1:]]
    executor = None
    try:
        executor = Executor(specs[0], hub)
        starters = [threading.Thread(target=w.start) for w in workers]
        for t in starters:
            t.start()
        hub.wait_for_ranks(120)
        for t in starters:
            t.join()
        yield executor
    finally:
        if executor is not None:
            executor.close()
        else:
            hub.close()
        for w in workers:
            w.stop()
