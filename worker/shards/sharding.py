"""Pure tensor-parallel split plans (Megatron style, as in TPI-LLM).

q/k/v are split by KV-head groups (column-parallel) and o_proj by the matching input
columns (row-parallel); gate/up are split by output rows and down by input columns.
Each rank then produces a partial ``[T, hidden]`` per block and one allreduce per block
sums them. Splits follow per-rank weights, so they may be uneven and N need not divide
anything: the only limit is one KV head per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.config import ModelConfig


class ShardingError(ValueError):
    """The requested split cannot be made for this model."""


@dataclass(frozen=True)
class RankShard:
    """What one rank owns in every layer. Ranges are half-open ``[start, end)``."""

    rank: int
    world_size: int
    kv_heads: tuple[int, int]
    mlp_columns: tuple[int, int]
    group_size: int  # query heads per KV head
    expert_columns: tuple[int, int] = (0, 0)  # of every routed expert (MoE), split like a dense MLP
    shared_columns: tuple[int, int] = (0, 0)  # of the shared expert (Qwen2-MoE)
    vocab_rows: tuple[int, int] = (0, 0)  # of the LM head (vocab-parallel; ``split_vocab``)

    @classmethod
    def from_dict(cls, raw: dict) -> RankShard:
        """Inverse of ``dataclasses.asdict`` (JSON turns the range tuples into lists)."""
        return cls(rank=int(raw["rank"]), world_size=int(raw["world_size"]), kv_heads=tuple(raw["kv_heads"]),
                   mlp_columns=tuple(raw["mlp_columns"]), group_size=int(raw["group_size"]),
                   expert_columns=tuple(raw.get("expert_columns", (0, 0))),
                   shared_columns=tuple(raw.get("shared_columns", (0, 0))),
                   vocab_rows=tuple(raw.get("vocab_rows", (0, 0))))

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def q_heads(self) -> tuple[int, int]:
        return self.kv_heads[0] * self.group_size, self.kv_heads[1] * self.group_size

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.group_size

    @property
    def mlp_width(self) -> int:
        return self.mlp_columns[1] - self.mlp_columns[0]

    @property
    def vocab_width(self) -> int:
        return self.vocab_rows[1] - self.vocab_rows[0]


def apportion(total: int, weights: Sequence[float], minimum: int = 1) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights``, each >= ``minimum``.

    Largest-remainder rounding, so parts always sum to ``total`` and ties go to lower ranks.
    """
    n = len(weights)
    if n == 0:
        raise ShardingError("need at least one rank")
    if any(w <= 0 for w in weights):
        raise ShardingError(f"rank weights must be positive, got {list(weights)}")
    if total < minimum * n:
        raise ShardingError(f"cannot split {total} into {n} parts of at least {minimum}")
    spare = total - minimum * n
    wsum = float(sum(weights))
    exact = [spare * w / wsum for w in weights]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(n), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[: spare - sum(parts)]:
        parts[i] += 1
    return [p + minimum for p in parts]


# Column counts a rank's MLP slice is a multiple of, largest first (see ``split_columns``).
COLUMN_UNITS = (128, 64, 32, 16, 8)
MIN_UNITS_PER_RANK = 4


def split_columns(total: int, weights: Sequence[float]) -> list[int]:
    """MLP (or expert) columns per rank: a multiple of the largest of ``COLUMN_UNITS`` that
    divides ``total`` and still leaves ``MIN_UNITS_PER_RANK`` units a rank, else any split.

    Why: a rank's down projection has its slice as input width, and int8 needs that width to be
    a multiple of 8, int4 of its group (32-128). An even three-way split of a real intermediate
    size (5632 -> 1878/1877/1877, 14336 -> 4779/...) fitted neither, so every 3-rank
    quantized shard failed. The plan does not depend on the dtype: float and quantized shards
    of one model split alike. The cost is balance: 5632 over 3 ranks is 1920/1920/1792, rank 0
    2.3% over its exact share."""
    n = len(weights)
    for unit in COLUMN_UNITS:
        if total % unit == 0 and total // unit >= MIN_UNITS_PER_RANK * n:
            return [units * unit for units in apportion(total // unit, weights)]
    return apportion(total, weights)


# Rows a rank's LM head slice starts on a multiple of: the native kernels compute 4 rows at a
# time and a ragged rest apart, with another summation order, so a slice that starts off this grid
# would give other bits than the same rows of the whole head (measured: a slice from row 1 differs).
VOCAB_UNITS = (128, 64, 32, 16, 8)


def split_vocab(total: int, weights: Sequence[float]) -> list[int]:
    """LM head rows per rank: multiples of the largest of ``VOCAB_UNITS`` that leaves every rank
    ``MIN_UNITS_PER_RANK`` units, the ``total % unit`` rows left over going to the last rank, so
    every slice starts on the kernels' grid and the logits are the bits of the unsplit head."""
    n = len(weights)
    unit = next((u for u in VOCAB_UNITS if total // u >= MIN_UNITS_PER_RANK * n), 1)
    parts = [units * unit for units in apportion(total // unit, weights)]
    parts[-1] += total % unit
    return parts


def _ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def plan_shards(config: ModelConfig, weights: Sequence[float]) -> list[RankShard]:
    """Each rank's KV-head range, MLP column range and LM head rows for ``len(weights)`` ranks."""
    n = len(weights)
    if n > config.num_kv_heads:
        raise ShardingError(
            f"{n} ranks requested but the model has {config.num_kv_heads} KV heads; "
            f"at most {config.num_kv_heads} ranks are possible (one KV head each)"
        )
    kv = _ranges(apportion(config.num_kv_heads, weights))
    mlp = _ranges(split_columns(config.intermediate_size, weights))
    none = [(0, 0)] * n
    experts = _ranges(split_columns(config.moe_intermediate_size, weights)) if config.is_moe else none
    shared = (_ranges(split_columns(config.shared_expert_intermediate_size, weights))
              if config.shared_expert_intermediate_size else none)
    vocab = _ranges(split_vocab(config.vocab_size, weights))
    return [
        RankShard(rank=r, world_size=n, kv_heads=kv[r], mlp_columns=mlp[r], group_size=config.group_size,
                  expert_columns=experts[r], shared_columns=shared[r], vocab_rows=vocab[r])
        for r in range(n)
    ]


def parse_weights(text: str | None, world_size: int) -> list[float]:
    """``"2,1,1"`` -> ``[2.0, 1.0, 1.0]``; ``None`` -> an even split."""
    if not text:
        return [1.0] * world_size
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ShardingError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != world_size:
        raise ShardingError(f"--weights has {len(weights)} entries but there are {world_size} ranks")
    return weights
