"""The cost model: pure functions from a model shape, a split and measured nodes to predicted speed.

One decode step (batch B, L layers, N ranks, rank 0 is the coordinator and the star hub):

    compute_r = max(sum_m bytes_m / matvec_bw_r(width_m), flops_r / gemm_r) + L * layer_overhead_r
                + head_r        (layer_overhead_r: the native step's where a decode step runs it)
    head_r    = max(V_r * hidden * head bytes / matvec_bw_r(hidden), 2 B V_r hidden / gemm_r)
    matvec_bw_r = min(memory bandwidth, cores * clock / cycles_per_weight * bytes_per_weight)
    allreduce = hub software overhead + max_r rtt_r                      (the star, N > 2)
                + 2 * max((N - 1) * payload / hub_link_bw, max_r payload / link_bw_r)
                + (N - 1) * payload / payload_sw
              = exchange overhead + rtt_1 / 2 + payload / min link_bw    (N = 2: both partials
                + payload / payload_sw                                    cross at once, one hop)
    gather    = hub software overhead + max_r rtt_r / 2                 (the logits, N > 1)
                + max(sum_r>0 logits_r / hub_link_bw, max_r logits_r / link_bw_r)
                + sum_r>0 logits_r / payload_sw,     logits_r = B * V_r * 4 (float32)
    token     = max(max_r compute_r + 2 L * allreduce + gather + hub, max_r disk_r)

``bytes_m`` are the weights of each matrix a rank reads per token (its slice of every layer),
streamed at the node's matvec bandwidth for that input width, or at the rate its cores can
consume them where a profile gives the kernel's cycles per weight and that is lower (a compute
ceiling: ``bench/arm_cycles.py`` estimates it with llvm-mca for a Pi's cores), ``payload`` is
``B * hidden * sync bytes`` (int8: 1.125 bytes a value, its scales included); the hub link carries N - 1 payloads in (gather) and N - 1 out
(broadcast), one after the other; ``payload_sw`` is what the software moves per second through
a rank's end of an allreduce beyond the wire (ZeroMQ's copies, CURVE, the sum; probed with
256 KB exchanges on loopback): nothing for a decode row, most of a prefill chunk's allreduce
on loopback. Each rank applies the final norm and its rows ``V_r`` of the LM head (vocab-parallel,
``worker.rank.head``; V_r follows the split) in the head's stored dtype (int8 for int8 and int4
shards, ``edgellm shard``'s default ``--lm-head``), and the hub gathers the (B, V_r) float32 logits.
``hub`` is the step's fixed cost on the coordinator. The software overhead of an allreduce is
the node's ``lane_c_overhead_us`` per worker rank where the cluster runs on lanes with fp32 or
int8 sync (the 2-rank exchange and the star's hub are one C call each: ``lane_allreduce_f32`` /
``_q8``, ``lane_hub_allreduce_f32`` / ``_q8``), its ``lane_overhead_us`` per worker rank on lanes
with bf16/fp16 sync (the hub sums in Python), else its ``allreduce_overhead_us`` (ZeroMQ). A
decode step runs the native step (``worker.models.native_step``: every layer of a rank in one C
call, priced at ``native_layer_overhead_us`` a layer) where ``native_step_runs`` says so: 1 rank,
or lanes with fp32 or int8 sync, a dense model without q/k norms, a float32 KV cache and weights resident. The
per-layer and per-step overheads are measured on this code by ``edgellm probe``. A rank whose
shard does not fit its memory streams it from disk every step (the sliding window), so its step takes
max(compute + comm, disk) rather than the sum. Prefill (time to first token) runs the prompt in
chunks; each chunk is compute-bound (GEMM flops) once it has more than a few tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from worker.config import ModelConfig
from worker.shards.sharding import RankShard

MIB = 1 << 20
# Peak RSS of a rank beyond its budget (Python, torch, gRPC, ZeroMQ, activations): docs/memory.md, "Fixed overhead".
FIXED_OVERHEAD_BYTES = 384 * MIB
# Bytes per weight. int8: per-channel scales are negligible; int4: a bf16 scale and zero per group of 64
# inputs (edgellm shard's default --group-size; worker/kernels/quant.py's format): 4.5 bits, like
# distributed-llama's Q40 and llama.cpp's Q4_0 (a 16-bit scale per 32).
BYTES_PER_PARAM: dict[str, float] = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5625}
# Bytes per value of an allreduce payload (worker.comm.wire): int8 carries a float32 scale per 32 values
SYNC_BYTES_PER_VALUE: dict[str, float] = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.125}
# The payloads whose allreduce is one C call on lanes (kernels/lane.c: lane_allreduce_f32 / _q8 and
# the star's hub); bfloat16/float16 go through Python
SYNC_IN_C = ("float32", "int8")


class PlanError(ValueError):
    """The nodes or settings cannot describe a working cluster; the message says why."""


@dataclass(frozen=True)
class Node:
    """One machine as the cost model sees it (from ``edgellm probe`` or a profile file).

    Bandwidths: ``matvec_gb_s`` is the rate (GB/s, 1e9 bytes) at which a matrix-vector product
    streams weights of each dtype from memory; ``matmul_gflop_s`` is dense GEMM throughput;
    ``link_mbit_s`` the link to the coordinator (on the coordinator: its own NIC, the hub link).
    """

    name: str
    matvec_gb_s: Mapping[str, float]
    matmul_gflop_s: Mapping[str, float]
    memory_bytes: int  # usable by the rank: weights + KV cache + the fixed overhead
    layer_overhead_us: float = 200.0  # our decode step's cost per layer beyond its matrix work
    step_overhead_us: float = 500.0  # and per step (embedding, plan, final norm, sampling input)
    disk_mb_s: float | None = None  # sequential cold-cache read, MB/s (1e6 bytes)
    rtt_us: float = 0.0  # round trip to the coordinator (0 on the coordinator itself)
    link_mbit_s: float | None = None  # None: not measured (loopback or the coordinator without a NIC figure)
    allreduce_overhead_us: float = 0.0  # software cost of one star allreduce beyond the wire time
    # the same for the 2-rank exchange, beyond half a round trip; None (an older probe): the star's
    exchange_overhead_us: float | None = None
    # matvec GB/s by dtype and input width (narrow matrices stream slower); empty: ``matvec_gb_s``
    matvec_by_width: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    # what an allreduce pays per payload byte beyond the wire (ZeroMQ copies, CURVE, the sum), as
    # MB/s; None (an older probe, a profile without it): nothing, as if only the wire counted
    allreduce_payload_mb_s: float | None = None
    # the matvec kernel's inner loop, cycles per weight on one core, by dtype (a profile's estimate,
    # bench/arm_cycles.py); with ``clock_ghz`` and ``cores`` a compute ceiling beside the bandwidth
    matvec_cycles_per_weight: Mapping[str, float] = field(default_factory=dict)
    clock_ghz: float | None = None
    cores: int = 1  # threads a rank computes a product with
    # software cost of one allreduce over the data-plane lanes (``serve --lanes``) per worker rank the
    # hub serves (the 2-rank exchange: once), beyond the wire; None: not known, lanes not priced
    lane_overhead_us: float | None = None
    # the same where the hub's side is one C call (fp32 or int8 sync: the exchange, the star's hub in C);
    # None: not known, ``lane_overhead_us`` priced
    lane_c_overhead_us: float | None = None
    # the native decode step's cost per layer beyond its matrix work (kernels/step.c); None: not
    # known, ``layer_overhead_us`` priced for every step
    native_layer_overhead_us: float | None = None

    def compute_ceiling(self, dtype: str) -> float | None:
        """Bytes/s of ``dtype`` weights the cores can consume by the kernel's cycles per weight
        (all operands in L1), or None where the node gives no such figure."""
        cycles = self.matvec_cycles_per_weight.get(dtype)
        if not cycles or not self.clock_ghz or dtype not in BYTES_PER_PARAM:
            return None
        return self.cores * self.clock_ghz * 1e9 / cycles * BYTES_PER_PARAM[dtype]

    def matvec_rate(self, dtype: str, width: int | None = None) -> float:
        """Bytes/s a matvec over ``dtype`` weights streams: the memory bandwidth, or the compute
        ceiling where that is lower."""
        memory = self.bandwidth(dtype, width)
        ceiling = self.compute_ceiling(dtype)
        return min(memory, ceiling) if ceiling else memory

    def matvec_bound(self, dtype: str, width: int | None = None) -> str:
        """Why a matvec over ``dtype`` weights takes the time it does, in words."""
        memory = self.bandwidth(dtype, width) / 1e9
        ceiling = self.compute_ceiling(dtype)
        if ceiling is None:
            return f"memory-bound at {memory:.3g} GB/s (no compute ceiling given for {dtype})"
        what = (f"{self.matvec_cycles_per_weight[dtype]:.3g} cycles/weight x {self.cores} cores x "
                f"{self.clock_ghz:.3g} GHz = {ceiling / 1e9:.3g} GB/s of {dtype}")
        if ceiling < memory * 1e9:
            return f"compute-bound: {what}, below the {memory:.3g} GB/s of memory"
        return f"memory-bound at {memory:.3g} GB/s (compute ceiling {what})"

    def bandwidth(self, dtype: str, width: int | None = None) -> float:
        """Bytes/s streamed by a matvec over weights of ``dtype`` with ``width`` input features,
        interpolated in log(width) between the probed widths and clamped at the ends. A dtype
        the node was not measured in falls back to the best measured rate (memory-bound kernels
        move bytes, not numbers): optimistic for a kernel that is slower than memory."""
        table = self.matvec_by_width.get(dtype)
        if width and table:
            gb = _interpolate(sorted(table.items()), width)
        else:
            gb = self.matvec_gb_s.get(dtype) or max(self.matvec_gb_s.values(), default=0.0)
        if gb <= 0:
            raise PlanError(f"node {self.name!r} has no matvec bandwidth")
        return gb * 1e9

    def flops(self, dtype: str) -> float:
        """GEMM flop/s with weights in ``dtype``; a dtype the node was not measured in (int4,
        an int8 missing from an older probe) falls back to float32's."""
        gf = self.matmul_gflop_s.get(dtype) or self.matmul_gflop_s.get("float32") or \
            max(self.matmul_gflop_s.values(), default=0.0)
        if gf <= 0:
            raise PlanError(f"node {self.name!r} has no matmul throughput")
        return gf * 1e9

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Node:
        """From a probe/profile mapping (see ``planner/probe.py`` and ``planner/profiles/pi5.yaml``).
        Rates and memory must be positive and overheads not negative: a typo such as
        ``read_mb_s: -5`` would otherwise price a plan with negative times instead of failing."""
        name = str(raw.get("name", "node"))
        try:
            disk = raw.get("disk") or {}
            link = raw.get("link") or {}
            memory_key = next((k for k in ("memory_budget_bytes", "memory_available_bytes", "memory_bytes")
                               if raw.get(k) is not None), "memory_bytes")
            rates = [_positive(name, f"link.{k}", link[k])
                     for k in ("up_mbit_s", "down_mbit_s", "mbit_s") if link.get(k) is not None]
            payload = raw.get("allreduce_payload_mb_s")
            clock = raw.get("clock_ghz")
            return cls(name=name,
                       matvec_gb_s={str(k): _positive(name, f"matvec_gb_s.{k}", v)
                                    for k, v in dict(raw["matvec_gb_s"]).items()},
                       matmul_gflop_s={str(k): _positive(name, f"matmul_gflop_s.{k}", v)
                                       for k, v in dict(raw["matmul_gflop_s"]).items()},
                       memory_bytes=int(_positive(name, memory_key, raw[memory_key])),
                       layer_overhead_us=_not_negative(name, "layer_overhead_us",
                                                       raw.get("layer_overhead_us", cls.layer_overhead_us)),
                       step_overhead_us=_not_negative(name, "step_overhead_us",
                                                      raw.get("step_overhead_us", cls.step_overhead_us)),
                       matvec_by_width={str(k): {int(w): _positive(name, f"matvec_by_width.{k}.{w}", g)
                                                 for w, g in dict(v).items()}
                                        for k, v in dict(raw.get("matvec_by_width") or {}).items()},
                       disk_mb_s=(_positive(name, "disk.read_mb_s", disk["read_mb_s"])
                                  if disk.get("read_mb_s") is not None else None),
                       rtt_us=_not_negative(name, "link.rtt_us", link.get("rtt_us", 0.0)),
                       link_mbit_s=min(rates) if rates else None,
                       allreduce_overhead_us=_not_negative(name, "allreduce_overhead_us",
                                                           raw.get("allreduce_overhead_us", 0.0)),
                       exchange_overhead_us=(_not_negative(name, "exchange_overhead_us", raw["exchange_overhead_us"])
                                             if raw.get("exchange_overhead_us") is not None else None),
                       allreduce_payload_mb_s=(_positive(name, "allreduce_payload_mb_s", payload)
                                               if payload is not None else None),
                       matvec_cycles_per_weight={str(k): _positive(name, f"matvec_cycles_per_weight.{k}", v)
                                                 for k, v in dict(raw.get("matvec_cycles_per_weight") or {}).items()},
                       clock_ghz=_positive(name, "clock_ghz", clock) if clock is not None else None,
                       lane_overhead_us=(_not_negative(name, "lane_overhead_us", raw["lane_overhead_us"])
                                         if raw.get("lane_overhead_us") is not None else None),
                       lane_c_overhead_us=(_not_negative(name, "lane_c_overhead_us", raw["lane_c_overhead_us"])
                                           if raw.get("lane_c_overhead_us") is not None else None),
                       native_layer_overhead_us=(
                           _not_negative(name, "native_layer_overhead_us", raw["native_layer_overhead_us"])
                           if raw.get("native_layer_overhead_us") is not None else None),
                       cores=int(_positive(name, "threads", raw.get("threads") or raw.get("cpus") or 1)))
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"node {name!r}: bad or missing field ({exc})") from None


