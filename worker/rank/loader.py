"""Builds a rank's model from its ``RankSpec``: the weight store (resident or sliding window
under the memory budget), the expert cache and predictor (MoE), the KV cache.

Streaming needs ``edgellm shard`` output: a rank then reads its blocks straight from its own
file. A Hugging Face checkpoint is sliced on the fly and must fit the budgets resident; if it
does not, the error says to shard it first (slicing on every pass would re-read and re-slice
the whole checkpoint for every token).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.config import CheckpointError, ModelConfig
from worker.kernels.quant import is_aux
from worker.memory.budget import (
    BudgetError,
    expert_share,
    experts_minimum,
    format_size,
    plan_expert_slots,
    plan_window,
)
from worker.memory.expert_cache import ExpertCache
from worker.memory.io_thread import IoThread
from worker.memory.kv_cache import KVCache
from worker.memory.weight_store import ResidentStore, WeightStore, WindowStore, dense_order
from worker.models import model_class
from worker.models.llama import AllReduce, RankModel, rope_table_bytes
from worker.models.moe import MoeRankModel, Predictor
from worker.rank.head import HeadSlice
from worker.shards.checkpoint import Checkpoint
from worker.shards.shard_file import ShardFile
from worker.shards.sharding import RankShard
from worker.shards.weights import (
    HEAD_BLOCK,
    Fields,
    expert_block,
    fields_nbytes,
    head_fields,
    is_shard_dir,
    mlp_block,
    rank_shard_path,
    slice_layer,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (layers loaded, total layers)


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to know to load and join: sent by the coordinator."""

    model_dir: str
    config: ModelConfig
    shard: RankShard
    max_batch: int
    max_context: int
    dtype: torch.dtype = torch.float32
    memory_budget: int | None = None  # bytes for weights + KV cache; None: everything resident
    expert_cache_bytes: int | None = None  # bytes of routed experts (MoE); None: all resident
    expert_policy: str = "distance"  # expert cache eviction: "distance" or "lru"
    prefetch: bool = True  # MoE: predict and prefetch the next layer's experts
    expert_predictor: str = "adaptive"  # MoE: one of worker.models.moe.PREDICTORS
    sync_dtype: str = "fp32"  # allreduce payload dtype, the same on every rank (worker.comm.wire.SYNC_DTYPES)


@dataclass
class LoadedRank:
    model: RankModel
    store: WeightStore
    experts: ExpertCache | None
    io: IoThread | None
    head: HeadSlice  # held resident beside the store, outside the streamed window

    def stats(self) -> dict[str, float]:
        out = self.store.stats()
        out["kv_cache_bytes"] = self.model.kv.nbytes()
        if self.experts is not None:
            out |= self.experts.stats()
        return out

    def close(self) -> None:
        if self.io is not None:
            self.io.close()  # first: no read may be in flight when the files close
        self.store.close()
        if self.experts is not None:
            self.experts.close()


def new_kv_cache(spec: RankSpec) -> KVCache:
    return KVCache(spec.config.num_layers, spec.max_batch, spec.max_context, spec.shard.num_kv_heads,
                   spec.config.head_dim, spec.dtype)


def _to(fields: Fields, dtype: torch.dtype) -> Fields:
    """Float fields in the compute dtype; quantized matrices and their scales as stored (the kernels' dtypes)."""
    return {k: v.to(dtype) if v.is_floating_point() and not is_aux(k) else v for k, v in fields.items()}


def load_rank(spec: RankSpec, allreduce: AllReduce, progress: Progress | None = None,
              tied_rows: torch.Tensor | None = None) -> LoadedRank:
    """``tied_rows``: this rank's LM head rows (V_r, d) already in memory, used instead of reading
    them where the head is the embedding in float (rank 0 in the coordinator, which holds the
    embedding: the head rows are then views, not a second copy)."""
    kv = new_kv_cache(spec)
    if is_shard_dir(spec.model_dir):
        return _load_from_shard(spec, kv, allreduce, progress, tied_rows)
    return _load_from_checkpoint(spec, kv, allreduce, progress, tied_rows)


def _build(spec: RankSpec, store: WeightStore, kv: KVCache, allreduce: AllReduce, experts: ExpertCache | None,
           predictor: Predictor | None, io: IoThread | None, head: HeadSlice) -> LoadedRank:
    cls = model_class(spec.config.architecture)
    if issubclass(cls, MoeRankModel):
        assert experts is not None
        model: RankModel = cls(spec.config, spec.shard, store, kv, allreduce, experts, predictor)
    else:
        model = cls(spec.config, spec.shard, store, kv, allreduce)
    return LoadedRank(model, store, experts, io, head)


