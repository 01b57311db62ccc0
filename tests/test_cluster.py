"""Real coordinator and worker processes: explicit workers, shard files, failures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from protos.edgellm.v1 import control_pb2 as pb
from server.cli import DEFAULT_MODEL
from server.workers import ClusterError, WorkerClient
from tests.processes import EXIT_S, ROOT, START_S, edgellm, free_port, served, stop, wait_for, wait_listening

pytestmark = pytest.mark.cluster


def _complete(url: str, model: str, prompt: str = "The quick brown fox", max_tokens: int = 12) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0}, timeout=60)


def test_serve_exits_with_a_message_when_a_worker_is_missing(checkpoints) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoints("llama")), "--workers",
         f"127.0.0.1:{port}", "--connect-timeout", "2", "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "not reachable" in result.stderr
    assert "Traceback" not in result.stderr
    # the wait itself is announced once, when it begins
    waiting = f"waiting up to 2 s for worker(s) 127.0.0.1:{port} (--connect-timeout)"
    assert result.stderr.count(waiting) == 1
    assert result.stderr.index(waiting) < result.stderr.index("not reachable")


def test_a_worker_that_listens_late_is_found_through_a_new_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under emulation one readiness future, waited on for the whole --connect-timeout, once never
    saw a worker that began listening 11 s late. The wait now polls, and replaces a channel that
    has not connected for ``CHANNEL_RENEW_S`` (here shortened so that the worker, started late,
    is reached through a replaced channel)."""
    monkeypatch.setattr(WorkerClient, "CHANNEL_RENEW_S", 0.5)
    monkeypatch.setattr(WorkerClient, "READY_SLICE_S", 0.25)
    connects = []
    plain_connect = WorkerClient._connect
    monkeypatch.setattr(WorkerClient, "_connect", lambda self: (connects.append(1), plain_connect(self)))
    port = free_port()
    client = WorkerClient(f"127.0.0.1:{port}", "s3cret")
    worker = None
    try:
        with pytest.raises(ClusterError, match="not reachable"):
            client.wait_reachable(1.5)
        assert len(connects) >= 3  # the first channel and at least two replacements
        worker = edgellm("worker", "--host", "127.0.0.1", "--port", str(port), "--cluster-token", "s3cret",
                         "--threads", "1")
        client.wait_reachable(START_S)
        assert client.health().state == pb.HealthReply.IDLE  # through the channel last opened
    finally:
        client.close()
        if worker is not None:
            stop(worker)


def test_a_max_context_past_the_model_is_said_before_it_is_clamped(checkpoints) -> None:
    """It was clamped to max_position_embeddings without a word (the start then fails here, on
    the missing worker, after the warning)."""
    model = checkpoints("llama")
    positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--max-context", str(positions + 1),
         "--workers", f"127.0.0.1:{free_port()}", "--connect-timeout", "1", "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert f"--max-context {positions + 1} is more than the model's {positions} positions" in result.stderr
    assert f"serving {positions}" in result.stderr


def test_ctrl_c_while_waiting_for_a_worker_exits_at_once(checkpoints, tmp_path: Path) -> None:
    """The wait ran in a thread pool whose exit waited out the whole --connect-timeout, and then
    printed a KeyboardInterrupt traceback. (An hour here: "at once" is then anything far shorter,
    however busy the machine.)"""
    port = free_port()
    log = tmp_path / "serve.log"
    proc = edgellm("serve", "--model", str(checkpoints("llama")), "--workers", f"127.0.0.1:{port}",
                   "--connect-timeout", "3600", "--port", str(free_port()), log_path=log)
    try:
        wait_for(lambda: "waiting up to 3600 s" in log.read_text(), "serve says it waits for the worker", proc=proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=EXIT_S) == 130
    finally:
        stop(proc)
    assert "Traceback" not in log.read_text()


def test_too_many_ranks_is_refused_before_anything_starts(checkpoints) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoints("llama")), "--local-workers", "4",
         "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert result.returncode == 2 and "at most 4 ranks" in result.stderr and "Traceback" not in result.stderr


