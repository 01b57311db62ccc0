"""Peers without the cluster token, and garbage on every port: refused, never a crash or a hang."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
import torch

from tests.processes import START_S, edgellm, free_port, served, stop
from worker.comm.collective import CollectiveError, StarHub, StarRank

pytestmark = pytest.mark.cluster


def test_data_plane_refuses_a_rank_with_the_wrong_token() -> None:
    hub = StarHub(2, token="right", timeout_s=60, lane=True)
    intruder = StarRank(1, hub.address, token="wrong", timeout_s=60)
    try:
        with pytest.raises(CollectiveError, match="did not accept"):
            intruder.wait_welcome(1.5)
        with pytest.raises(CollectiveError, match="never joined"):
            hub.wait_for_ranks(0.5)
        honest = StarRank(1, hub.address, token="right", timeout_s=60)
        welcome = threading.Thread(target=honest.wait_welcome, args=(60,))  # it opens its lane meanwhile
        welcome.start()
        hub.wait_for_ranks(60)
        welcome.join(60)
        hub.start_step(torch.zeros((0, 3), dtype=torch.int64), torch.zeros(0))
        honest.begin(honest.recv())
        assert hub.on_lanes and honest.lane is not None  # the allreduce goes over the honest rank's lane
        partial = torch.arange(8.0)
        theirs: list[torch.Tensor] = []
        rank_side = threading.Thread(target=lambda: theirs.append(honest.allreduce(partial * 2)))
        rank_side.start()
        assert torch.equal(hub.allreduce(partial), partial * 3)
        rank_side.join(60)
        assert torch.equal(theirs[0], partial * 3)
        honest.close()
    finally:
        intruder.close()
        hub.close()


def _garbage(port: int, rng: torch.Generator) -> None:
    """Connect, send random bytes, read whatever comes back, close: bounded in bytes and time."""
    payload = bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist())
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.settimeout(1)
        try:
            conn.sendall(payload)
            conn.recv(1024)
        except OSError:
            pass  # the peer hung up on us: exactly what it should do


def test_random_bytes_on_every_port_neither_crash_nor_hang(checkpoints, tmp_path) -> None:
    ports = [free_port(), free_port()]
    hub_port, lane_port = free_port(), free_port()
    workers = [edgellm("worker", "--host", "127.0.0.1", "--port", str(p), "--cluster-token", "tok") for p in ports]
    try:
        with served(checkpoints("llama"), "--workers", ",".join(f"127.0.0.1:{p}" for p in ports),
                    "--cluster-token", "tok", "--hub-port", str(hub_port), "--lanes", "--lane-port", str(lane_port),
                    "--model-name", "m",
                    "--step-timeout", "10", log_path=tmp_path / "serve.log") as url:
            body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
            before = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            http_port = int(url.rsplit(":", 1)[1])
            rng = torch.Generator().manual_seed(0)
            silent = [socket.create_connection(("127.0.0.1", p), timeout=2)
                      for p in (*ports, hub_port, lane_port, http_port)]
            try:
                for _ in range(3):
                    for port in (*ports, hub_port, lane_port, http_port):
                        _garbage(port, rng)
                after = httpx.post(f"{url}/v1/completions", json=body, timeout=START_S).json()["choices"][0]["text"]
                assert after == before
                # a stalled data plane ends in a step timeout (10 s) and a repair; none happened
                log = (tmp_path / "serve.log").read_text()
                assert "step failed" not in log and "replaying" not in log, "an idle intruder must not stall the cluster"
            finally:
                for conn in silent:
                    conn.close()
            assert httpx.get(f"{url}/health").status_code == 200
        assert all(w.poll() is None for w in workers), "workers must survive garbage"
    finally:
        for w in workers:
            stop(w)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log
    assert log.count("data-plane lane is up") == 2, "both workers' allreduces went over their lanes"
    assert "refused a data-plane connection" in log, "the garbage reached the lane port and was refused there"

