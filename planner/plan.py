"""Decisions: split weights, memory budgets and the sync dtype, as pure functions of the model
shape, the measured nodes and the workload.

Split: each rank's decode time grows with its share ``s`` of the layer weights (``s * bytes /
bandwidth``, or ``max(that + comm, s * bytes / disk)`` once the share no longer fits in its
memory). The chooser finds the smallest step time T whose affordable shares
``s_r(T) = max{s : t_r(s) <= T}`` add up to the whole model (bisection on T), so shares come out
proportional to bandwidth where memory allows and a node without memory for its share gets less.
The shares are then rounded to whole KV heads and MLP columns by ``worker.shards.sharding.plan_shards``
and the resulting plan is priced by ``planner.model.predict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from planner.model import (
    FIXED_OVERHEAD_BYTES,
    MIB,
    Node,
    PlanError,
    Prediction,
    RankLoad,
    Workload,
    block_params,
    context_bytes,
    head_bytes,
    hub_bytes,
    hub_room,
    predict,
    rank_load,
    streams,
)
from worker.config import ModelConfig
from worker.memory.budget import (
    BudgetError,
    expert_share,
    experts_minimum,
    format_size,
    plan_expert_slots,
    plan_window,
)
from worker.shards.sharding import RankShard, ShardingError, plan_shards

SYNC_DTYPES = ("float32", "bfloat16")  # chosen among: exact, or the rounding bench/sync_error.py measures
# int8 payloads (blocks of 32 values with a float32 scale, distributed-llama's Q80 with a wider
# scale) are chosen for integer weights only: their own rounding moves the embedded model's logits
# 2-10x more than int8 payloads do (bench/quant.py: int8 weights 0.13, int4 0.47-0.60 max logit
# difference; bench/sync_error.py: int8 payloads 0.05-0.06 at 2-3 ranks). Priced for float weights too.
# Not for MoE models: a payload's rounding can flip a router's choice of experts (the tiny random
# Mixtral at 2 ranks: one token's logits moved by 0.93 with int8 payloads, the same in C and Python).
SYNC_PRICED = (*SYNC_DTYPES, "int8")
INT8_SYNC_WEIGHTS = ("int8", "int4")
# A reduced-precision allreduce must buy at least this much speed to be worth its rounding error.
SYNC_GAIN_THRESHOLD = 0.05
MIN_SHARE = 1e-3  # plan_shards needs positive weights; a useless node still gets one KV head


def _full_load(config: ModelConfig) -> RankLoad:
    return rank_load(config, plan_shards(config, [1.0])[0])


def _rank_time(share: float, full: RankLoad, config: ModelConfig, node: Node, work: Workload) -> float:
    """Decode seconds of a rank holding ``share`` of every layer and of the LM head's rows
    (continuous approximation)."""
    bpp = work.bytes_per(work.weight_dtype)
    compute = share * full.active_params * bpp / node.matvec_rate(work.weight_dtype, config.hidden_size)
    head = share * full.head_rows * config.hidden_size * work.bytes_per(work.lm_head_dtype)
    compute += head / node.matvec_rate(work.lm_head_dtype, config.hidden_size)
    if _resident(share, full, config, node, work):
        return compute
    held = share * full.held_params * bpp
    # a streaming rank still holds its LM head rows and KV cache resident, beside two blocks of the
    # window; its KV cache and attention blocks are of one KV head at least
    heads = max(share, 1 / config.num_kv_heads)
    pinned = share * head_bytes(config, full, work) + heads * _kv_bytes(config, work) + FIXED_OVERHEAD_BYTES \
        + 2 * heads * full.held_params * bpp / (2 * config.num_layers)
    if not node.disk_mb_s or pinned > node.memory_bytes:
        return math.inf
    return max(compute, held / (node.disk_mb_s * 1e6))


def _max_share(time_of: Callable[[float], float], budget: float) -> float:
    """Largest share in [0, 1] whose time is within ``budget`` (``time_of`` is non-decreasing)."""
    if time_of(1.0) <= budget:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if time_of(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def choose_shares(config: ModelConfig, nodes: Sequence[Node], work: Workload) -> list[float]:
    """Fractions of every layer per node (summing to 1) that minimize the slowest rank's time."""
    if not nodes:
        raise PlanError("no nodes")
    nodes = hub_room(config, nodes, work)
    full = _full_load(config)
    times = [lambda s, n=n: _rank_time(s, full, config, n, work) for n in nodes]
    finite = [t(1.0) for t in times if math.isfinite(t(1.0))]
    hi = max(finite) if finite else None
    if hi is None:  # no node can hold (or stream) everything alone: grow until the shares cover it
        hi = 1e-3
        while sum(_max_share(t, hi) for t in times) < 1.0:
            hi *= 2
            if hi > 1e9:
                raise PlanError("the nodes cannot hold this model: not enough memory and no disk to stream from")
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(_max_share(t, mid) for t in times) >= 1.0:
            hi = mid
        else:
            lo = mid
    shares = [_max_share(t, hi) for t in times]
    total = sum(shares)
    return [max(s / total, MIN_SHARE) for s in shares]


