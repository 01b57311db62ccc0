"""Reading a cluster description (``nodes.yaml``) into ``Node``s; the first node is the coordinator.

    nodes:
      - file: coordinator.yaml      # the output of `edgellm probe` on that machine
      - profile: pi5                # a built-in profile (planner/profiles/pi5.yaml)
        count: 3                    # the same machine three times
        name: pi                    # entries may override any field of the profile
      - {name: laptop, matvec_gb_s: {float32: 12}, matmul_gflop_s: {float32: 60}, memory_bytes: 8e9}

A file holding a single probe output (a mapping with ``matvec_gb_s``) is a 1-node cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from planner.model import Node, PlanError

PROFILES = Path(__file__).resolve().parent / "profiles"


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML ({exc})") from None


def _entry(raw: Any, base: Path) -> list[Node]:
    if not isinstance(raw, dict):
        raise PlanError(f"a node entry must be a mapping, got {raw!r}")
    raw = dict(raw)
    count = int(raw.pop("count", 1))
    merged: dict[str, Any] = {}
    if "profile" in raw:
        name = str(raw.pop("profile"))
        path = PROFILES / f"{name}.yaml" if (PROFILES / f"{name}.yaml").is_file() else base / name
        if not path.is_file():
            raise PlanError(f"unknown profile {name!r}; built-in: {', '.join(builtin_profiles())}")
        merged = dict(_read_yaml(path))
    if "file" in raw:
        merged = dict(_read_yaml(base / str(raw.pop("file"))))
    merged |= raw
    node = Node.from_dict(merged)
    if count == 1:
        return [node]
    return [Node.from_dict({**merged, "name": f"{node.name}-{i}"}) for i in range(count)]


def load_nodes(path: str | Path) -> list[Node]:
    path = Path(path)
    raw = _read_yaml(path)
    if isinstance(raw, dict) and "nodes" in raw:
        raw = raw["nodes"]
    elif isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise PlanError(f"{path}: expected a list of nodes (or a mapping with 'nodes:')")
    return [node for entry in raw for node in _entry(entry, path.parent)]
