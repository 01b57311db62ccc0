"""A tiny TCP echo/sink for measuring a worker's link to the coordinator.

The coordinator runs ``edgellm probe --serve-link PORT``; each worker's ``edgellm probe
--coordinator HOST:PORT`` then measures round trip (1-byte ping-pong) and bandwidth both ways.
A request is one opcode byte and an 8-byte big-endian length:

- ``P``: the server echoes one byte (round trip);
- ``U``: the client sends ``length`` bytes, the server answers one byte once it has them all;
- ``D``: the server sends ``length`` bytes.

Nothing but these bytes crosses the link (no pickle, no code); lengths are capped.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import statistics
import struct
import threading
import time

log = logging.getLogger(__name__)

HEADER = struct.Struct(">cQ")
MAX_TRANSFER = 1 << 30
CHUNK = 1 << 20
TIMEOUT_S = 30.0


def _recv_exact(sock: socket.socket, n: int, buf: bytearray | None = None) -> int:
    """Read ``n`` bytes (into a reused buffer when given); returns the count."""
    view = memoryview(buf if buf is not None else bytearray(min(n, CHUNK)))
    got = 0
    while got < n:
        k = sock.recv_into(view[: min(len(view), n - got)])
        if k == 0:
            raise ConnectionError("link closed mid-transfer")
        got += k
    return got


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(CHUNK)
        payload = bytes(CHUNK)
        try:
            while True:
                head = bytearray(HEADER.size)
                try:
                    _recv_exact(sock, HEADER.size, head)
                except ConnectionError:
                    return
                op, length = HEADER.unpack(head)
                if length > MAX_TRANSFER:
                    log.warning("link probe from %s asked for %d bytes; closing", self.client_address, length)
                    return
                if op == b"P":
                    sock.sendall(b"p")
                elif op == b"U":
                    while length:
                        length -= _recv_exact(sock, min(length, CHUNK), buf)
                    sock.sendall(b"k")
                elif op == b"D":
                    while length:
                        n = min(length, CHUNK)
                        sock.sendall(payload[:n])
                        length -= n
                else:
                    log.warning("link probe from %s sent opcode %r; closing", self.client_address, op)
                    return
        except (OSError, ConnectionError) as exc:
            log.info("link probe from %s ended: %s", self.client_address, exc)


class LinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> LinkServer:
        threading.Thread(target=self.serve_forever, name="link-probe", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def measure_link(host: str, port: int, pings: int = 200, transfer_bytes: int = 64 << 20) -> dict[str, float]:
    """Round trip (µs: the lowest median of batches of 20 pings) and bandwidth up and down
    (Mbit/s) to a ``LinkServer``."""
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply = bytearray(1)
        rtts = []
        for _ in range(pings):
            start = time.perf_counter()
            sock.sendall(HEADER.pack(b"P", 0))
            _recv_exact(sock, 1, reply)
            rtts.append(time.perf_counter() - start)
        payload = bytes(CHUNK)
        start = time.perf_counter()
        sock.sendall(HEADER.pack(b"U", transfer_bytes))
        left = transfer_bytes
        while left:
            n = min(left, CHUNK)
            sock.sendall(payload[:n])
            left -= n
        _recv_exact(sock, 1, reply)
        up = time.perf_counter() - start
        buf = bytearray(CHUNK)
        start = time.perf_counter()
        sock.sendall(HEADER.pack(b"D", transfer_bytes))
        left = transfer_bytes
        while left:
            left -= _recv_exact(sock, min(left, CHUNK), buf)
        down = time.perf_counter() - start
    mbit = transfer_bytes * 8 / 1e6
    quiet = min(statistics.median(rtts[i:i + 20]) for i in range(0, len(rtts), 20))  # the quietest stretch
    return {"rtt_us": round(quiet * 1e6, 1), "up_mbit_s": round(mbit / up, 1),
            "down_mbit_s": round(mbit / down, 1)}
