from __future__ import annotations

import atexit
import os
import shutil
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
