"""``edgellm shard``: write one safetensors file per rank, streaming layer by layer.

safetensors puts its header first, so a streaming writer appends each tensor's bytes to a
scratch file while recording offsets, then writes header + data. Peak memory is one
layer's slices, never the checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from worker.config import CheckpointError
from worker.kernels.quant import QUANT_FORMAT, QuantSpec, quantize_block, quantize_lm_head
from worker.shards.checkpoint import Checkpoint
from worker.shards.shard_fetch import file_sha256
from worker.shards.sharding import RankShard
from worker.shards.weights import (
    HEAD_BLOCK,
    HUB_FILE,
    SHARD_FORMAT,
    SHARD_MANIFEST,
    SIDE_FILES,
    Fields,
    head_fields,
    is_shard_dir,
    load_hub_weights,
    shard_file_name,
    slice_layer,
)

log = logging.getLogger(__name__)

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


class StreamingSafetensorsWriter:
    """Append tensors one at a time; ``close`` writes a valid safetensors file."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = path
        self._scratch_path = path.with_suffix(path.suffix + ".partial")
        self._scratch: BinaryIO = open(self._scratch_path, "wb")  # noqa: SIM115 (closed in close())
        self._header: dict[str, object] = {"__metadata__": metadata or {}}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        self._scratch.write(data)
        self._header[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._offset, self._offset + len(data)]}
        self._offset += len(data)

    def abort(self) -> None:
        """Drop the partial file (a failed shard run leaves nothing half-written behind)."""
        self._scratch.close()
        self._scratch_path.unlink(missing_ok=True)

    def close(self) -> None:
        self._scratch.close()
        header = json.dumps(self._header, separators=(",", ":")).encode()
        # the data section starts on a 4096-byte page: the expert cache reads experts with O_DIRECT into
        # buffers where each lands at its offset within its page of the file (ShardFile.place), so
        # tensors stay as aligned in memory as in a fresh allocation only where the file's are
        header += b" " * (-(8 + len(header)) % 4096)
        with open(self.path, "wb") as out, open(self._scratch_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, length=1 << 22)
        self._scratch_path.unlink()


def write_shards(model_dir: str | Path, shards: list[RankShard], out_dir: str | Path,
                 dtype: torch.dtype = torch.float32, progress: bool = True, quant: QuantSpec | None = None,
                 weights: list[float] | None = None, expert_bits: dict[tuple[int, int], int] | None = None) -> Path:
    """Write ``rank-RR-of-NN.safetensors`` per rank, ``hub.safetensors`` and a manifest.

    ``expert_bits``: a width per routed expert ((layer, expert) -> 4 or 8, ``worker.shards.expert_bits``),
    overriding ``quant.expert_bits``; the dense weights follow ``quant`` (float without it).

    The output directory is itself servable: config and tokenizer files are copied in.
    ``quant`` quantizes the rank blocks' weight matrices (``worker.kernels.quant``); slices are then
    taken in fp32 so quantization rounds the checkpoint's values once. Each rank file ends with
    its ``head`` block: the final norm and its rows of the LM head, int8 when ``quant.lm_head_bits``
    says so (a tied head then gets its own int8 rows: the embedding is read one row per token,
    the head whole). The hub file holds the embedding, in float.

    Into an existing directory, the rank files of another split found there are removed once
    this one is written; a failed run into a directory it created leaves no directory behind.
    """
    out = Path(out_dir)
    if out.resolve() == Path(model_dir).resolve():
        raise CheckpointError(f"--out {out} is the checkpoint's own directory; write the shards to a new one")
    if is_shard_dir(model_dir):
        raise CheckpointError(f"{model_dir} is already an edgellm shard directory ({SHARD_MANIFEST}); serve it with "
                              "`edgellm serve --model`, or shard the original Hugging Face checkpoint")
    created = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, a read-only or missing place: no traceback
        raise CheckpointError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from None
    try:
        _write_shard_dir(model_dir, shards, out, dtype, progress, quant, weights, expert_bits)
    except BaseException:
        if created:
            _remove_failed_run(out, shards, created)
        raise
    _remove_stale_rank_files(out, shards)
    log.info("wrote %d rank shards to %s", len(shards), out)
    return out


