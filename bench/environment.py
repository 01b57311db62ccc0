"""What a benchmark run ran on, recorded beside its numbers: date, machine, versions, commit, load.

Numbers of a shared machine move from minute to minute, so a table without the machine, the
commit and how busy the machine was cannot be read; ``bench/run_all.py`` writes this into
``environment.json`` of every run and ``bench/tables.py`` prints it above the tables.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str:
    """HEAD's commit, with ``+dirty`` when tracked files differ from it (numbers of uncommitted code)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def describe(argv: list[str]) -> dict[str, Any]:
    """The run's environment, taken when it starts."""
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpu_model": cpu_model(),
            "cpus": os.cpu_count(), "memory_gib": memory_gib(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": _version("torch"),
            "transformers": _version("transformers"), "pyzmq": _version("pyzmq"), "commit": git_commit(),
            "load_average_start": load_average(), "command": " ".join(["bench/run_all.py", *argv[1:]])}


if __name__ == "__main__":
    import argparse

    from report import emit

    parser = argparse.ArgumentParser(description="print the environment a benchmark run records, as JSON")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    emit(describe(sys.argv[:1]), parser.parse_args().out)
