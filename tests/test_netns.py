"""A cluster across network namespaces: real interfaces, distinct addresses, capped links.

``deploy/netns-cluster.sh`` puts the coordinator and two workers in namespaces of their own,
joined by veth pairs to a bridge, each link capped with ``tc tbf``. Greedy generation across
them must give the same text as a loopback cluster of the same three ranks. Needs root (or
CAP_NET_ADMIN) for ``ip netns add``; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import ROOT, START_S, served, stop

pytestmark = pytest.mark.cluster

SCRIPT = ROOT / "deploy" / "netns-cluster.sh"
RATE = "20mbit"
RATE_BITS = 20_000_000
TOKEN = "netns-test-token"
COORDINATOR, WORKERS = "10.77.0.1", ["10.77.0.2", "10.77.0.3"]  # the script's address plan
REQUEST = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}

# An HTTP client for inside the coordinator's namespace: stdlib only, so it starts fast.
# argv: url, JSON body or "", timeout. Prints {"status", "body", "elapsed_s"}.
HTTP_CLIENT = r"""
import json, sys, time, urllib.error, urllib.request
url, body, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
req = urllib.request.Request(url, data=body.encode() or None, headers={"Content-Type": "application/json"})
start = time.monotonic()
try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
        status, text = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    status, text = e.code, e.read().decode()
except OSError as e:
    status, text = 0, str(e)
print(json.dumps({"status": status, "body": text, "elapsed_s": time.monotonic() - start}))
"""

# A TCP sink (argv: "recv", host, port) and source (argv: "send", host, port, nbytes).
# The sink prints the bytes received and the seconds from the first to the last byte.
TCP_PROBE = r"""
import json, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "recv":
    with socket.create_server((host, port)) as srv:
        srv.settimeout(120)
        conn, _ = srv.accept()
        conn.settimeout(30)
        n, first = 0, None
        while chunk := conn.recv(1 << 16):
            first = first or time.monotonic()
            n += len(chunk)
        print(json.dumps({"bytes": n, "seconds": time.monotonic() - (first or time.monotonic())}))
else:
    deadline = time.monotonic() + 120
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with conn:
        conn.sendall(b"x" * int(sys.argv[4]))
"""


def _namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the tests as root to cover them"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "ip or tc is missing: run `deploy/install-system-deps.sh` as root (it installs iproute2)"
    probe = f"edgellm-probe-{os.getpid()}"
    steps = [["ip", "netns", "add", probe],
             ["ip", "netns", "exec", probe, "true"],
             ["ip", "-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"],
             ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "probe0", "root", "tbf", "rate", "1mbit",
              "burst", "32kb", "latency", "100ms"]]
    try:
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, timeout=10)
            if result.returncode != 0:
                return f"`{' '.join(step)}` is not permitted here: {result.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=10)
    return None


class NetnsCluster:
    """The namespaces of one ``netns-cluster.sh up``; runs commands inside them."""

    def __init__(self, prefix: str):
        self.env = dict(os.environ, EDGELLM_NETNS_PREFIX=prefix, PYTHONUNBUFFERED="1")

    def script(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)

    def spawn(self, node: str, *cmd: str, log_path: Path | None = None,
              stdout: int | None = None) -> subprocess.Popen:
        """``cmd`` in ``node``'s namespace. The script execs, so the process is ``cmd`` itself."""
        out = open(log_path, "wb") if log_path else stdout  # noqa: SIM115 (owned by the process)
        return subprocess.Popen([str(SCRIPT), "exec", node, *cmd], cwd=ROOT, env=self.env, stdout=out,
                                stderr=subprocess.STDOUT if log_path else None)

    def python(self, node: str, code: str, *args: str, timeout_s: float) -> str:
        result = subprocess.run([str(SCRIPT), "exec", node, sys.executable, "-c", code, *args], cwd=ROOT,
                                env=self.env, capture_output=True, text=True, timeout=timeout_s)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def http(self, url: str, body: dict | None = None, timeout_s: float = 60) -> dict:
        """A request sent from inside the coordinator's namespace."""
        out = self.python("coordinator", HTTP_CLIENT, url, json.dumps(body) if body else "", str(timeout_s),
                          timeout_s=timeout_s + 15)
        return json.loads(out)