def memory_budgets(config: ModelConfig, shards: Sequence[RankShard], nodes: Sequence[Node],
                   work: Workload) -> list[int]:
    """``--memory-budget`` per rank (weights, KV cache and RoPE tables, the fixed overhead excluded):
    the shard rounded up to a MiB when it fits, else what the node can give (the rank then streams)."""
    out = []
    for shard, node in zip(shards, nodes, strict=True):
        load = rank_load(config, shard)
        need = load.held_params * work.bytes_per(work.weight_dtype) + context_bytes(config, load, work) \
            + head_bytes(config, load, work)
        room = node.memory_bytes - FIXED_OVERHEAD_BYTES
        out.append(int(math.ceil(min(need, max(room, 0)) / MIB)) * MIB)
    return out


def check_budgets(config: ModelConfig, shards: Sequence[RankShard], nodes: Sequence[Node], budgets: Sequence[int],
                  work: Workload) -> None:
    """Refuse a plan whose ``--memory-budget`` a worker would refuse at start: a streamed shard
    needs at least two of its largest blocks beside the KV cache and RoPE tables (the sliding
    window, ``worker.memory.budget.plan_window``), and an MoE rank room for one token's experts in
    what the budget leaves (``plan_expert_slots``), the same rules ``worker.rank.loader`` applies."""
    bpp = work.bytes_per(work.weight_dtype)
    moe_layers = sum(config.is_moe_layer(layer) for layer in range(config.num_layers))
    for shard, node, budget in zip(shards, nodes, budgets, strict=True):
        blocks, expert = block_params(config, shard)
        block_bytes = [int(math.ceil(b * bpp)) for b in blocks]
        load = rank_load(config, shard)
        reserved = context_bytes(config, load, work) + head_bytes(config, load, work)  # as the loader reserves
        expert_bytes = int(math.ceil(expert * bpp)) if moe_layers else 0
        try:
            window = plan_window(block_bytes, budget, reserved,
                                 experts_minimum(expert_bytes, config.experts_per_token, None))
            if expert_bytes:
                dense = sum(block_bytes) if window.resident else window.nbytes
                plan_expert_slots(expert_bytes, moe_layers * config.num_experts,
                                  expert_share(budget, None, dense + reserved), config.experts_per_token)
        except BudgetError as exc:
            beside = "the fixed overhead" + (", the embedding" if shard.rank == 0 else "")
            raise PlanError(f"node {node.name!r} (rank {shard.rank}) has room for a --memory-budget of "
                            f"{format_size(budget)} beside {beside}, which its worker would refuse: {exc}. "
                            f"Give it more memory, a smaller share (--weights) or leave it out") from None


def choose_sync_dtype(config: ModelConfig, shards: Sequence[RankShard], nodes: Sequence[Node],
                      work: Workload) -> tuple[str, dict[str, float]]:
    """float32 (exact) unless a lossy payload makes decode at least ``SYNC_GAIN_THRESHOLD`` faster
    (bfloat16, or int8 for integer weights of a dense model: the fastest of those that do); the
    speeds of ``SYNC_PRICED``."""
    speeds = {d: predict(config, shards, nodes, replace(work, sync_dtype=d)).tokens_per_s for d in SYNC_PRICED}
    lossy = ["bfloat16", *(["int8"] if work.weight_dtype in INT8_SYNC_WEIGHTS and not config.is_moe else [])]
    faster = [d for d in lossy if speeds[d] >= speeds["float32"] * (1 + SYNC_GAIN_THRESHOLD)]
    return max(faster, key=speeds.__getitem__, default="float32"), speeds


