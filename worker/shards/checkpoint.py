"""Read-only access to a Hugging Face checkpoint directory's tensors.

Tensors are read lazily, and sliced before they are materialized (``safe_open``'s
``get_slice``), so neither sharding nor loading ever holds the whole checkpoint.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from worker.config import CheckpointError, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"



def open_safetensors(path: str | Path) -> Any:
    """``safe_open(path)``, with a truncated or foreign file reported as a ``CheckpointError``
    that names it rather than as safetensors' own error."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); is it truncated? "
                              "Copy or write it again") from None

class Checkpoint:
    """A checkpoint directory: its config and a name -> file map of its tensors."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        self.config = ModelConfig.from_dir(self.dir)
        self._files = self._tensor_files()
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def _tensor_files(self) -> dict[str, Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc})") from None
            files = {name: self.dir / fname for name, fname in weight_map.items()}
            missing = sorted({str(p) for p in files.values() if not p.is_file()})
            if missing:
                raise CheckpointError(f"{index} names files that do not exist: {', '.join(missing)}")
            return files
        single = self.dir / SINGLE_FILE
        if single.is_file():
            with open_safetensors(single) as f:
                return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        if list(self.dir.glob("*.bin")):
            raise CheckpointError(f"{self.dir}: only PyTorch .bin weights found; convert them to safetensors")
        raise CheckpointError(f"{self.dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def _handle(self, name: str) -> Any:
        try:
            path = self._files[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found in the checkpoint") from None
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(open_safetensors(path))
        return self._handles[path]

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def get_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows ``[start, end)`` of a tensor (dim 0), read without loading the rest."""
        return self._handle(name).get_slice(name)[start:end]

    def get_columns(self, name: str, start: int, end: int) -> torch.Tensor:
        """Columns ``[start, end)`` of a 2-D tensor (dim 1)."""
        return self._handle(name).get_slice(name)[:, start:end]

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
