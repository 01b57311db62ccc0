from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # AMX faults on this VM
# Native kernels compile into a directory of this run (inherited by every process it starts),
# not the user's ~/.cache: each run builds them once, as a fresh machine does.
if "EDGELLM_KERNEL_CACHE" not in os.environ:
    os.environ["EDGELLM_KERNEL_CACHE"] = _kernels = tempfile.mkdtemp(prefix="edgellm-kernels-")
    atexit.register(shutil.rmtree, _kernels, ignore_errors=True)

# A test suite started in the background (`nohup .ci/run &`, a CI runner's job) inherits SIGINT
# ignored, and so does every process it starts: Python then installs no KeyboardInterrupt, and the
# tests that press Ctrl-C on a server waited 120 s for an exit that never came (session 30). A
# handler of this process's own is reset to the default at exec, so the servers get Ctrl-C back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tests.tiny_models import build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """Lazily built tiny checkpoints, one directory per architecture name."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_checkpoint(tmp_path_factory.mktemp(arch), arch)
        return built[arch]

    return get


# The files that take minutes and mostly wait (on qemu, on dockerd) start first, so that
# `make test`'s two pytest processes (pytest-xdist, a file at a time, in this order) run them
# beside the rest instead of after it.
STARTED_FIRST = ("test_arm64.py", "test_docker.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow files first (``STARTED_FIRST``), the order within a file kept. Under pytest 9, schemathesis 4's generated items (one per API operation, named
    ``test[GET /path]``) all get the test function's node id, and pytest-xdist, which schedules a
    file's items by node id, ran one of test_schema's nine and dropped the rest without a word.
    Each gets the id its name says (``test_every_operation_was_exercised`` fails if any is lost)."""
    items.sort(key=lambda item: item.path.name not in STARTED_FIRST)
    for item in items:
        if "[" in item.name and "[" not in item.nodeid:
            function, _, params = item.name.partition("[")
            item._id = item.parent.id.child(function).with_params(params.removesuffix("]"))  # type: ignore[union-attr]
