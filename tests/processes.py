"""Start real `edgellm` processes on loopback ports for the cluster and API tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edgellm(*args: str, log_path: Path | None = None, own_process_group: bool = False) -> subprocess.Popen:
    """``own_process_group``: the process leads a new group (as under ``timeout``, ``docker stop``
    or systemd), so a signal to the group reaches it and every worker it spawns."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (owned by the process)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=own_process_group)


# Upper bounds for waiting on an event, not expected durations: on a busy machine (2 cores shared
# with other heavy processes) a process that starts torch can take a minute before its first line.
START_S = 300.0  # a process starts and says what the test waits for
EXIT_S = 120.0  # a process asked to stop has exited


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = START_S, poll_s: float = 0.1,
             proc: subprocess.Popen | None = None) -> None:
    """Poll until ``condition()`` holds; fail naming ``what`` after ``timeout_s``, or at once when
    ``proc`` exits first (it will never say it then)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not after {timeout_s:g} s: {what}")
        time.sleep(poll_s)


def wait_listening(port: int, proc: subprocess.Popen | None = None, timeout_s: float = START_S) -> None:
    """Until something accepts TCP connections on 127.0.0.1:``port``."""

    def accepts() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return True
        except OSError:
            return False

    wait_for(accepts, f"127.0.0.1:{port} accepts connections", timeout_s, proc=proc)


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = START_S, log_path: Path | None = None,
                 poll_s: float = 0.3) -> None:
    """Return once ``url/health`` answers 200; fail at once if ``proc`` exits first, and at
    ``timeout_s``. ``log_path``: the server's log, whose tail the failure then shows."""
    def tail() -> str:
        return f":\n{log_path.read_text()[-4000:]}" if log_path is not None and log_path.exists() else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy{tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=max(2.0, poll_s * 5)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s{tail()}")


def stop(proc: subprocess.Popen, timeout_s: float = EXIT_S) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def served(model_dir: Path, *extra: str, log_path: Path | None = None) -> Iterator[str]:
    """``edgellm serve`` on a free port; yields its base URL once healthy."""
    port = free_port()
    proc = edgellm("serve", "--model", str(model_dir), "--port", str(port), "--threads", "1", *extra,
                   log_path=log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        stop(proc)