@pytest.fixture(scope="module")
def netns() -> Iterator[NetnsCluster]:
    if reason := _namespaces_unavailable():
        pytest.skip(reason)
    cluster = NetnsCluster(f"edgellm-t{os.getpid()}")
    try:
        up = cluster.script("up", "2", "--rate", RATE)
        assert up.returncode == 0, up.stderr
        yield cluster
    finally:
        down = cluster.script("down")
        assert down.returncode == 0, down.stderr


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def test_links_are_capped(netns: NetnsCluster) -> None:
    status = netns.script("status").stdout
    assert status.count("tbf") == 6, status  # each of the 3 links, both ways
    assert status.count("rate 20Mbit") == 6, status

    sink = netns.spawn("worker1", sys.executable, "-c", TCP_PROBE, "recv", WORKERS[0], "6000",
                       stdout=subprocess.PIPE)
    try:
        nbytes = 2_500_000  # 1 s at the cap
        netns.python("coordinator", TCP_PROBE, "send", WORKERS[0], "6000", str(nbytes), timeout_s=180)
        out, _ = sink.communicate(timeout=180)
    finally:
        stop(sink)
    measured = json.loads(out)
    assert measured["bytes"] == nbytes
    rate = measured["bytes"] * 8 / measured["seconds"]
    print(f"\ncoordinator -> worker1 over a {RATE} link: {rate / 1e6:.1f} Mbit/s")
    # One-sided, so a slow machine cannot fail it: the bucket lets through at most its rate
    # (plus one burst of 32 KiB).
    assert rate <= 1.2 * RATE_BITS


def test_generation_across_namespaces_equals_loopback(netns: NetnsCluster, checkpoints, tmp_path: Path) -> None:
    model = checkpoints("llama")
    with served(model, "--local-workers", "2", "--model-name", "m") as url:
        start = time.monotonic()
        reference = httpx.post(f"{url}/v1/completions", json=REQUEST, timeout=60).json()
        loopback_s = time.monotonic() - start

    logs = {name: tmp_path / f"{name}.log" for name in ("worker1", "worker2", "coordinator")}
    procs = [netns.spawn(f"worker{i + 1}", sys.executable, "-m", "server.cli", "worker", "--host", host,
                         "--port", "50051", "--cluster-token", TOKEN, "--threads", "1",
                         log_path=logs[f"worker{i + 1}"])
             for i, host in enumerate(WORKERS)]
    try:
        coordinator = netns.spawn(
            "coordinator", sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--model-name", "m",
            "--workers", ",".join(f"{h}:50051" for h in WORKERS), "--cluster-token", TOKEN, "--threads", "1",
            "--host", COORDINATOR, "--port", "8000", "--hub-host", COORDINATOR, "--hub-port", "5555",
            "--connect-timeout", str(START_S), log_path=logs["coordinator"])
        procs.append(coordinator)
        base = f"http://{COORDINATOR}:8000"
        deadline = time.monotonic() + START_S
        while (health := netns.http(f"{base}/health", timeout_s=30))["status"] != 200:
            assert coordinator.poll() is None, f"the coordinator exited:\n{_tail(logs['coordinator'])}"
            assert time.monotonic() < deadline, f"not healthy after {START_S} s: {health}\n{_tail(logs['coordinator'])}"
            time.sleep(0.5)

        reply = netns.http(f"{base}/v1/completions", REQUEST, timeout_s=60)
        assert reply["status"] == 200, reply
        body = json.loads(reply["body"])
        assert body["choices"][0]["text"] == reference["choices"][0]["text"]
        assert body["usage"] == reference["usage"]
        print(f"\n{REQUEST['max_tokens']} tokens, greedy: loopback {loopback_s:.2f} s, "
              f"3 namespaces over {RATE} links {reply['elapsed_s']:.2f} s")
    finally:
        for proc in reversed(procs):
            stop(proc)
    for name, path in logs.items():
        assert "Traceback" not in path.read_text(), f"{name}:\n{_tail(path)}"