def _head_from_shard(spec: RankSpec, file: ShardFile, tied_rows: torch.Tensor | None) -> HeadSlice:
    """The rank file's ``head`` block; a float head of a tied model from ``tied_rows`` where given."""
    if not file.has(HEAD_BLOCK):
        raise CheckpointError(f"{file.path} holds no LM head rows (block {HEAD_BLOCK!r}); re-run `edgellm shard`")
    quantized = any(is_aux(t.name) for t in file.blocks[HEAD_BLOCK].tensors)
    if tied_rows is not None and not quantized:
        fields = {"norm": file.read_field(HEAD_BLOCK, "norm").to(spec.dtype), "lm_head": tied_rows}
    else:
        fields = _to(file.read(HEAD_BLOCK), spec.dtype)
    return _checked_head(spec, HeadSlice.from_fields(fields, spec.config.rms_norm_eps))


def _checked_head(spec: RankSpec, head: HeadSlice) -> HeadSlice:
    if head.rows != spec.shard.vocab_width:
        raise CheckpointError(f"rank {spec.shard.rank}'s LM head has {head.rows} rows, its split "
                          f"{spec.shard.vocab_rows} needs {spec.shard.vocab_width}; re-run `edgellm shard`")
    return head


def _moe_layers(spec: RankSpec) -> list[int]:
    return [layer for layer in range(spec.config.num_layers) if spec.config.is_moe_layer(layer)]


def _load_from_shard(spec: RankSpec, kv: KVCache, allreduce: AllReduce, progress: Progress | None,
                     tied_rows: torch.Tensor | None) -> LoadedRank:
    cfg = spec.config
    path = rank_shard_path(spec.model_dir, spec.shard)
    file = ShardFile(path)
    head = _head_from_shard(spec, file, tied_rows)
    order = dense_order(cfg.num_layers)
    predictor = None
    if cfg.is_moe and spec.prefetch:
        layers = _moe_layers(spec)
        predictor = Predictor({m: file.read_field(mlp_block(m), "router").to(spec.dtype) for m in layers},
                              {m: file.read_field(mlp_block(m), "norm").to(spec.dtype) for m in layers},
                              cfg.rms_norm_eps, cfg.experts_per_token, spec.expert_predictor)
    # held beside the weights for the rank's life: the KV cache, the RoPE tables, the predictor's routers
    # and the LM head rows (views of the coordinator's embedding for rank 0 of a tied float head)
    reserved = kv.nbytes() + rope_table_bytes(kv.max_len, cfg.head_dim, kv.k.dtype) + \
        (predictor.nbytes() if predictor else 0) + (head.nbytes() if tied_rows is None else 0)
    keys = [expert_block(m, e) for m in _moe_layers(spec) for e in range(cfg.num_experts)] if cfg.is_moe else []
    _check_streamed_dtype(file, keys, spec.dtype, "MoE experts always stream from the shard: its experts")
    slot_bytes = max(file.block_bytes(k) for k in keys) if keys else 0
    floor = experts_minimum(slot_bytes, cfg.experts_per_token, spec.expert_cache_bytes)  # 0 without experts
    plan = plan_window([file.block_bytes(b) for b in order], spec.memory_budget, reserved, floor)
    io = IoThread(f"weights-io-{spec.shard.rank}") if not plan.resident else None  # experts have their readers
    store: WeightStore
    if plan.resident:
        blocks = {}
        for layer in range(cfg.num_layers):
            for name in order[2 * layer: 2 * layer + 2]:
                blocks[name] = _to(file.read(name), spec.dtype)
            if progress:
                progress(layer + 1, cfg.num_layers)
        store = ResidentStore(blocks)
        file.close()
    else:
        _check_streamed_dtype(file, order, spec.dtype, "a streamed shard")
        store = WindowStore(file, order, plan, io)  # type: ignore[arg-type]
        log.info("rank %d streams its %s shard through %d buffers of %s (budget %s)", spec.shard.rank,
                 format_size(sum(file.block_bytes(b) for b in order)), plan.slots, format_size(plan.slot_bytes),
                 format_size(spec.memory_budget or 0))
        if progress:
            progress(cfg.num_layers, cfg.num_layers)
    experts = None
    if cfg.is_moe:
        # its own descriptor, byte counters and read-ahead; O_DIRECT where the file system has it: no page-cache
        # copy (0.6-0.9 ms of CPU per MB buffered on this VM, 0.12-0.25 direct)
        expert_file = ShardFile(path, random_access=True, direct=True)
        dense_held = sum(file.block_bytes(b) for b in order) if plan.resident else plan.nbytes
        expert_budget = expert_share(spec.memory_budget, spec.expert_cache_bytes, dense_held + reserved)
        try:
            slots = plan_expert_slots(slot_bytes, len(keys), expert_budget, cfg.experts_per_token)
        except BudgetError as exc:
            if spec.expert_cache_bytes is not None:
                raise
            raise BudgetError(f"{exc}; without --expert-cache the experts get what --memory-budget leaves "
                              f"after the other weights, the KV cache and the RoPE tables") from None
        experts = ExpertCache(expert_file, cfg.num_layers, cfg.num_experts, slots, slot_bytes, spec.expert_policy)
    return _build(spec, store, kv, allreduce, experts, predictor, io, head)


