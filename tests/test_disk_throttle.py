"""bench/disk_throttle.py: the benches' capped disk really caps this process's reads, follows it
into the processes it starts, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import disk_throttle  # noqa: E402

MB = 1_000_000


def _usable(path: Path) -> str | None:
    """Why the cap cannot be tried here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        with disk_throttle.capped_reads(path, 1000):  # a read-only /sys/fs/cgroup (a container) refuses here
            pass
    except disk_throttle.ThrottleUnavailable as exc:
        return str(exc)
    return None


def _direct_read(path: Path) -> int:
    """Read ``path`` with O_DIRECT (past the page cache, as the expert cache reads); bytes read."""
    import mmap

    buffer = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    total = 0
    try:
        while n := os.readv(fd, [buffer]):
            total += n
    finally:
        os.close(fd)
    return total


@pytest.fixture
def data(tmp_path: Path) -> Path:
    if reason := _usable(tmp_path):
        pytest.skip(f"no disk cap here: {reason}")
    path = tmp_path / "data"
    path.write_bytes(os.urandom(8 * MB))
    os.sync()
    return path


def test_reads_are_capped_in_this_process_and_its_children_and_the_cgroup_is_removed(data: Path) -> None:
    tree = disk_throttle.hierarchy()
    home = tree.current_group()
    with disk_throttle.capped_reads(data, 4) as device:
        group = tree.mount / f"{disk_throttle.GROUP_NAME}-{os.getpid()}"
        assert device in tree.cap_file(group).read_text()
        assert tree.current_group() == group
        child = subprocess.run(["cat", "/proc/self/cgroup"], capture_output=True, text=True, check=True).stdout
        assert f"{disk_throttle.GROUP_NAME}-{os.getpid()}" in child
        start = time.perf_counter()
        assert _direct_read(data) == 8 * MB
        seconds = time.perf_counter() - start
    # A floor the kernel enforces, not a speed measured: 8 MB at 4 MB/s cannot take under 2 s
    # (blk-throttle lets a slice's worth, a fraction of a second, through at once). A machine only
    # makes it slower; without the cap this read took 0.01-0.05 s here.
    assert seconds > 1.0
    assert tree.current_group() == home
    assert not group.exists()


def test_a_file_on_no_block_device_is_refused_with_the_reason() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    with pytest.raises(disk_throttle.ThrottleUnavailable, match="no block device"), \
            disk_throttle.capped_reads(shm, 100):
        pass


def test_a_speed_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"), disk_throttle.capped_reads(tmp_path, 0):
        pass