def test_shard_cli_then_serve_from_shards_with_explicit_workers(checkpoints, tmp_path: Path) -> None:
    model_dir = checkpoints("mistral")
    out = tmp_path / "mistral-3"
    result = subprocess.run([sys.executable, "-m", "server.cli", "shard", "--model", str(model_dir), "--ranks", "3",
                             "--weights", "2,1,1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=START_S)
    assert result.returncode == 0, result.stderr
    assert "sharding" in result.stderr  # the progress bar
    assert f"serve them on 3 ranks with: edgellm serve --model {out} --local-workers 2" in result.stderr
    assert len(list(out.glob("rank-*-of-03.safetensors"))) == 3

    with served(model_dir, "--model-name", "m") as url:
        expected = _complete(url, "m").json()["choices"][0]["text"]

    ports = [free_port(), free_port()]
    workers = [edgellm("worker", "--host", "127.0.0.1", "--port", str(p), "--cluster-token", "s3cret",
                       "--threads", "1") for p in ports]
    try:
        addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
        # no --weights: the split the directory was written with (2,1,1, from its manifest)
        with served(out, "--workers", addresses, "--cluster-token", "s3cret", "--model-name", "m") as url:
            assert _complete(url, "m").json()["choices"][0]["text"] == expected
    finally:
        for w in workers:
            stop(w)


def test_wrong_cluster_token_is_refused(checkpoints) -> None:
    port = free_port()
    worker = edgellm("worker", "--host", "127.0.0.1", "--port", str(port), "--cluster-token", "right")
    try:
        wait_listening(port, worker)
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoints("llama")), "--workers",
             f"127.0.0.1:{port}", "--cluster-token", "wrong", "--port", str(free_port())],
            cwd=ROOT, capture_output=True, text=True, timeout=START_S)
        assert result.returncode == 2
        assert "UNAUTHENTICATED" in result.stderr and "Traceback" not in result.stderr
        assert worker.poll() is None, "the worker must survive a bad peer"
    finally:
        stop(worker)


def _coordinator(url: str) -> psutil.Process:
    port = url.rsplit(":", 1)[1]
    return next(p for p in psutil.process_iter(["cmdline"]) if port in " ".join(p.info["cmdline"] or []))


def _kill(proc: psutil.Process) -> None:
    proc.kill()  # SIGKILL: no goodbye on any socket, like a Pi losing power
    wait_for(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, f"{proc.pid} is gone",
             EXIT_S, poll_s=0.05)


class HealthWatch(threading.Thread):
    """Polls /health and records every status code it sees, in order (bounded in time)."""

    def __init__(self, url: str, seconds: float = 2 * START_S):
        super().__init__(daemon=True)
        self.url, self.codes, self.done = url, [], threading.Event()
        self.deadline = time.monotonic() + seconds

    def run(self) -> None:
        while not self.done.is_set() and time.monotonic() < self.deadline:
            try:
                code = httpx.get(f"{self.url}/health", timeout=2).status_code
            except httpx.HTTPError:
                code = 0
            if not self.codes or self.codes[-1] != code:
                self.codes.append(code)
            time.sleep(0.05)


@pytest.mark.parametrize("plane", [["--no-lanes"], []], ids=["zeromq", "lanes"])
def test_worker_killed_mid_stream_is_restarted_and_the_stream_completes(tmp_path: Path, plane: list[str]) -> None:
    log = tmp_path / "serve.log"
    # the embedded model, 400 tokens: seconds of decoding left when the worker dies at chunk 3
    body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    # --recovery-wait: the restarted worker imports torch and loads again, which took longer than the
    # default 30 s beside a CPU hog (the request then failed instead of being replayed)
    with served(DEFAULT_MODEL, "--local-workers", "2", "--model-name", "m", "--step-timeout", "3",
                "--recovery-wait", str(START_S), *plane, log_path=log) as url:
        undisturbed = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        coordinator = _coordinator(url)
        watch = HealthWatch(url)
        watch.start()
        pieces, error = [], None
        with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=START_S) as resp:
            for i, line in enumerate(resp.iter_lines()):
                if i == 3:
                    worker = next(c for c in coordinator.children() if "worker.cli" in " ".join(c.cmdline()))
                    _kill(worker)
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]
                    break
                pieces.append(chunk["choices"][0]["text"])
        wait_for(lambda: httpx.get(f"{url}/health", timeout=60).status_code == 200, "the cluster is healthy again")
        watch.done.set()
        watch.join()
        assert coordinator.is_running()
        if error is None:
            assert "".join(pieces) == undisturbed
        else:
            assert error["code"] == "cluster_unavailable" and error["message"]
        assert 503 in watch.codes and watch.codes[-1] == 200, watch.codes
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert again == undisturbed
    text = log.read_text()
    assert "replaying 1 running sequences" in text, "the kill must have hit the request mid-stream"
    assert "Traceback" not in text
    if "--no-lanes" not in plane:  # both workers' lanes, then the restarted worker's new one
        assert text.count("data-plane lane is up") >= 3


