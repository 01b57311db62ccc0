"""Shard distribution, coordinator side: a gRPC service that hands each worker the files of
the model it needs, in chunks, with their sha256 (see worker/shards/shard_fetch.py)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from protos.edgellm.v1 import shards_pb2 as spb
from protos.edgellm.v1 import shards_pb2_grpc as spb_grpc
from worker.rank.service import TokenInterceptor
from worker.shards.shard_fetch import CHUNK_BYTES, file_sha256, needed_files

log = logging.getLogger(__name__)


class ShardSource(spb_grpc.ShardSourceServicer):
    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir).resolve()
        self._sha: dict[str, str] = {}
        self._lock = threading.Lock()

    def _sha256(self, relative: str) -> str:
        with self._lock:  # hash each file once, even when several workers ask at the same time
            if relative not in self._sha:
                self._sha[relative] = file_sha256(self.model_dir / relative)
            return self._sha[relative]

    def ListFiles(self, request: spb.ListFilesRequest, context: grpc.ServicerContext) -> spb.ListFilesReply:
        files = [spb.FileInfo(path=p, size=(self.model_dir / p).stat().st_size, sha256=self._sha256(p))
                 for p in needed_files(self.model_dir, request.rank, request.world_size)]
        identity = hashlib.sha256("".join(f"{f.path}:{f.sha256}" for f in files).encode()).hexdigest()[:16]
        return spb.ListFilesReply(model_id=f"{self.model_dir.name}-{identity}", files=files)

    def Fetch(self, request: spb.FetchRequest, context: grpc.ServicerContext) -> Iterator[spb.FileChunk]:
        path = (self.model_dir / request.path).resolve()
        if path.parent != self.model_dir or not path.is_file():  # no way out of the model directory
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.path!r} is not a file of this model")
        with open(path, "rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while chunk := f.read(CHUNK_BYTES):
                yield spb.FileChunk(offset=offset, data=chunk)
                offset += len(chunk)


def serve_shards(model_dir: str | Path, host: str, port: int, token: str) -> tuple[grpc.Server, int]:
    """Start the ShardSource on ``host:port`` (0: any free port); returns the server and port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[TokenInterceptor(token)])
    spb_grpc.add_ShardSourceServicer_to_server(ShardSource(model_dir), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    log.info("serving the model's files to workers on %s:%d", host, bound)
    return server, bound