def _write_shard_dir(model_dir: str | Path, shards: list[RankShard], out: Path, dtype: torch.dtype, progress: bool,
                     quant: QuantSpec | None, weights: list[float] | None,
                     expert_bits: dict[tuple[int, int], int] | None) -> None:
    world = len(shards)
    if expert_bits and quant is None:
        quant = QuantSpec(bits=None, lm_head_bits=None)  # experts as planned, everything else in float
    with Checkpoint(model_dir) as ckpt:
        cfg = ckpt.config
        meta = {"format": str(SHARD_FORMAT)} | ({"quantize": json.dumps(quant.to_dict()),
                                                 "quant_format": str(QUANT_FORMAT)} if quant else {})
        writers = [StreamingSafetensorsWriter(out / shard_file_name(s.rank, world), meta | {"shard": json.dumps(asdict(s))})
                   for s in shards]
        slice_dtype = torch.float32 if quant else dtype
        try:
            with tqdm(total=cfg.num_layers * world, desc="sharding", unit="slice", disable=not progress) as bar:
                for layer in range(cfg.num_layers):
                    for shard, writer in zip(shards, writers, strict=True):
                        # Block by block, field by field: every block is one contiguous byte range.
                        for block, fields in slice_layer(ckpt, shard, layer, slice_dtype).items():
                            if quant:
                                bits = quant.bits_for(block)
                                if expert_bits and (key := _expert_key(block)) is not None:
                                    bits = expert_bits[key]
                                fields = quantize_block(block, fields, bits, quant.group_size, dtype)
                            for name, tensor in fields.items():
                                writer.add(f"{block}.{name}", tensor)
                        bar.update(1)
            for shard, writer in zip(shards, writers, strict=True):
                for name, tensor in _head_block(ckpt, shard, dtype, quant).items():
                    writer.add(f"{HEAD_BLOCK}.{name}", tensor)
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        for writer in writers:
            writer.close()
        hub = load_hub_weights(ckpt, dtype)
        hub_writer = StreamingSafetensorsWriter(out / HUB_FILE)
        try:
            hub_writer.add("embed", hub.embed)
        except BaseException:
            hub_writer.abort()
            raise
        hub_writer.close()
    for name in SIDE_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    manifest = {"format": SHARD_FORMAT, "world_size": world, "dtype": str(dtype).removeprefix("torch."),
                "quantize": quant.to_dict() if quant else None,
                "quant_format": QUANT_FORMAT if quant else None,  # worker.kernels.quant's byte layout
                # --expert-bits auto: each routed expert's width, "layer.expert" -> bits
                "expert_bits": {f"{layer}.{e}": b for (layer, e), b in sorted(expert_bits.items())} if expert_bits
                else None,
                "weights": weights,  # the --weights of this split, for `serve` without --weights (None: not given)
                "shards": [asdict(s) | {"file": shard_file_name(s.rank, world)} for s in shards],
                # checked before a rank loads its file: a corrupted copy is refused, not computed with
                "sha256": {name: file_sha256(out / name)
                           for name in [*(shard_file_name(s.rank, world) for s in shards), HUB_FILE]}}
    (out / SHARD_MANIFEST).write_text(json.dumps(manifest, indent=2))


def _head_block(ckpt: Checkpoint, shard: RankShard, dtype: torch.dtype, quant: QuantSpec | None) -> Fields:
    """A rank's ``head`` fields: the final norm in ``dtype``, its LM head rows in int8 where
    ``quant.lm_head_bits`` asks for it (per output row: the rows of the whole head's int8), else in ``dtype``."""
    fields = head_fields(ckpt, shard, torch.float32 if quant else dtype)
    head = quantize_lm_head(fields["lm_head"]) if quant and quant.lm_head_bits else None
    return {"norm": fields["norm"].to(dtype), **(head or {"lm_head": fields["lm_head"].to(dtype)})}


def _expert_key(block: str) -> tuple[int, int] | None:
    """``layers.3.experts.5`` -> (3, 5); None for any other block."""
    parts = block.split(".")
    return (int(parts[1]), int(parts[3])) if len(parts) == 4 and parts[2] == "experts" else None


def _remove_failed_run(out: Path, shards: list[RankShard], created: list[Path]) -> None:
    """A failed run into a directory it created takes back what it wrote there, then the
    directories if they are empty: nothing is left that looks like a shard directory. Only the
    names this run writes are removed, never other files."""
    ours = [*(shard_file_name(s.rank, len(shards)) for s in shards), HUB_FILE, SHARD_MANIFEST, *SIDE_FILES]
    for name in ours:
        for path in (out / name, out / f"{name}.partial"):
            path.unlink(missing_ok=True)
    for directory in created:  # deepest first; rmdir refuses a directory that is not empty
        try:
            directory.rmdir()
        except OSError:
            break


_RANK_FILE = re.compile(r"rank-\d{2,}-of-\d{2,}\.safetensors(\.partial)?")


def _remove_stale_rank_files(out: Path, shards: list[RankShard]) -> None:
    """Rank files of an earlier run into ``out`` that this split does not use (another --ranks,
    or the ``.partial`` files of an interrupted run). The manifest just written lists only this
    split's files; the others would be taken for part of it by whoever copies the directory."""
    keep = {shard_file_name(s.rank, len(shards)) for s in shards}
    for path in sorted(out.iterdir()):
        ours = bool(_RANK_FILE.fullmatch(path.name)) or path.name == f"{HUB_FILE}.partial"
        if ours and path.name not in keep and path.is_file():
            path.unlink()
            log.info("removed %s: not part of this %d-rank split", path, len(shards))