def test_remote_worker_that_stays_dead_ends_requests_cleanly(checkpoints, tmp_path: Path) -> None:
    port = free_port()
    worker = edgellm("worker", "--host", "127.0.0.1", "--port", str(port), "--cluster-token", "t")
    log = tmp_path / "serve.log"
    try:
        with served(checkpoints("llama"), "--workers", f"127.0.0.1:{port}", "--cluster-token", "t",
                    "--model-name", "m", "--step-timeout", "2", "--recovery-wait", "2", log_path=log) as url:
            assert _complete(url, "m").status_code == 200
            _kill(psutil.Process(worker.pid))
            worker.wait(EXIT_S)
            # idle: the heartbeat finds it, /health names it
            seen: list[httpx.Response] = []
            wait_for(lambda: seen.append(httpx.get(f"{url}/health", timeout=60)) or seen[-1].status_code != 200,
                     "/health sees the rank go")
            health = seen[-1]
            assert "rank(s) [1] missing" in health.json()["detail"], health.json()
            assert _workers_up(url) == 0  # it said 1 while the rank was gone, until a request failed
            resp = _complete(url, "m")
            assert resp.status_code == 503
            assert resp.json()["error"]["code"] == "cluster_unavailable"
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and health.headers["retry-after"] == "1"  # as every 503
            assert health.json()["status"] == "degraded" and health.json()["detail"], health.json()
            assert _coordinator(url).is_running()
            # the worker comes back at the same address: the cluster repairs itself
            worker = edgellm("worker", "--host", "127.0.0.1", "--port", str(port), "--cluster-token", "t")
            wait_for(lambda: httpx.get(f"{url}/health", timeout=60).status_code == 200, "the cluster is repaired",
                     poll_s=0.2)
            assert _complete(url, "m").status_code == 200
            assert _workers_up(url) == 1
    finally:
        stop(worker)
    assert "Traceback" not in log.read_text()