def _check_streamed_dtype(file: ShardFile, blocks: list[str], dtype: torch.dtype, what: str) -> None:
    """Streamed blocks are used as their bytes lie in the file, so their float weights must already
    be in the rank's compute dtype (resident blocks are converted as they load)."""
    stored = {t.dtype for b in blocks for t in file.blocks[b].tensors
              if t.dtype.is_floating_point and not is_aux(t.name)}
    if stored and stored != {dtype}:
        def name(d: torch.dtype) -> str:
            return str(d).removeprefix("torch.")

        raise BudgetError(f"{file.path} holds {', '.join(sorted(map(name, stored)))} weights but this rank computes "
                          f"in {name(dtype)}; {what} must be written in that dtype (edgellm shard --dtype, or "
                          f"serve with the shard's dtype)")


def _load_from_checkpoint(spec: RankSpec, kv: KVCache, allreduce: AllReduce,
                          progress: Progress | None, tied_rows: torch.Tensor | None) -> LoadedRank:
    cfg = spec.config
    blocks: dict[str, Fields] = {}
    experts: dict[tuple[int, int], Fields] = {}
    with Checkpoint(spec.model_dir) as ckpt:
        head_block = head_fields(ckpt, spec.shard, spec.dtype) if tied_rows is None else \
            {"norm": ckpt.get("model.norm.weight").to(spec.dtype), "lm_head": tied_rows}
        head = _checked_head(spec, HeadSlice.from_fields(head_block, cfg.rms_norm_eps))
        dense_bytes = head.nbytes() if tied_rows is None else 0  # the head counts against the budget
        expert_bytes = 0
        for layer in range(cfg.num_layers):
            for name, fields in slice_layer(ckpt, spec.shard, layer, spec.dtype).items():
                parts = name.split(".")
                if parts[2] == "experts":
                    experts[(layer, int(parts[3]))] = fields
                    expert_bytes += fields_nbytes(fields)
                else:
                    blocks[name] = fields
                    dense_bytes += fields_nbytes(fields)
            if spec.memory_budget is not None and dense_bytes + kv.nbytes() > spec.memory_budget:
                raise BudgetError(
                    f"rank {spec.shard.rank}'s weights exceed its memory budget of "
                    f"{format_size(spec.memory_budget)}; streaming reads `edgellm shard` output: run "
                    f"`edgellm shard --model {spec.model_dir} --ranks {spec.shard.world_size} --out DIR` "
                    f"and serve DIR")
            expert_budget = expert_share(spec.memory_budget, spec.expert_cache_bytes, dense_bytes + kv.nbytes())
            if expert_budget is not None and expert_bytes > expert_budget:
                raise BudgetError(
                    f"rank {spec.shard.rank}'s experts exceed its expert cache of "
                    f"{format_size(expert_budget)}; an expert cache smaller than the experts reads "
                    f"`edgellm shard` output: shard the checkpoint first and serve that directory")
            if progress:
                progress(layer + 1, cfg.num_layers)
    cache = None
    predictor = None
    if cfg.is_moe:
        cache = ExpertCache(None, cfg.num_layers, cfg.num_experts, len(experts), 0, spec.expert_policy,
                            preloaded=experts)
    return _build(spec, ResidentStore(blocks), kv, allreduce, cache, predictor, None, head)
