"""A disk of a chosen speed for the I/O benches: this process, its threads and the processes it
starts go into a block-I/O cgroup whose reads from the disk holding a file are capped at
``--disk-mbps`` MB/s by the kernel's own throttle.

Why: users stream experts from a Raspberry Pi's SD card (about 90 MB/s), a USB 3 SSD (about
350 MB/s) or an NVMe drive (about 400-900 MB/s on a Pi 5), while this VM's disk gave 360-3800 MB/s
from one run to the next. A bench on a capped disk reads the same real bytes through the same
code, at a steady speed that a user's device has; which of prefetch and on demand wins depends on
how reading compares with compute (docs/moe-streaming.md), so the speed has to be chosen, not
inherited from whatever the host's disk does that minute.

Needs root and the block-I/O controller: cgroup v2's ``io.max`` (where the unified hierarchy has
the ``io`` controller) or v1's ``blkio.throttle.read_bps_device``. The cap is on the whole disk
(partitions are throttled through their disk); a file on no block device (tmpfs, overlayfs) cannot
be capped and is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP_NAME = "edgellm-bench-disk"


class ThrottleUnavailable(RuntimeError):
    """The cap cannot be set here (not root, no block-I/O controller, a file on no block device)."""


def whole_disk(path: Path) -> str:
    """``MAJ:MIN`` of the disk (not the partition) that holds ``path``: blk-throttle caps disks."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sys_dir = Path("/sys/dev/block") / device
    if not sys_dir.exists():
        raise ThrottleUnavailable(f"{path} is on device {device}, which is no block device (tmpfs, overlayfs?)")
    if (sys_dir / "partition").exists():  # /sys/dev/block/MAJ:MIN -> .../vda/vda1; the disk is the parent
        return (sys_dir.resolve().parent / "dev").read_text().strip()
    return device


@dataclass(frozen=True)
class Hierarchy:
    """Where the block-I/O controller is mounted and how a read cap is written in it."""

    mount: Path  # the controller's hierarchy (v1: .../blkio; v2: the unified mount)
    v2: bool

    def cap_file(self, group: Path) -> Path:
        return group / ("io.max" if self.v2 else "blkio.throttle.read_bps_device")

    def cap_line(self, device: str, bytes_per_s: int) -> str:
        return f"{device} rbps={bytes_per_s}" if self.v2 else f"{device} {bytes_per_s}"

    def current_group(self) -> Path:
        """This process's cgroup in this hierarchy, from ``/proc/self/cgroup``."""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (self.v2 and controllers == "") or (not self.v2 and "blkio" in controllers.split(",")):
                return self.mount / path.lstrip("/")
        raise ThrottleUnavailable("/proc/self/cgroup names no block-I/O cgroup of this process")


def hierarchy() -> Hierarchy:
    """The block-I/O controller's hierarchy: cgroup v2 where it holds ``io``, else v1's ``blkio``."""
    for mount in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        controllers = mount / "cgroup.controllers"
        if controllers.exists() and "io" in controllers.read_text().split():
            return Hierarchy(mount, v2=True)
    if (CGROUP_ROOT / "blkio" / "blkio.throttle.read_bps_device").exists():
        return Hierarchy(CGROUP_ROOT / "blkio", v2=False)
    raise ThrottleUnavailable("no block-I/O cgroup controller here (neither v2's io nor v1's blkio)")


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise ThrottleUnavailable(f"cannot write {text!r} to {path}: {exc} (root is needed)") from exc


def _remove_stale_groups(tree: Hierarchy) -> None:
    """Remove the cgroups of benches that were killed before they could (their pid is gone)."""
    for group in tree.mount.glob(f"{GROUP_NAME}-*"):
        pid = group.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                group.rmdir()
            except OSError as exc:  # still holds a process
                log.warning("left the stale cgroup %s in place: %s", group, exc)


@contextmanager
def capped_reads(path: Path, mb_per_s: float) -> Iterator[str]:
    """Within: reads of this process (and of processes it starts) from the disk holding ``path``
    are capped at ``mb_per_s`` (10^6 bytes a second). Yields the disk's ``MAJ:MIN``. On exit the
    process goes back to its own cgroup and the bench's cgroup is removed."""
    if mb_per_s <= 0:
        raise ValueError(f"a disk speed must be positive, not {mb_per_s} MB/s")
    device = whole_disk(path)
    tree = hierarchy()
    _remove_stale_groups(tree)
    home = tree.current_group()
    group = tree.mount / f"{GROUP_NAME}-{os.getpid()}"
    if tree.v2:  # the root may hold processes; a child's io.max needs the io controller handed down
        _write(tree.mount / "cgroup.subtree_control", "+io")
    try:
        group.mkdir(exist_ok=True)
    except OSError as exc:
        raise ThrottleUnavailable(f"cannot make the cgroup {group}: {exc} (root is needed)") from exc
    try:
        _write(tree.cap_file(group), tree.cap_line(device, round(mb_per_s * 1e6)))
        _write(group / "cgroup.procs", str(os.getpid()))  # every thread of the process moves with it
        log.info("reads from disk %s capped at %.0f MB/s (%s)", device, mb_per_s, group)
        try:
            yield device
        finally:
            _write(home / "cgroup.procs", str(os.getpid()))
    finally:
        try:
            group.rmdir()
        except OSError as exc:  # a child process still in it: the kernel removes nothing in use
            log.warning("left the cgroup %s in place: %s", group, exc)