def _fit_rounding(config: ModelConfig, nodes: Sequence[Node], work: Workload, shares: list[float],
                  shards: list[RankShard], tries: int = 40) -> tuple[list[float], list[RankShard]]:
    """Rounding to whole KV heads and columns can push a rank the chooser meant to keep resident
    over its memory: shrink such a rank's share a little until its shard fits (or give up)."""
    full = _full_load(config)
    for _ in range(tries):
        over = [r for r, (shard, node) in enumerate(zip(shards, nodes, strict=True))
                if streams(config, rank_load(config, shard), node, work)
                and _resident(shares[r], full, config, node, work)]
        if not over:
            break
        shares = [s * (0.97 if r in over else 1.0) for r, s in enumerate(shares)]
        total = sum(shares)
        shares = [s / total for s in shares]
        shards = plan_shards(config, shares)
    return shares, shards


def choose_lanes(config: ModelConfig, shards: Sequence[RankShard], nodes: Sequence[Node], work: Workload) -> bool:
    """Lanes (``serve --lanes``) where the coordinator's node gives their software cost and they
    predict faster decode than ZeroMQ: on a cluster whose ranks each have their own cores (served
    on a shared 2-core machine they were slower, docs/benchmarks.md)."""
    if len(nodes) < 2 or nodes[0].lane_overhead_us is None:
        return False
    on, off = (predict(config, shards, nodes, replace(work, lanes=lanes)).tokens_per_s for lanes in (True, False))
    return on > off


def _kv_bytes(config: ModelConfig, work: Workload) -> float:
    """The whole model's KV cache (a rank holds its share of it)."""
    return work.max_batch * work.max_context * config.num_layers * 2 * config.num_kv_heads * config.head_dim \
        * work.bytes_per(work.kv_dtype)


def _resident(share: float, full: RankLoad, config: ModelConfig, node: Node, work: Workload) -> bool:
    held = share * full.held_params * work.bytes_per(work.weight_dtype) + share * head_bytes(config, full, work)
    return held + share * _kv_bytes(config, work) + FIXED_OVERHEAD_BYTES <= node.memory_bytes


@dataclass(frozen=True)
class Plan:
    weights: list[float]  # --weights, rank 0 first
    shards: list[RankShard]
    budgets: list[int]  # --memory-budget per rank, bytes
    sync_dtype: str
    sync_speeds: dict[str, float]  # predicted tokens/s per sync dtype
    prediction: Prediction
    hub_bytes: int  # the embedding on the coordinator, outside rank 0's budget
    lanes: bool = False  # serve --lanes

    def as_dict(self) -> dict[str, Any]:
        return {"weights": [round(w, 4) for w in self.weights], "weights_arg": ",".join(f"{w:.3g}" for w in self.weights),
                "memory_budgets_mib": [b // MIB for b in self.budgets], "sync_dtype": self.sync_dtype,
                "sync_tokens_per_s": {k: round(v, 3) for k, v in self.sync_speeds.items()},
                "hub_bytes": self.hub_bytes, "lanes": self.lanes, "prediction": self.prediction.as_dict()}


def make_plan(config: ModelConfig, nodes: Sequence[Node], work: Workload | None = None,
              weights: Sequence[float] | None = None) -> Plan:
    """Choose (or take) the split, then budgets, then the sync dtype, and predict the result."""
    work = work or Workload()
    if len(nodes) > config.num_kv_heads:
        raise PlanError(f"{len(nodes)} nodes but the model has {config.num_kv_heads} KV heads (one per rank at most)")
    chosen = list(weights) if weights else choose_shares(config, nodes, work)
    try:
        shards = plan_shards(config, chosen)
        if not weights:
            chosen, shards = _fit_rounding(config, hub_room(config, nodes, work), work, chosen, shards)
    except ShardingError as exc:
        raise PlanError(str(exc)) from None
    work = replace(work, lanes=choose_lanes(config, shards, nodes, work))
    sync, speeds = choose_sync_dtype(config, shards, nodes, work)
    prediction = predict(config, shards, nodes, replace(work, sync_dtype=sync))
    room = hub_room(config, nodes, work)
    budgets = memory_budgets(config, shards, room, work)
    check_budgets(config, shards, room, budgets, work)
    return Plan(weights=chosen, shards=shards, budgets=budgets, sync_dtype=sync,
                sync_speeds=speeds, prediction=prediction, hub_bytes=hub_bytes(config, work), lanes=work.lanes)
