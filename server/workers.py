"""The coordinator's handles on its workers: gRPC clients, and the local worker processes that
``serve --local-workers`` spawns and keeps alive."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from protos.edgellm.v1 import control_pb2 as pb
from protos.edgellm.v1 import control_pb2_grpc as pb_grpc
from worker.rank.service import TOKEN_METADATA_KEY

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 10.0


class ClusterError(RuntimeError):
    """The cluster cannot be started or repaired; the message names the worker and the reason."""


class WorkerClient:
    # A wait for a worker to come up polls in slices with a fresh readiness future each, and
    # replaces a channel that has not connected for a while: once (under emulation, with the worker
    # listening 11 s late) one future waited on for the whole timeout never saw the channel connect.
    READY_SLICE_S = 2.0
    CHANNEL_RENEW_S = 20.0

    def __init__(self, address: str, token: str):
        self.address = address
        self._connect()
        self._meta = ((TOKEN_METADATA_KEY, token),)

    def _connect(self) -> None:
        # reconnect fast: a restarted worker should be found in a second, not after gRPC's
        # default backoff of up to two minutes
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)])
        self.stub = pb_grpc.WorkerStub(self.channel)

    def _call(self, what: str, fn: Callable, request: object, timeout: float | None = RPC_TIMEOUT_S) -> object:
        try:
            return fn(request, metadata=self._meta, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "ERROR"
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise ClusterError(f"worker {self.address}: {what} failed ({code}): {detail}") from None

    def health(self, timeout: float = RPC_TIMEOUT_S) -> pb.HealthReply:
        return self._call("health check", self.stub.Health, pb.HealthRequest(), timeout)  # type: ignore[return-value]

    def is_ready(self, timeout: float = 1.0) -> bool:
        """In the data plane right now (False when unreachable)."""
        try:
            return self.health(timeout).state == pb.HealthReply.READY
        except ClusterError:
            return False

    def wait_reachable(self, timeout_s: float, waited_s: float | None = None) -> None:
        """``waited_s``: the whole wait to report (the caller's deadline), if not ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        renew_at = time.monotonic() + self.CHANNEL_RENEW_S
        while not self._ready_within(min(self.READY_SLICE_S, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise ClusterError(f"worker {self.address} is not reachable (nothing answered within "
                                   f"{waited_s or timeout_s:.0f} s; is `edgellm worker` running there?)")
            if time.monotonic() >= renew_at:
                log.debug("worker %s: not connected after %g s, opening a new channel", self.address,
                          self.CHANNEL_RENEW_S)
                self.channel.close()
                self._connect()
                renew_at = time.monotonic() + self.CHANNEL_RENEW_S
        self.health()

    def _ready_within(self, timeout_s: float) -> bool:
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=max(0.0, timeout_s))
            return True
        except grpc.FutureTimeoutError:
            ready.cancel()
            return False

    def configure(self, request: pb.ConfigureRequest) -> None:
        self._call("configure", self.stub.Configure, request)

    def load(self, on_progress: Callable[[int, int], None], abandoned: threading.Event | None = None) -> None:
        """Load, reporting (layers loaded, total); a fetch of the model is logged every 10%.
        ``abandoned`` set before the call is made (``cancel_load`` came too early to see it)
        cancels it at once."""
        stream = self._call("load", self.stub.Load, pb.LoadRequest(), timeout=None)
        self._load_call = stream
        if abandoned is not None and abandoned.is_set():
            stream.cancel()  # type: ignore[attr-defined]
        logged_tenth = -1
        reported = -1
        try:
            for update in stream:  # type: ignore[attr-defined]
                if update.bytes_total:
                    tenth = 10 * update.bytes_fetched // update.bytes_total
                    if tenth != logged_tenth:
                        logged_tenth = tenth
                        log.info("worker %s: fetched %.1f of %.1f MB of the model", self.address,
                                 update.bytes_fetched / 1e6, update.bytes_total / 1e6)
                    continue
                if update.layers_loaded != reported:  # the final "ready" update repeats the last count
                    reported = update.layers_loaded
                    on_progress(update.layers_loaded, update.layers_total)
        except grpc.RpcError as exc:
            raise ClusterError(f"worker {self.address}: load failed: {exc.details()}") from None

    def cancel_load(self) -> None:
        """Stop waiting for a Load in flight (another rank failed: the cluster will not start)."""
        if call := getattr(self, "_load_call", None):
            call.cancel()

    def stats(self) -> pb.StatsReply:
        return self._call("stats", self.stub.Stats, pb.StatsRequest(), timeout=2.0)  # type: ignore[return-value]

    def shutdown(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.stub.Shutdown(pb.ShutdownRequest(), metadata=self._meta, timeout=2)

    def close(self) -> None:
        self.channel.close()


def check_workers(addresses: list[str], token: str, timeout_s: float,
                  waiting_for: str = "(--connect-timeout)") -> list[WorkerClient]:
    """Connect to every worker, failing fast with the address of the first that is missing. Those
    not up within half a second are named in the log before the wait (up to ``timeout_s``, which
    ``waiting_for`` explains there). The channels connect in the background, so waiting for them
    one by one against one deadline waits no longer than at once, and in the calling thread:
    Ctrl-C ends it (a thread pool's exit waited for every worker's full timeout first)."""
    clients = [WorkerClient(a, token) for a in addresses]
    deadline = time.monotonic() + 0.5
    late = [c.address for c in clients if not c._ready_within(deadline - time.monotonic())]
    if late:
        log.info("waiting up to %g s for worker(s) %s %s", timeout_s, ", ".join(late), waiting_for)
    deadline = time.monotonic() + timeout_s
    for client in clients:
        client.wait_reachable(max(0.0, deadline - time.monotonic()), timeout_s)
    return clients


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalWorker:
    """A worker process on loopback, started (and restarted) by the coordinator."""

    def __init__(self, token: str, threads: int | None, extra_args: list[str] | None = None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._cmd = [sys.executable, "-m", "worker.cli", "--host", "127.0.0.1", "--port", str(self.port),
                     *(["--threads", str(threads)] if threads else []), *(extra_args or [])]
        self._env = dict(os.environ, EDGELLM_CLUSTER_TOKEN=token, EDGELLM_PARENT_PID=str(os.getpid()))
        self.restarts = 0
        self.shutting_down = False  # set when the coordinator exits: a worker that dies is not restarted
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self._cmd, env=self._env, cwd=str(Path(__file__).resolve().parents[1]))

    def restart_if_dead(self) -> bool:
        """Start the process again if it has exited; True when it did. Not while the coordinator
        shuts down: a SIGTERM to the process group (``timeout``, ``docker stop``, systemd) reaches
        the workers too, and respawning them then would load torch for nothing."""
        if self.proc.poll() is None or self.shutting_down:
            return False
        log.warning("local worker %s exited with %s; restarting it", self.address, self.proc.returncode)
        self.restarts += 1
        self.proc = self._spawn()
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