def _number(node: str, key: str, value: Any) -> float:
    """``value`` as a finite float; a string such as ``8e9`` too (YAML 1.1 reads it as a string)."""
    if isinstance(value, bool):
        raise PlanError(f"node {node!r}: {key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PlanError(f"node {node!r}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise PlanError(f"node {node!r}: {key} must be finite, got {value!r}")
    return number


def _positive(node: str, key: str, value: Any) -> float:
    number = _number(node, key, value)
    if number <= 0:
        raise PlanError(f"node {node!r}: {key} must be positive, got {value!r}")
    return number


def _not_negative(node: str, key: str, value: Any) -> float:
    number = _number(node, key, value)
    if number < 0:
        raise PlanError(f"node {node!r}: {key} must not be negative, got {value!r}")
    return number


@dataclass(frozen=True)
class Workload:
    """What is being served: dtypes, batch and lengths."""

    weight_dtype: str = "float32"
    sync_dtype: str = "float32"  # allreduce payload
    kv_dtype: str = "float32"
    batch: int = 1  # sequences decoded per step
    context: int = 128  # tokens already in each sequence's KV cache while decoding
    prompt_tokens: int = 128  # for the time to first token
    prefill_chunk: int = 256  # prompt tokens per step (serve --prefill-chunk)
    max_batch: int = 1  # KV-cache slots (memory)
    max_context: int = 2048  # tokens per slot (memory)
    head_dtype: str | None = None  # the LM head's stored dtype; None: as ``edgellm shard`` writes it
    lanes: bool = False  # allreduces over the data-plane lanes (serve --lanes), not ZeroMQ

    @property
    def lm_head_dtype(self) -> str:
        """The LM head's dtype: int8 for int8 and int4 shards (``--lm-head int8``, the default:
        ``worker.kernels.quant.QuantSpec``), else the weights' own."""
        if self.head_dtype:
            return self.head_dtype
        return "int8" if self.weight_dtype in ("int8", "int4") else self.weight_dtype

    @property
    def float_dtype(self) -> str:
        """The float dtype of the embedding and activations: the weights' own, float32 for integer
        weights (``edgellm shard``'s default ``--dtype``)."""
        return self.weight_dtype if self.weight_dtype in ("float32", "bfloat16", "float16") else "float32"

    @property
    def sync_bytes(self) -> float:
        """Bytes per value of an allreduce payload."""
        if self.sync_dtype not in SYNC_BYTES_PER_VALUE:
            raise PlanError(f"unknown sync dtype {self.sync_dtype!r}; known: {', '.join(SYNC_BYTES_PER_VALUE)}")
        return SYNC_BYTES_PER_VALUE[self.sync_dtype]

    def bytes_per(self, dtype: str) -> float:
        if dtype not in BYTES_PER_PARAM:
            raise PlanError(f"unknown dtype {dtype!r}; known: {', '.join(BYTES_PER_PARAM)}")
        return BYTES_PER_PARAM[dtype]


@dataclass(frozen=True)
class RankLoad:
    """Parameters one rank holds and reads per decoded token, from its shard."""

    held_params: int  # decoder-layer parameters resident or streamed
    active_params: int  # read per decoded token (MoE: only the routed experts used)
    kv_heads: int
    q_heads: int
    mlp_width: int = 0  # columns of the dense MLP on this rank
    head_rows: int = 0  # rows of the LM head (vocab-parallel) on this rank


def block_params(config: ModelConfig, shard: RankShard) -> tuple[list[int], int]:
    """Parameters of ``shard``'s dense blocks in the order a forward pass reads them (each layer's
    attention, then its MLP: for an MoE layer the norm, router and shared expert), as
    ``worker.memory.weight_store.dense_order`` streams them, and of one routed expert (norms included,
    biases ignored)."""
    d, hd = config.hidden_size, config.head_dim
    qh, kh = shard.num_q_heads, shard.num_kv_heads
    attention = d * (qh + 2 * kh) * hd + qh * hd * d + d
    blocks = []
    for layer in range(config.num_layers):
        blocks.append(attention)
        if config.is_moe_layer(layer):
            sw = shard.shared_columns[1] - shard.shared_columns[0]
            blocks.append(config.num_experts * d + 3 * d * sw + (d if sw else 0) + d)
        else:
            blocks.append(3 * d * shard.mlp_width + d)
    return blocks, 3 * d * (shard.expert_columns[1] - shard.expert_columns[0])


def rank_load(config: ModelConfig, shard: RankShard) -> RankLoad:
    """Count the decoder parameters of ``shard`` (norms included, biases ignored)."""
    blocks, expert = block_params(config, shard)
    moe_layers = sum(config.is_moe_layer(layer) for layer in range(config.num_layers))
    dense = sum(blocks)
    return RankLoad(held_params=dense + moe_layers * config.num_experts * expert,
                    active_params=dense + moe_layers * config.experts_per_token * expert,
                    kv_heads=shard.num_kv_heads, q_heads=shard.num_q_heads, mlp_width=shard.mlp_width,
                    head_rows=shard.vocab_width)


def _interpolate(points: Sequence[tuple[int, float]], width: int) -> float:
    if width <= points[0][0]:
        return points[0][1]
    for (w0, g0), (w1, g1) in zip(points, points[1:], strict=False):
        if width <= w1:
            t = (math.log(width) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return g0 + t * (g1 - g0)
    return points[-1][1]


def _matvec_seconds(config: ModelConfig, load: RankLoad, node: Node, dtype: str, params: int, bpp: float) -> float:
    """Time to stream ``params`` weights of a rank: each dense matrix at its own input width
    (q/k/v and gate/up: hidden; o_proj: the rank's q heads x head_dim; down: its MLP columns),
    anything else (experts, norms) at the hidden width."""
    d, hd, layers = config.hidden_size, config.head_dim, config.num_layers
    parts = [((load.q_heads + 2 * load.kv_heads) * hd * d, d), (load.q_heads * hd * d, load.q_heads * hd)]
    if not config.is_moe:
        parts += [(2 * load.mlp_width * d, d), (load.mlp_width * d, load.mlp_width)]
    parts = [(n * layers, w) for n, w in parts if n]
    rest = max(params - sum(n for n, _ in parts), 0)
    parts.append((rest, d))
    return sum(n * bpp / node.matvec_rate(dtype, max(w, 1)) for n, w in parts if n)


def hub_bytes(config: ModelConfig, work: Workload) -> int:
    """What the coordinator holds beside rank 0's shard: the embedding, in the float dtype (the
    shard's hub file); the LM head is split over the ranks (``head_bytes``)."""
    return int(config.vocab_size * config.hidden_size * work.bytes_per(work.float_dtype))


def head_bytes(config: ModelConfig, load: RankLoad, work: Workload) -> int:
    """A rank's LM head rows and final norm, in the head's dtype (int8 adds a bf16 scale per row)."""
    scales = 2 if work.lm_head_dtype == "int8" else 0
    return int(load.head_rows * (config.hidden_size * work.bytes_per(work.lm_head_dtype) + scales)) \
        + config.hidden_size * 4


def hub_room(config: ModelConfig, nodes: Sequence[Node], work: Workload) -> list[Node]:
    """``nodes`` with the coordinator's memory less its embedding (outside rank 0's budget but on
    the same machine)."""
    hub = hub_bytes(config, work)
    coordinator = nodes[0]
    if coordinator.memory_bytes - hub - FIXED_OVERHEAD_BYTES <= 0:
        # rank 0 would get no budget at all (the plan printed a negative memory figure)
        raise PlanError(f"coordinator {coordinator.name!r} has {coordinator.memory_bytes / MIB:.0f} MiB of memory but "
                        f"needs more than {(hub + FIXED_OVERHEAD_BYTES) / MIB:.0f} MiB: "
                        f"{hub / MIB:.0f} MiB for the embedding ({work.float_dtype}) and "
                        f"{FIXED_OVERHEAD_BYTES / MIB:.0f} MiB of fixed overhead, before its share of the layers")
    return [replace(coordinator, memory_bytes=coordinator.memory_bytes - hub), *nodes[1:]]


def kv_cache_bytes(config: ModelConfig, load: RankLoad, work: Workload) -> int:
    """KV cache a rank allocates: slots x tokens x layers x (k, v) x its heads x head_dim."""
    return int(work.max_batch * work.max_context * config.num_layers * 2 * load.kv_heads * config.head_dim
               * work.bytes_per(work.kv_dtype))


def context_bytes(config: ModelConfig, load: RankLoad, work: Workload) -> int:
    """What a rank's budget holds beside its weights: the KV cache and the RoPE tables (cos and
    sin of every position, in the KV dtype), as ``worker.rank.loader`` reserves them."""
    rope = 2 * work.max_context * config.head_dim * work.bytes_per(work.kv_dtype)
    return kv_cache_bytes(config, load, work) + int(rope)


def rank_memory_bytes(config: ModelConfig, load: RankLoad, work: Workload) -> int:
    """Resident footprint of a rank that holds its whole shard and its LM head rows (the hub's
    embedding not included)."""
    return int(load.held_params * work.bytes_per(work.weight_dtype)) + context_bytes(config, load, work) \
        + head_bytes(config, load, work) + FIXED_OVERHEAD_BYTES


def allreduce_seconds(nodes: Sequence[Node], payload_bytes: float, lanes: bool = False, in_c: bool = False) -> float:
    """One allreduce of ``payload_bytes`` per rank, as ``worker.comm.collective`` runs it: the
    exchange at two ranks, the star from three; ``in_c``: the hub's side is one C call (lanes,
    fp32 or int8 sync)."""
    if len(nodes) == 1:
        return 0.0
    if len(nodes) == 2:
        return exchange_seconds(nodes, payload_bytes, lanes, in_c)
    return star_seconds(nodes, payload_bytes, lanes, in_c)


def gather_seconds(nodes: Sequence[Node], payloads: Sequence[float], lanes: bool = False) -> float:
    """The hub receiving every worker's logits (``payloads[r]`` bytes from rank r, rank 0's own
    not sent): one hop in, the workers' payloads one after the other on the hub's link."""
    if len(nodes) == 1:
        return 0.0
    hub, workers = nodes[0], nodes[1:]
    worker_links = [w.link_mbit_s for w in workers if w.link_mbit_s]
    hub_link = hub.link_mbit_s or (min(worker_links) if worker_links else None)
    incoming = sum(payloads[1:])
    wire = incoming / (hub_link * 1e6 / 8) if hub_link else 0.0
    if worker_links:
        wire = max(wire, max(payloads[1:]) / (min(worker_links) * 1e6 / 8))
    return (software_overhead_us(nodes, lanes) + max(w.rtt_us for w in workers) / 2) * 1e-6 + wire + \
        payload_software_seconds(nodes, incoming)


def payload_software_seconds(nodes: Sequence[Node], payload_bytes: float) -> float:
    """The software's per-byte cost of one payload through a rank's end of an allreduce, at the
    slowest node that measured it (``Node.allreduce_payload_mb_s``); 0 where none did."""
    rates = [n.allreduce_payload_mb_s for n in nodes if n.allreduce_payload_mb_s]
    return payload_bytes / (min(rates) * 1e6) if rates else 0.0


def software_overhead_us(nodes: Sequence[Node], lanes: bool, in_c: bool = False) -> float:
    """The hub's software cost of one allreduce beyond the wire: over lanes, ``lane_c_overhead_us``
    (``in_c``: the hub's side one C call) or ``lane_overhead_us`` per worker rank; over ZeroMQ, the
    probed star (or, at two ranks, exchange) overhead."""
    hub = nodes[0]
    if lanes and in_c and hub.lane_c_overhead_us is not None and hub.lane_overhead_us is not None:
        return hub.lane_c_overhead_us * (len(nodes) - 1)
    if lanes and hub.lane_overhead_us is not None:
        return hub.lane_overhead_us * (len(nodes) - 1)
    if len(nodes) == 2 and hub.exchange_overhead_us is not None:
        return hub.exchange_overhead_us
    return hub.allreduce_overhead_us


def exchange_seconds(nodes: Sequence[Node], payload_bytes: float, lanes: bool = False, in_c: bool = False) -> float:
    """Two ranks swap partials and each sums both: one payload each way at once (full duplex),
    each side handling one out and one in, at the same time as the other."""
    hub, worker = nodes
    links = [r.link_mbit_s for r in nodes if r.link_mbit_s]
    wire = payload_bytes / (min(links) * 1e6 / 8) if links else 0.0
    return (software_overhead_us(nodes, lanes, in_c) + worker.rtt_us / 2) * 1e-6 + wire + \
        payload_software_seconds(nodes, payload_bytes)


def star_seconds(nodes: Sequence[Node], payload_bytes: float, lanes: bool = False, in_c: bool = False) -> float:
    """One star allreduce of ``payload_bytes`` per rank: up to the hub, summed, back down."""
    n = len(nodes)
    if n == 1:
        return 0.0
    hub, workers = nodes[0], nodes[1:]
    worker_links = [w.link_mbit_s for w in workers if w.link_mbit_s]
    hub_link = hub.link_mbit_s or (min(worker_links) if worker_links else None)
    wire = 0.0
    if hub_link:
        wire = (n - 1) * payload_bytes / (hub_link * 1e6 / 8)
    if worker_links:
        wire = max(wire, payload_bytes / (min(worker_links) * 1e6 / 8))
    # the hub handles N - 1 payloads in and N - 1 out, one rank's pair after the other
    software = (n - 1) * payload_software_seconds(nodes, payload_bytes)
    overhead = software_overhead_us(nodes, lanes, in_c) if lanes and hub.lane_overhead_us is not None \
        else hub.allreduce_overhead_us
    return (overhead + max(w.rtt_us for w in workers)) * 1e-6 + 2 * wire + software


def native_step_runs(config: ModelConfig, work: Workload, ranks: int) -> bool:
    """Whether a decode step runs natively on every rank (``worker.models.native_step``: what its
    ``attach`` and ``run`` accept): alone, or on lanes with fp32 or int8 sync; a dense model without
    q/k norms, a float32 KV cache, float32/int8/int4 weights. (A rank that streams runs in Python.)"""
    return (ranks == 1 or allreduce_in_c(work)) and not config.is_moe \
        and config.qk_norm is None and work.kv_dtype == "float32" and work.weight_dtype in ("float32", "int8", "int4") \
        and work.batch <= 64


def layer_overhead_us(config: ModelConfig, node: Node, work: Workload, ranks: int, tokens: int = 1) -> float:
    """A layer's cost beyond its matrix work on ``node``: the native step's where a decode step runs
    it and the node gives that figure, else the Python step's."""
    if tokens == 1 and node.native_layer_overhead_us is not None and native_step_runs(config, work, ranks):
        return node.native_layer_overhead_us
    return node.layer_overhead_us


def _rank_pass_seconds(config: ModelConfig, load: RankLoad, node: Node, work: Workload, tokens: int,
                       past: int, ranks: int = 1) -> float:
    """Compute time of one rank for a step of ``tokens`` new tokens per sequence over ``past``
    cached ones (batch ``work.batch``) in a cluster of ``ranks``: weight reads or flops, whichever
    binds, plus dispatch."""
    bpp = work.bytes_per(work.weight_dtype)
    rows = work.batch * tokens
    read_params = load.held_params if rows > 1 and load.held_params != load.active_params else load.active_params
    kv_read = work.batch * (past + tokens) * config.num_layers * 2 * load.kv_heads * config.head_dim \
        * work.bytes_per(work.kv_dtype)
    mm_flops = 2.0 * load.active_params * rows
    # causal attention: q.k and p.v over (past + tokens / 2) keys on average
    attn_flops = 4.0 * rows * (past + tokens / 2) * load.q_heads * config.head_dim * config.num_layers
    read = _matvec_seconds(config, load, node, work.weight_dtype, min(load.held_params, read_params), bpp)
    read += kv_read / node.bandwidth(work.weight_dtype)
    # matmuls at the weights' kernel rate; attention in the activations' dtype (fp32 for int8/int4 shards)
    activations = work.weight_dtype if work.weight_dtype in ("float32", "bfloat16", "float16") else "float32"
    busy = max(read, mm_flops / node.flops(work.weight_dtype) + attn_flops / node.flops(activations))
    streamed = streams(config, load, node, work)
    per_layer = node.layer_overhead_us if streamed else layer_overhead_us(config, node, work, ranks, tokens)
    return busy + config.num_layers * per_layer * 1e-6


def _head_seconds(config: ModelConfig, load: RankLoad, node: Node, work: Workload, rows: int) -> float:
    """A rank's final norm and LM head rows for ``rows`` rows (the vocab-parallel head): its rows
    read once in the head's dtype, or their flops, whichever binds."""
    dtype = work.lm_head_dtype
    params = load.head_rows * config.hidden_size
    return max(params * work.bytes_per(dtype) / node.matvec_rate(dtype, config.hidden_size),
               2.0 * params * rows / node.flops(dtype))


def _gather_seconds(config: ModelConfig, loads: Sequence[RankLoad], nodes: Sequence[Node], work: Workload,
                    rows: int) -> float:
    """The hub gathering ``rows`` rows of float32 logits from every rank's head rows."""
    return gather_seconds(nodes, [rows * ld.head_rows * 4.0 for ld in loads], work.lanes)


@dataclass(frozen=True)
class RankPrediction:
    rank: int
    node: str
    kv_heads: int
    mlp_columns: int
    weight_bytes: int
    memory_bytes: int  # the rank's predicted peak: weights (or its window budget) + KV + overhead
    streams: bool  # shard larger than the memory: streamed from disk every step
    compute_s: float  # per decoded token, its LM head rows included
    disk_s: float  # per decoded token (0 when resident)
    head_s: float = 0.0  # of compute_s: its LM head rows


@dataclass(frozen=True)
class Prediction:
    tokens_per_s: float  # per sequence
    decode_s: float  # one decode step
    ttft_s: float
    comm_s: float  # per decode step: 2 L allreduces + the step broadcast + the logits' gather
    hub_s: float  # the coordinator's fixed cost of a step
    ranks: list[RankPrediction] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # what the decode step is made of, and what bounds each part

    def as_dict(self) -> dict[str, Any]:
        return {"tokens_per_s": round(self.tokens_per_s, 3), "decode_ms": round(self.decode_s * 1e3, 3),
                "ttft_ms": round(self.ttft_s * 1e3, 2), "comm_ms": round(self.comm_s * 1e3, 3),
                "hub_ms": round(self.hub_s * 1e3, 3), "reasons": self.reasons,
                "ranks": [{**r.__dict__, "compute_ms": round(r.compute_s * 1e3, 3),
                           "disk_ms": round(r.disk_s * 1e3, 3)} for r in self.ranks]}


def streams(config: ModelConfig, load: RankLoad, node: Node, work: Workload) -> bool:
    """Whether the rank's shard plus KV cache exceeds its node's memory (it must stream)."""
    return rank_memory_bytes(config, load, work) > node.memory_bytes


def _step_comm_seconds(config: ModelConfig, nodes: Sequence[Node], work: Workload, rows: int) -> float:
    if len(nodes) == 1:
        return 0.0
    payload = rows * config.hidden_size * work.sync_bytes
    # the step header broadcast: half a round trip and N - 1 copies of the hidden rows out of the hub
    start = star_seconds(nodes, payload, work.lanes) / 2
    return 2 * config.num_layers * allreduce_seconds(nodes, payload, work.lanes, allreduce_in_c(work)) + start


def allreduce_in_c(work: Workload) -> bool:
    """The hub's side of each allreduce is one C call: lanes with fp32 or int8 sync (``StarHub.allreduce_``)."""
    return work.lanes and work.sync_dtype in SYNC_IN_C


def _disk_seconds(config: ModelConfig, load: RankLoad, node: Node, work: Workload) -> float:
    if not streams(config, load, node, work):
        return 0.0
    if not node.disk_mb_s:
        raise PlanError(f"node {node.name!r} must stream its shard from disk but has no disk speed")
    return load.held_params * work.bytes_per(work.weight_dtype) / (node.disk_mb_s * 1e6)


def predict(config: ModelConfig, shards: Sequence[RankShard], nodes: Sequence[Node],
            work: Workload = Workload()) -> Prediction:
    """Predicted decode speed, time to first token and per-rank memory of ``shards`` on ``nodes``
    (``nodes[0]`` is the coordinator: rank 0 and the hub)."""
    if len(shards) != len(nodes):
        raise PlanError(f"{len(shards)} shards for {len(nodes)} nodes")
    nodes = hub_room(config, nodes, work)
    loads = [rank_load(config, s) for s in shards]
    bpp = work.bytes_per(work.weight_dtype)
    heads = [_head_seconds(config, ld, nd, work, work.batch) for ld, nd in zip(loads, nodes, strict=True)]
    compute = [_rank_pass_seconds(config, ld, nd, work, 1, work.context, len(nodes)) + h
               for ld, nd, h in zip(loads, nodes, heads, strict=True)]
    disk = [_disk_seconds(config, ld, nd, work) for ld, nd in zip(loads, nodes, strict=True)]
    gather = _gather_seconds(config, loads, nodes, work, work.batch)
    comm = _step_comm_seconds(config, nodes, work, work.batch) + gather
    hub = nodes[0].step_overhead_us * 1e-6
    decode = max(max(compute) + comm + hub, max(disk))
    ttft = _ttft_seconds(config, loads, nodes, work, disk)
    ranks = []
    for s, ld, nd, c, dk, h in zip(shards, loads, nodes, compute, disk, heads, strict=True):
        resident = rank_memory_bytes(config, ld, work)
        ranks.append(RankPrediction(rank=s.rank, node=nd.name, kv_heads=s.num_kv_heads, mlp_columns=s.mlp_width,
                                    weight_bytes=int(ld.held_params * bpp),
                                    memory_bytes=min(resident, nd.memory_bytes) if dk else resident,
                                    streams=dk > 0, compute_s=c, disk_s=dk, head_s=h))
    reasons = _reasons(config, nodes, work, compute, heads, comm, gather, hub, disk)
    return Prediction(tokens_per_s=1.0 / decode, decode_s=decode, ttft_s=ttft, comm_s=comm, hub_s=hub, ranks=ranks,
                      reasons=reasons)


def _reasons(config: ModelConfig, nodes: Sequence[Node], work: Workload, compute: Sequence[float],
             heads: Sequence[float], comm: float, gather: float, hub: float, disk: Sequence[float]) -> list[str]:
    """The decode step in words: the slowest rank's matvecs, head and overhead, the allreduces,
    the logits' gather, the hub."""
    slow = max(range(len(nodes)), key=lambda r: compute[r])
    node, dtype = nodes[slow], work.weight_dtype
    native = not disk[slow] and node.native_layer_overhead_us is not None and native_step_runs(config, work, len(nodes))
    per_layer = node.native_layer_overhead_us if native else node.layer_overhead_us
    assert per_layer is not None
    overhead = config.num_layers * per_layer * 1e-6
    head_dtype = work.lm_head_dtype
    out = [f"decode step {(max(compute) + comm + hub) * 1e3:.1f} ms = slowest rank {max(compute) * 1e3:.1f} "
           f"+ allreduces and gather {comm * 1e3:.1f} + hub {hub * 1e3:.1f}",
           f"rank {slow} ({node.name}): weights and KV cache read {(compute[slow] - overhead - heads[slow]) * 1e3:.1f} "
           f"ms, {node.matvec_bound(dtype, config.hidden_size)}; its LM head rows {heads[slow] * 1e3:.1f} ms "
           f"({head_dtype}, 1/{len(nodes)} of the vocab at even weights); "
           f"{'native step (native_layer_overhead_us)' if native else 'Python step (layer_overhead_us)'} overhead "
           f"{overhead * 1e3:.1f} ms ({config.num_layers} layers x {per_layer:g} us)"]
    if len(nodes) > 1:
        payload = work.batch * config.hidden_size * work.sync_bytes
        in_c = allreduce_in_c(work)
        one = allreduce_seconds(nodes, payload, work.lanes, in_c)
        plane = "lanes" if work.lanes and nodes[0].lane_overhead_us is not None else "ZeroMQ"
        if plane == "ZeroMQ":
            source = "allreduce_overhead_us" if len(nodes) > 2 or nodes[0].exchange_overhead_us is None \
                else "exchange_overhead_us"
        elif in_c and nodes[0].lane_c_overhead_us is not None:
            source = f"lane_c_overhead_us x {len(nodes) - 1} worker ranks: the hub's side in C"
        else:
            source = f"lane_overhead_us x {len(nodes) - 1} worker ranks: the hub's side in Python"
        out.append(f"allreduces: {2 * config.num_layers} x {one * 1e3:.2f} ms ({work.sync_dtype} payload of "
                   f"{payload / 1024:.0f} KiB over {plane}; software overhead "
                   f"{software_overhead_us(nodes, work.lanes, in_c):g} us each, {source}) + the step broadcast")
        out.append(f"logits gather: {gather * 1e3:.2f} ms (float32 logits of every worker's head rows to the hub)")
    out.append(f"hub: step overhead {hub * 1e3:.1f} ms (the LM head is split over the ranks)")
    if max(disk) > max(compute) + comm + hub:
        out.append(f"but a rank streams its shard from disk: {max(disk) * 1e3:.0f} ms a step")
    return out


def _ttft_seconds(config: ModelConfig, loads: Sequence[RankLoad], nodes: Sequence[Node], work: Workload,
                  disk: Sequence[float]) -> float:
    """Prefill of ``work.prompt_tokens`` for one sequence in chunks, then the LM head rows of its
    last token on every rank and the gather."""
    one = replace(work, batch=1)
    total, done = 0.0, 0
    chunks = max(1, math.ceil(work.prompt_tokens / work.prefill_chunk))
    for i in range(chunks):
        n = min(work.prefill_chunk, work.prompt_tokens - done) if work.prompt_tokens else 1
        compute = max(_rank_pass_seconds(config, ld, nd, one, n, done, len(nodes))
                      for ld, nd in zip(loads, nodes, strict=True))
        total += max(compute + _step_comm_seconds(config, nodes, one, n), max(disk))
        done += n
        if i == chunks - 1:
            total += max(_head_seconds(config, ld, nd, one, 1) for ld, nd in zip(loads, nodes, strict=True)) \
                + _gather_seconds(config, loads, nodes, one, 1) + nodes[0].step_overhead_us * 1e-6
    return total
