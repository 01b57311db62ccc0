"""Real coordinator and worker processes: explicit workers, shard files, failures."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.processes import ROOT, edgellm, free_port, served, stop

pytestmark = pytest.mark.cluster


def _complete(url: str, model: str, prompt: str = "The quick brown fox", max_tokens: int = 12) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0}, timeout=60)


def test_serve_exits_with_a_message_when_a_worker_is_missing(checkpoints) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoints("llama")), "--workers",
         f"127.0.0.1:{port}", "--connect-timeout", "2", "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "not reachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_too_many_ranks_is_refused_before_anything_starts(checkpoints) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoints("llama")), "--local-workers", "4",
         "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "at most 4 ranks" in result.stderr and "Traceback" not in result.stderr


def test_shard_cli_then_serve_from_shards_with_explicit_workers(checkpoints, tmp_path: Path) -> None:
    model_dir = checkpoints("mistral")
    out = tmp_path / "mistral-3"
    result = subprocess.run([sys.executable, "-m", "server.cli", "shard", "--model", str(model_dir), "--ranks", "3",
                             "--weights", "2,1,1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sharding" in result.stderr  # the progress bar
    assert len(list(out.glob("rank-*-of-03.safetensors"))) == 3

    with served(model_dir, "--model-name", "m") as url:
        expected = _complete(url, "m").json()["choices"][0]["text"]

    ports = [free_port(), free_port()]
    workers = [edgellm("worker", "--host", "127.0.0.1", "--port", str(p), "--cluster-token", "s3cret",
                       "--threads", "1") for p in ports]
    try:
        addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
        with served(out, "--workers", addresses, "--weights", "2,1,1", "--cluster-token", "s3cret",
                    "--model-name", "m") as url:
            assert _complete(url, "m").json()["choices"][0]["text"] == expected
    finally:
        for w in workers:
            stop(w)


def test_wrong_cluster_token_is_refused(checkpoints) -> None:
    port = free_port()
    worker = edgellm("worker", "--host", "127.0.0.1", "--port", str(port), "--cluster-token", "right")
    try:
        time.sleep(0.5)
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoints("llama")), "--workers",
             f"127.0.0.1:{port}", "--cluster-token", "wrong", "--port", str(free_port())],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert "UNAUTHENTICATED" in result.stderr and "Traceback" not in result.stderr
        assert worker.poll() is None, "the worker must survive a bad peer"
    finally:
        stop(worker)


def test_killed_worker_gives_a_clean_error_and_the_coordinator_stays_up(checkpoints, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with served(checkpoints("llama"), "--local-workers", "1", "--model-name", "m", "--step-timeout", "5",
                log_path=log) as url:
        assert _complete(url, "m").status_code == 200
        coordinator = next(p for p in psutil.process_iter(["cmdline"])
                           if url.rsplit(":", 1)[1] in " ".join(p.info["cmdline"] or []))
        worker = next(c for c in coordinator.children() if "worker.cli" in " ".join(c.cmdline()))
        worker.kill()  # the coordinator is its parent and reaps it; until then it is a zombie
        deadline = time.monotonic() + 10
        while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        resp = _complete(url, "m")
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "cluster_unavailable"
        assert httpx.get(f"{url}/health").status_code == 503
        assert coordinator.is_running()
    assert "Traceback" not in log.read_text()