def _workers_up(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("edgellm_workers_up "):
            return float(line.split()[1])
    raise AssertionError("no edgellm_workers_up in /metrics")


def test_request_queued_as_a_rank_goes_missing_ends_cleanly(checkpoints) -> None:
    """A request that was queued just before the heartbeat reported a rank gone, with nothing
    running: it waits ``recovery_wait_s`` for the rank, then ends with cluster_unavailable (it
    used to sit in the queue until the client gave up)."""
    import asyncio

    from server.engine import Engine, EngineLimits
    from server.sampler import SamplingParams
    from server.tokenizer import TextTokenizer
    from tests.harness import inprocess_cluster

    model_dir = checkpoints("llama")
    missing: set[int] = set()
    repairs: list[float] = []

    def recover(deadline: float) -> bool:
        repairs.append(deadline)
        return False  # the rank stays gone

    async def run(engine: Engine) -> list:
        req = engine.submit([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
        missing.add(1)  # the heartbeat notices only now, before the engine thread looks
        engine.start()

        async def collect() -> list:
            return [event async for event in req.stream()]

        return await asyncio.wait_for(collect(), timeout=EXIT_S)

    with inprocess_cluster(model_dir, [1.0]) as executor:
        engine = Engine(executor, TextTokenizer(model_dir), EngineLimits(max_batch=2, max_context=64,
                                                                        recovery_wait_s=0.5),
                        recover=recover, missing_ranks=lambda: set(missing))
        try:
            events = asyncio.run(run(engine))
        finally:
            engine.stop()
    assert events and events[-1].error_code == "cluster_unavailable", events
    # the gauges once kept the failed request running and the dead rank up while the engine waited
    assert engine.metrics.registry.get_sample_value("edgellm_requests_running") == 0
    assert engine.metrics.registry.get_sample_value("edgellm_workers_up") == 0
    assert repairs, "the engine must have tried to bring the rank back"
    assert engine.error and "did not come back" in engine.error


def test_a_worker_named_twice_is_refused_at_once() -> None:
    """(It once waited ~30 s for a second rank the one worker could never be, then blamed the token.)"""
    from tests.processes import ROOT

    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--workers", "127.0.0.1:9,127.0.0.1:9"],
                            cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert result.returncode == 2
    assert "--workers names 127.0.0.1:9 more than once" in result.stderr and "Traceback" not in result.stderr


def test_a_rank_stopped_mid_step_leaves_at_once_and_closes_its_own_socket(checkpoints) -> None:
    """A rank whose hub vanished mid-step (the coordinator was killed) is stopped by the next
    coordinator's Configure. It used to wait 5 s, close the ZeroMQ socket under the step
    thread, which was still waiting for the hub (``ZMQError: Socket operation on non-socket``),
    and keep that thread and its weights alive until the 30 s step timeout."""
    from worker.comm.collective import StarHub
    from worker.config import ModelConfig
    from worker.rank.runtime import RankSpec, WorkerRank
    from worker.shards.sharding import plan_shards

    model_dir = checkpoints("llama")
    config = ModelConfig.from_dir(model_dir)
    shards = plan_shards(config, [1.0, 1.0])
    hub = StarHub(2, token="t", timeout_s=120)
    rank = WorkerRank(RankSpec(str(model_dir), config, shards[1], 2, 32), hub.address, "t", timeout_s=120)
    try:
        joining = threading.Thread(target=rank.start)
        joining.start()
        hub.wait_for_ranks(120)
        joining.join()
        spans = torch.tensor([[0, 0, 3]], dtype=torch.int64)
        hub.start_step(spans, torch.randn(3, config.hidden_size))  # the rank computes, then waits for the hub
        wait_for(lambda: rank.steps > 0 or rank.link._seq > 0, "the rank computes its step", poll_s=0.01)
        assert rank.link._seq >= 1, "the rank never reached its first allreduce"
        rank.stop()
        assert not rank.running, "stop() returned while the step thread still waits for the hub"
        assert rank.link.sock.closed
    finally:
        rank.stop()
        hub.close()


def test_a_second_coordinator_cannot_take_a_worker_in_use_but_a_dead_ones_can(checkpoints, tmp_path: Path) -> None:
    """`serve --workers X` while another coordinator serves with X used to reconfigure X: the
    first cluster then answered 500s while its /health said ok. Now X refuses; once the first
    coordinator is killed (no goodbye), X says so in its log, is let go, and a new coordinator
    starts on it."""
    model_dir = checkpoints("llama")
    port = free_port()
    address = f"127.0.0.1:{port}"
    worker_log = tmp_path / "worker.log"
    worker = edgellm("worker", "--host", "127.0.0.1", "--port", str(port), "--cluster-token", "s3cret",
                     "--threads", "1", log_path=worker_log)
    common = ("--workers", address, "--cluster-token", "s3cret", "--model-name", "m")
    try:
        with served(model_dir, *common) as url:
            expected = _complete(url, "m").json()["choices"][0]["text"]
            second = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), *common,
                                     "--threads", "1", "--port", str(free_port())],
                                    cwd=ROOT, capture_output=True, text=True, timeout=START_S)
            assert second.returncode != 0
            assert "serves rank 1 of a running cluster" in second.stderr, second.stderr[-2000:]
            assert "Traceback" not in second.stderr, second.stderr[-4000:]  # seen once (a thread's, "(_run)")
            after = _complete(url, "m")
            assert after.status_code == 200 and after.json()["choices"][0]["text"] == expected
            _kill(_coordinator(url))
        wait_for(lambda: "lost the hub" in worker_log.read_text(), "the worker notices its hub is gone", proc=worker)
        assert "rank 1: lost the hub" in worker_log.read_text()
        with served(model_dir, *common) as url:
            assert _complete(url, "m").json()["choices"][0]["text"] == expected
    finally:
        stop(worker)

