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

import difflib
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
    except yaml.YAMLError as exc:  # one line, naming the file and where (not "<unicode string>")
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise PlanError(f"{path}{where}: not valid YAML ({problem})") from None


MEMORY_KEYS = ("memory_budget_bytes", "memory_available_bytes", "memory_bytes")  # the first given wins
ENTRY_KEYS = ("profile", "file", "count", "name")  # an entry's own keys; the rest override node fields


def _mapping(path: Path) -> dict[str, Any]:
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: expected a mapping of node fields (an `edgellm probe` output or a profile)")
    return raw


def _count(raw: Any, entry: str) -> int:
    """``count`` of an entry: a positive integer (``two``, 2.5 or 0 would otherwise raise a
    traceback or silently drop the entry)."""
    try:
        count = int(str(raw))  # 3 and "3"; not "two", 2.5 or True
    except ValueError:
        count = 0
    if count <= 0:
        raise PlanError(f"node entry {entry}: count must be a positive integer, got {raw!r}")
    return count


def _entry(raw: Any, base: Path, index: int) -> list[Node]:
    if not isinstance(raw, dict):
        raise PlanError(f"node entry {index} must be a mapping, got {raw!r}")
    raw = dict(raw)
    label = raw.get("name") or raw.get("profile") or raw.get("file")
    entry = f"{index} ({label!r})" if label is not None else str(index)
    for key in raw:  # a misspelt `cout: 3` was dropped silently: one node planned instead of three
        if key not in ENTRY_KEYS and (near := difflib.get_close_matches(str(key), ENTRY_KEYS, n=1, cutoff=0.7)):
            raise PlanError(f"node entry {entry}: unknown key {key!r}; did you mean {near[0]!r}?")
    if not ({"profile", "file"} & raw.keys()) and "matvec_gb_s" not in raw:
        raise PlanError(f"node entry {entry} needs `profile:` (built-in: {', '.join(builtin_profiles())}), "
                        f"`file:` (an `edgellm probe` output) or its measured fields (matvec_gb_s, ...)")
    count = _count(raw.pop("count", 1), entry)
    merged: dict[str, Any] = {}
    if "profile" in raw:
        name = str(raw.pop("profile"))
        path = PROFILES / f"{name}.yaml" if (PROFILES / f"{name}.yaml").is_file() else base / name
        if not path.is_file():
            raise PlanError(f"unknown profile {name!r}; built-in: {', '.join(builtin_profiles())}")
        merged = dict(_mapping(path))
    if "file" in raw:
        merged = dict(_mapping(base / str(raw.pop("file"))))
    if any(k in raw for k in MEMORY_KEYS):
        # the entry's memory figure replaces the profile's: `memory_bytes: 4e9` on a profile with
        # `memory_available_bytes` (which wins over it) must not be silently ignored
        merged = {k: v for k, v in merged.items() if k not in MEMORY_KEYS}
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
    return [node for i, entry in enumerate(raw, 1) for node in _entry(entry, path.parent, i)]
