"""Rank 0 and the hub: turns token ids of a batch into next-token logits across the cluster.

The embedding stays here (one copy, on the coordinator); every rank, this one included, runs
its shard of the decoder layers between two allreduces, then the final norm and its rows of the
LM head (``worker.rank.head``); the hub gathers the logits.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from worker.comm.collective import StarHub
from worker.memory.kv_cache import KVCache
from worker.models import native_step
from worker.rank.head import logit_rows
from worker.rank.loader import load_rank
from worker.rank.runtime import RankSpec, spans_to_tensor
from worker.rank.step import SeqSpan, StepPlan
from worker.shards.weights import HubWeights, load_hub

log = logging.getLogger(__name__)


class Executor:
    """Runs forward steps over the whole cluster; used by one engine thread at a time."""

    def __init__(self, spec: RankSpec, hub: StarHub, hub_weights: HubWeights | None = None):
        self.spec = spec
        self.config = spec.config
        self.hub = hub
        self.weights = hub_weights or load_hub(spec.model_dir, spec.dtype)
        self.allreduce_seconds: list[float] = []  # hub time of each allreduce in the last step
        # Rank 0's shard goes through the same weight store / expert cache as a worker's.
        v0, v1 = spec.shard.vocab_rows
        tied = self.weights.embed[v0:v1] if spec.config.tie_word_embeddings else None  # (V_0, d) views
        self.rank = load_rank(spec, self._timed_allreduce, tied_rows=tied)
        self.model = self.rank.model
        native_step.attach(self.model, hub, "rank 0", self.allreduce_seconds.extend)
        self.kv: KVCache = self.model.kv
        self.steps = 0
        self.tokens = 0

    def _timed_allreduce(self, partial: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        total = self.hub.allreduce_(partial)
        self.allreduce_seconds.append(time.perf_counter() - start)
        return total

    @torch.inference_mode()
    def step(self, tokens: list[list[int]], spans: list[SeqSpan], all_logits: bool = False) -> torch.Tensor:
        """Feed each span its new ``tokens``; returns logits (S, V) for each span's last token,
        or (T, V) for every token when ``all_logits``."""
        self.allreduce_seconds.clear()
        ids = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)  # (T,)
        hidden = F.embedding(ids, self.weights.embed)  # (T, d)
        self.hub.start_step(spans_to_tensor(spans), hidden, all_logits)
        hidden = self.model.forward(hidden, StepPlan.build(spans, self.config.sliding_window))
        self.steps += 1
        self.tokens += int(ids.shape[0])
        return self._logits(logit_rows(hidden, spans, all_logits))  # (S or T, V)

    # --- after the last layer: the vocab-parallel LM head -------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, d) final hidden states -> (R, V): this rank's head rows, then every worker's (each
        projected the same rows onto its own: ``WorkerRank``), gathered in rank order."""
        return self.hub.gather_logits(self.rank.head.logits(hidden), self.config.vocab_size)  # (R, V)

    def stats(self) -> dict[str, float]:
        """Rank 0's numbers, the same keys as a worker's ``Stats`` reply (see ``rank_stats``)."""
        from worker.rank.service import process_memory

        return process_memory() | self.rank.stats() | {"steps": self.steps, "tokens": self.tokens}

    def close(self) -> None:
        self.hub.stop()
        self.hub.close()
        self.rank.close()
