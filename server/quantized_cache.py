"""``edgellm serve --quantize``: serve a Hugging Face checkpoint quantized, in one command.

The checkpoint is sharded and quantized once (``edgellm shard``'s code) into a cache directory
named after what the shards depend on: the checkpoint's weight files (path, size, mtime), the
split, the quantization, its byte layout (``QUANT_FORMAT``) and the storage dtype. The next start with the same inputs serves the
cached shards at once; a changed checkpoint or split writes a new copy. The shards are written
into a temporary directory and renamed into place when complete, so an interrupted run leaves
nothing that a later one would take for finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from worker.config import ModelConfig
from worker.kernels.quant import QUANT_FORMAT, QuantSpec
from worker.shards.shard_writer import write_shards
from worker.shards.sharding import RankShard, plan_shards
from worker.shards.weights import SHARD_MANIFEST

log = logging.getLogger(__name__)


def cache_key(model_dir: Path, weights: list[float], shards: list[RankShard], quant: QuantSpec,
              dtype: torch.dtype) -> str:
    """16 hex digits that change whenever the shards written from these inputs would (the split
    itself included: the rule that turns weights into column ranges can change between versions)."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json"))
    inputs = {"model": str(model_dir.resolve()), "weights": weights, "quant": quant.to_dict(), "dtype": str(dtype),
              "quant_format": QUANT_FORMAT,  # a copy in an older byte layout is written again, not served
              "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
              "split": [asdict(shard) for shard in shards]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def quantized_shards(model_dir: str | Path, weights: list[float], quant: QuantSpec, dtype: torch.dtype,
                     cache_dir: Path) -> Path:
    """The shard directory of ``model_dir`` split by ``weights`` and quantized by ``quant``:
    found in ``cache_dir``, or written there now (with a progress bar)."""
    model_dir = Path(model_dir)
    shards = plan_shards(ModelConfig.from_dir(model_dir), weights)
    target = cache_dir / "quantized" / f"{model_dir.resolve().name}-{cache_key(model_dir, weights, shards, quant, dtype)}"
    if (target / SHARD_MANIFEST).is_file():
        log.info("serving the quantized shards cached in %s", target)
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    log.info("quantizing %s to int%d once; cached in %s for the next start", model_dir, quant.bits or
             quant.expert_bits or 8, target)
    write_shards(model_dir, shards, partial, dtype, quant=quant)
    partial.rename(target)
    return target
