"""One bench script run on two revisions of edgellm, interleaved, as JSON: is the change a regression?

    .venv/bin/python bench/compare_revisions.py --base REV [--head REV] [--rounds 3] [--metric REGEX]
                                                -- bench/quant.py --shapes small --agree-tokens 10

Why: this machine's speed drifts by tens of percent within minutes (other processes, thermal and
cache state), so a number measured before a change and one measured after it, minutes apart,
say little. Here each round runs the script once on each revision, ABBA order (the side that runs
second alternates), and the result compares medians over rounds.

``--base`` and ``--head`` are git revisions checked out into temporary worktrees (``--head``
defaults to this working tree, uncommitted changes included). Both run with this interpreter and
its installed packages, with ``PYTHONPATH`` set to the revision's tree, so only edgellm's own code
differs. The script must take ``--out FILE`` and write its JSON there, as every ``bench/`` script
does (``bench/report.py``). Every numeric leaf whose path matches ``--metric`` is reported:
``base`` and ``head`` (median over rounds), their spread (min, max), and ``ratio`` = head / base
median, where above 1 is faster for a rate (tok/s) and slower for a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402  (bench/ is sys.path[0] when run as a script)

log = logging.getLogger("bench.compare_revisions")
REPO = Path(__file__).resolve().parents[1]


def numeric_leaves(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(slash-separated path, number) of every int or float in a JSON value (booleans excluded)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numeric_leaves(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numeric_leaves(item, f"{path}/{index}")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, float(value)


def compare(runs: dict[str, list[Any]], metric: str) -> dict[str, dict[str, Any]]:
    """Per matching path: each side's median and range over its runs, and head / base."""
    pattern = re.compile(metric)
    values: dict[str, dict[str, list[float]]] = {}
    for side, results in runs.items():
        for result in results:
            for path, number in numeric_leaves(result):
                if pattern.search(path):
                    values.setdefault(path, {}).setdefault(side, []).append(number)
    table: dict[str, dict[str, Any]] = {}
    for path, sides in sorted(values.items()):
        if set(sides) != {"base", "head"}:
            continue  # only one revision reports it: nothing to compare
        base, head = statistics.median(sides["base"]), statistics.median(sides["head"])
        table[path] = {"base": base, "head": head, "base_range": [min(sides["base"]), max(sides["base"])],
                       "head_range": [min(sides["head"]), max(sides["head"])],
                       "ratio": round(head / base, 3) if base else None}
    return table


@contextlib.contextmanager
def checkout(rev: str | None, parent: Path) -> Iterator[Path]:
    """The tree of ``rev`` (a temporary detached worktree), or this working tree for None."""
    if rev is None:
        yield REPO
        return
    tree = parent / re.sub(r"[^A-Za-z0-9_.-]", "_", rev)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), rev], check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def run_once(tree: Path, script: list[str], out: Path, timeout_s: float) -> Any:
    """The script's JSON, run in ``tree`` with that tree first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / script[0]), *script[1:], "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision measured as the baseline")
    parser.add_argument("--head", default=None, help="git revision compared with it (default: this working tree)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of the script per revision, interleaved")
    parser.add_argument("--metric", default=r"tok_s|tokens_per_s",
                        help="regular expression: the JSON paths to compare (default: rates in tok/s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run of the script may take")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- then the bench script and its arguments")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the bench script after --, e.g. -- bench/quant.py --shapes small")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    runs: dict[str, list[Any]] = {"base": [], "head": []}
    loads = []
    with tempfile.TemporaryDirectory(prefix="compare-revisions-") as tmp, \
            checkout(args.base, Path(tmp)) as base_tree, checkout(args.head, Path(tmp)) as head_tree:
        trees = {"base": base_tree, "head": head_tree}
        for round_index in range(args.rounds):
            order = ("base", "head") if round_index % 2 == 0 else ("head", "base")
            for side in order:
                out = Path(tmp) / f"{side}-{round_index}.json"
                runs[side].append(run_once(trees[side], script, out, args.timeout))
                loads.append(os.getloadavg()[0])
                log.info("round %d: %s done (load %.1f)", round_index + 1, side, loads[-1])
    emit({"script": script, "base": args.base, "head": args.head or "working tree", "rounds": args.rounds,
          "load_average_1min": [min(loads), max(loads)], "metrics": compare(runs, args.metric)}, args.out)


if __name__ == "__main__":
    main()
