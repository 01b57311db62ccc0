"""Prometheus metrics of the coordinator, all prefixed ``edgellm_``.

One registry per server (not the global one), so tests can run several servers in a process.
The engine thread records request and step metrics; cluster-wide figures (workers up, per-rank
stats) are read at scrape time through a callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Per-rank figures polled from the cluster at scrape time: {rank: {name: value}}.
RankStats = Callable[[], dict[int, dict[str, float]]]
# Expert-cache figures that are not counts or sizes: no cluster sum (the per-rank series stay)
EXPERT_RATIOS = frozenset({"expert_hit_rate", "expert_prediction_recall", "expert_prediction_precision"})


class _RankCollector(Collector):
    def __init__(self, poll: RankStats):
        self._poll = poll

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            stats = self._poll()
        except Exception:  # a scrape must not fail because a worker is down
            stats = {}
        families: dict[str, GaugeMetricFamily] = {}
        for rank, values in sorted(stats.items()):
            for name, value in values.items():
                family = families.setdefault(name, GaugeMetricFamily(
                    f"edgellm_rank_{name}", f"per-rank {name.replace('_', ' ')}", labels=["rank"]))
                family.add_metric([str(rank)], float(value))
        yield from families.values()
        yield from _expert_sums(stats)


def _expert_sums(stats: dict[int, dict[str, float]]) -> Iterable[GaugeMetricFamily]:
    """``edgellm_expert_*``: the expert caches' counters summed over ranks. Every rank streams its
    own columns of every expert, so the cluster's bytes read and reads waited for are the sum."""
    sums: dict[str, float] = {}
    for values in stats.values():
        for name, value in values.items():
            if name.startswith("expert_") and name not in EXPERT_RATIOS:
                sums[name] = sums.get(name, 0.0) + float(value)
    for name, total in sorted(sums.items()):
        family = GaugeMetricFamily(f"edgellm_{name}", f"{name.replace('_', ' ')}, summed over ranks")
        family.add_metric([], total)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgellm_requests", "finished sequences (one per choice of a request) by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("edgellm_requests_rejected", "requests refused at admission", ["reason"],
                                registry=r)
        self.ttft = Histogram("edgellm_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("edgellm_inter_token_latency_seconds", "time between two tokens of a request",
                             buckets=STEP_BUCKETS + (10.0,), registry=r)
        self.e2e = Histogram("edgellm_e2e_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("edgellm_queue_time_seconds", "arrival to admission into the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("edgellm_requests_running", "sequences in the running batch", registry=r)
        self.waiting = Gauge("edgellm_requests_waiting", "sequences queued for a slot", registry=r)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("edgellm_generation_tokens", "tokens generated", registry=r)
        self.step_time = Histogram("edgellm_step_seconds", "one forward step over the cluster (rank 0's view)",
                                   buckets=STEP_BUCKETS, registry=r)
        self.step_tokens = Histogram("edgellm_step_tokens", "tokens in one step",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.allreduce_time = Histogram("edgellm_allreduce_seconds",
                                        "hub time in one allreduce (waiting for partials, sum, send)",
                                        buckets=STEP_BUCKETS, registry=r)
        self.workers_up = Gauge("edgellm_workers_up", "worker ranks in the data plane", registry=r)

    def watch_ranks(self, poll: RankStats) -> None:
        self.registry.register(_RankCollector(poll))

    def render(self) -> bytes:
        return generate_latest(self.registry)
