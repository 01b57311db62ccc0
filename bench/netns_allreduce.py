"""Topology for prefill's large allreduces in the namespace cluster: star against ring and
recursive doubling, on links capped with ``tc tbf`` (root only; skips with the reason otherwise).

    sudo .venv/bin/python bench/netns_allreduce.py [--rates 100mbit,1gbit] [--worlds 3,4]
        [--rows 128,512] [--iters 6] [--out FILE]

A payload is ``rows`` x 512 float32 (a prefill chunk of the small random Llama: 512 rows = 1 MiB).
Each (rate, world) gets a fresh ``deploy/netns-cluster.sh`` cluster with wire-like buckets
(``bench/netns_comm.py``'s ``--burst wire``); each node runs one process in its namespace.

- ``star``, ``ring``, ``doubling``: the three algorithms over the same plain TCP sockets (a full
  mesh of TCP_NODELAY connections, every transfer of a step driven at once by one ``select``
  loop), so only the topology differs. ``star``: the workers send to node 0, which sums and
  sends the sum back. ``ring``: reduce-scatter then allgather, 2 (N - 1) steps of 1/N of the
  payload. ``doubling``: log2 N exchanges of the whole payload with the partner whose rank
  differs in one bit (power-of-two N only).
- ``edgellm_star``: ``StarHub.allreduce`` over lanes (authenticated frames), what a prefill step
  does today.

Per method, node 0's p50 ms per allreduce, and the floor on these links: star 2 (N - 1) P / B
(the hub's link carries N - 1 payloads in, then N - 1 out), ring 2 (N - 1) / N x P / B, doubling
log2 N x P / B. Every result is checked against the known sum.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import select
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netns_comm as nc  # noqa: E402
from report import emit  # noqa: E402

log = logging.getLogger("bench.netns_allreduce")

D = 512
PORT = 47200
WARMUP = 2
TIMEOUT_S = 60.0
METHODS = ("star", "ring", "doubling", "edgellm_star")


def transfer(sends: list[tuple[socket.socket, memoryview]], recvs: list[tuple[socket.socket, memoryview]]) -> None:
    """Every send and receive at once, until all are done (none of them waits for another)."""
    socks = {s.fileno(): s for s, _ in sends + recvs}
    sending = {s.fileno(): m for s, m in sends if len(m)}  # what is left to send / receive
    receiving = {s.fileno(): m for s, m in recvs if len(m)}
    deadline = time.monotonic() + TIMEOUT_S
    while sending or receiving:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("a transfer stalled")
        readable, writable, _ = select.select(list(receiving), list(sending), [], left)
        for fd in readable:
            got = socks[fd].recv_into(receiving[fd])
            if got == 0:
                raise ConnectionError("a peer closed its connection")
            receiving[fd] = receiving[fd][got:]
            if not len(receiving[fd]):
                del receiving[fd]
        for fd in writable:
            sent = socks[fd].send(sending[fd])
            sending[fd] = sending[fd][sent:]
            if not len(sending[fd]):
                del sending[fd]


def _bytes(t: torch.Tensor) -> memoryview:
    return t.numpy().data.cast("B")


def mesh(rank: int, world: int) -> dict[int, socket.socket]:
    """A TCP_NODELAY connection to every other node: each connects to the lower ranks."""
    peers: dict[int, socket.socket] = {}
    server = socket.create_server((nc.address(rank), PORT), backlog=world)
    server.settimeout(TIMEOUT_S)
    for other in range(rank):
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                sock = socket.create_connection((nc.address(other), PORT), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.sendall(struct.pack("<I", rank))
        peers[other] = sock
    while len(peers) < world - 1:
        conn, _ = server.accept()
        conn.settimeout(TIMEOUT_S)
        (other,) = struct.unpack("<I", conn.recv(4, socket.MSG_WAITALL))
        peers[other] = conn
    server.close()
    for sock in peers.values():
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    return peers


def star(x: torch.Tensor, rank: int, world: int, peers: dict[int, socket.socket]) -> torch.Tensor:
    if rank:
        out = torch.empty_like(x)
        transfer([(peers[0], _bytes(x))], [(peers[0], _bytes(out))])
        return out
    parts = [torch.empty_like(x) for _ in range(1, world)]
    transfer([], [(peers[r], _bytes(p)) for r, p in zip(range(1, world), parts, strict=True)])
    total = x.clone()
    for p in parts:
        total += p
    transfer([(peers[r], _bytes(total)) for r in range(1, world)], [])
    return total


def ring(x: torch.Tensor, rank: int, world: int, peers: dict[int, socket.socket]) -> torch.Tensor:
    flat = x.reshape(-1).clone()
    chunks = list(flat.tensor_split(world))
    right, left = peers[(rank + 1) % world], peers[(rank - 1) % world]
    for s in range(world - 1):  # reduce-scatter: afterwards chunk (rank + 1) % world holds its sum
        target = chunks[(rank - s - 1) % world]
        got = torch.empty_like(target)
        transfer([(right, _bytes(chunks[(rank - s) % world]))], [(left, _bytes(got))])
        target += got
    for s in range(world - 1):  # allgather
        transfer([(right, _bytes(chunks[(rank - s + 1) % world]))], [(left, _bytes(chunks[(rank - s) % world]))])
    return flat.view(x.shape)


def doubling(x: torch.Tensor, rank: int, world: int, peers: dict[int, socket.socket]) -> torch.Tensor:
    total = x.clone()
    got = torch.empty_like(x)
    for k in range(int(math.log2(world))):
        partner = peers[rank ^ (1 << k)]
        transfer([(partner, _bytes(total))], [(partner, _bytes(got))])
        total = total + got  # a new tensor: the one just sent is not written while in flight
    return total


ALGORITHMS = {"star": star, "ring": ring, "doubling": doubling}


def _node(rank: int, world: int, methods: list[str], rows: list[int], iters: int, out: Any) -> None:
    peers = mesh(rank, world)
    result: dict[str, dict[str, float]] = {}
    try:
        for method in methods:
            for n in rows:
                x = torch.linspace(-1, 1, n * D).view(n, D) * (rank + 1)  # (rows, d)
                expected = torch.linspace(-1, 1, n * D).view(n, D) * (world * (world + 1) / 2)
                times = []
                for i in range(WARMUP + iters):
                    start = time.perf_counter()
                    total = ALGORITHMS[method](x, rank, world, peers)
                    if i >= WARMUP:
                        times.append(time.perf_counter() - start)
                if not torch.allclose(total, expected, atol=1e-4 * world * world):
                    raise AssertionError(f"{method} at {world} ranks summed wrong")
                result.setdefault(method, {})[str(n)] = round(statistics.median(times) * 1e3, 2)
        if rank == 0:
            out.put(result)
    finally:
        for sock in peers.values():
            sock.close()


def plain(world: int, methods: list[str], rows: list[int], iters: int) -> dict[str, Any]:
    results = nc.mp.get_context("spawn").Queue()
    procs = [nc.spawn(r, _node, r, world, methods, rows, iters, results) for r in range(world)]
    try:
        return dict(results.get(timeout=TIMEOUT_S * (1 + len(methods) * len(rows) * (WARMUP + iters))))
    finally:
        nc.reap(procs)


def edgellm_star(world: int, rows: list[int], iters: int) -> dict[str, float]:
    """``StarHub.allreduce`` over lanes: one STEP, then ``iters`` allreduces of (rows, d)."""
    out = {}
    for n in rows:
        got = nc.replay(world, "lanes_spin0", 1, D, iters, rows=n, warmup=WARMUP)
        out[str(n)] = round(got["comm_ms_per_token"], 2)
    return out


def floors(world: int, rows: list[int], rate: str) -> dict[str, dict[str, float]]:
    per_payload = {str(n): n * D * 4 * 8 / nc.rate_bits(rate) * 1e3 for n in rows}  # ms
    out = {"star": {n: round(2 * (world - 1) * p, 2) for n, p in per_payload.items()},
           "ring": {n: round(2 * (world - 1) / world * p, 2) for n, p in per_payload.items()}}
    if world & (world - 1) == 0:
        out["doubling"] = {n: round(math.log2(world) * p, 2) for n, p in per_payload.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="100mbit,1gbit")
    parser.add_argument("--worlds", default="3,4")
    parser.add_argument("--rows", default="128,512", help="rows of d=512 float32 per payload")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if reason := nc.skip_reason():
        emit({"skipped": reason}, args.out)
        return
    nc.exit_on_sigterm()
    rows = [int(r) for r in args.rows.split(",")]
    wanted = args.methods.split(",")
    result: dict[str, Any] = {"machine": {"cores": os.cpu_count()}, "loadavg_start": os.getloadavg(), "d": D,
                              "iters": args.iters, "configs": []}
    for rate in args.rates.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            methods = [m for m in wanted if m in ALGORITHMS and (m != "doubling" or world & (world - 1) == 0)]
            with nc.netns_cluster(world - 1, rate, "wire"):
                entry: dict[str, Any] = {"rate": rate, "world": world, "floor_ms": floors(world, rows, rate)}
                entry["p50_ms"] = plain(world, methods, rows, args.iters) if methods else {}
                if "edgellm_star" in wanted:
                    entry["p50_ms"]["edgellm_star"] = edgellm_star(world, rows, args.iters)
                log.info("%s, %d ranks: %s", rate, world, entry["p50_ms"])
            result["configs"].append(entry)
    result["loadavg_end"] = os.getloadavg()
    emit(result, args.out)


if __name__ == "__main__":
    main()
