"""bench/compare_revisions.py: a bench script run on two revisions, interleaved, compared by median."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from compare_revisions import compare, numeric_leaves  # noqa: E402


def test_numeric_leaves_are_every_number_by_path_and_no_boolean() -> None:
    value = {"a": {"tok_s": 3, "ok": True, "name": "x"}, "b": [1.5, {"c": 2}]}
    assert list(numeric_leaves(value)) == [("/a/tok_s", 3.0), ("/b/0", 1.5), ("/b/1/c", 2.0)]


def test_compare_takes_medians_per_side_and_skips_what_one_side_lacks() -> None:
    runs: dict[str, list[Any]] = {"base": [{"fp32": {"tok_s": 100}, "old": {"tok_s": 1}}, {"fp32": {"tok_s": 140}}, {"fp32": {"tok_s": 90}}],
            "head": [{"fp32": {"tok_s": 120}, "seconds": 9}, {"fp32": {"tok_s": 300}}, {"fp32": {"tok_s": 110}}]}
    table = compare(runs, r"tok_s")
    assert list(table) == ["/fp32/tok_s"]  # /old/tok_s is the base's only; /seconds does not match
    row = table["/fp32/tok_s"]
    assert (row["base"], row["head"]) == (100, 120)
    assert row["base_range"] == [90, 140] and row["head_range"] == [110, 300]
    assert row["ratio"] == pytest.approx(1.2)


def test_a_script_run_on_two_revisions(tmp_path: Path) -> None:
    """End to end on this repository: HEAD against the working tree, a bench script that takes
    --out (bench/environment.py records the machine), one round each."""
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_revisions.py"), "--base", "HEAD",
                           "--rounds", "2", "--metric", "cpus", "--out", str(out), "--", "bench/environment.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["base"] == "HEAD" and result["head"] == "working tree" and result["rounds"] == 2
    (path, row), = result["metrics"].items()
    assert path.endswith("cpus") and row["base"] == row["head"] >= 1 and row["ratio"] == 1.0
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "compare-revisions-" not in worktrees  # the temporary checkout is gone
