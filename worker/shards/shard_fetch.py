"""Shard distribution, worker side: which files a rank needs, fetching them from the
coordinator's ShardSource in resumable chunks, and sha256 checks that refuse a corrupted file.

Fetched files land in ``<cache_dir>/<model_id>/`` and are reused on the next start: a file
whose size and checksum (hashed again at every start) match the coordinator's list is not
fetched again; one that does not is fetched again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from protos.edgellm.v1 import shards_pb2 as spb
from protos.edgellm.v1 import shards_pb2_grpc as spb_grpc
from worker.config import CheckpointError
from worker.shards.weights import SHARD_MANIFEST, is_shard_dir, read_manifest, shard_file_name

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TOKEN_METADATA_KEY = "x-edgellm-token"  # gRPC metadata carrying the cluster token (control service and ShardSource)
FetchProgress = Callable[[int, int], None]  # (bytes fetched, bytes total)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks and dropped from the page cache behind us."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        offset = 0
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            os.posix_fadvise(f.fileno(), offset, len(chunk), os.POSIX_FADV_DONTNEED)
            offset += len(chunk)
    return digest.hexdigest()


def needed_files(model_dir: Path, rank: int, world_size: int) -> list[str]:
    """Paths (relative to ``model_dir``) that rank ``rank`` reads.

    From an ``edgellm shard`` directory that is its own file only; from a Hugging Face
    checkpoint every weight file (the worker slices on the fly), so sharding first saves
    the network most.
    """
    if is_shard_dir(model_dir):
        return ["config.json", SHARD_MANIFEST, shard_file_name(rank, world_size)]
    weights = sorted(p.name for p in model_dir.glob("*.safetensors"))
    index = ["model.safetensors.index.json"] if (model_dir / "model.safetensors.index.json").is_file() else []
    return ["config.json", *index, *weights]


def verify_rank_file(model_dir: str | Path, rank: int, world_size: int,
                     hashed: dict[str, str] | None = None) -> None:
    """Refuse ``rank``'s shard file if its sha256 differs from the one ``edgellm shard`` recorded
    (``verify_shard_file``)."""
    verify_shard_file(model_dir, shard_file_name(rank, world_size), hashed)


def verify_shard_file(model_dir: str | Path, name: str, hashed: dict[str, str] | None = None) -> None:
    """Refuse a file of a shard directory whose sha256 differs from the one ``edgellm shard``
    recorded (a rank file, or the coordinator's ``hub.safetensors``).

    ``hashed``: sha256 by file name of files this process has just read whole (a fetch): their
    digest is compared with the manifest's without reading a multi-GB file a second time."""
    model_dir = Path(model_dir)
    if not is_shard_dir(model_dir):
        return
    expected = read_manifest(model_dir).get("sha256", {}).get(name)
    if expected is None:
        return  # written by an older `edgellm shard`: nothing to check against
    path = model_dir / name
    if not path.is_file():
        raise CheckpointError(f"{path}: shard file missing")
    actual = (hashed or {}).get(path.name) or file_sha256(path)
    if actual != expected:
        raise CheckpointError(f"{path} is corrupted: sha256 {actual[:16]}… differs from the manifest's "
                              f"{expected[:16]}…; run `edgellm shard` again or delete it to re-fetch")


def fetch_model(source: str, token: str, rank: int, world_size: int, cache_dir: Path,
                progress: FetchProgress | None = None, timeout_s: float = 30.0) -> tuple[Path, dict[str, str]]:
    """Fetch (or find in the cache) what ``rank`` needs from the ShardSource at ``source``;
    returns the local model directory and the sha256 of each file fetched (and hashed) now."""
    meta = ((TOKEN_METADATA_KEY, token),)
    with grpc.insecure_channel(source, options=[("grpc.max_receive_message_length", 4 * CHUNK_BYTES)]) as channel:
        stub = spb_grpc.ShardSourceStub(channel)
        try:
            listing = stub.ListFiles(spb.ListFilesRequest(rank=rank, world_size=world_size), metadata=meta,
                                     timeout=timeout_s)
        except grpc.RpcError as exc:
            raise CheckpointError(f"cannot list the model's files at {source}: {exc.details()}") from None
        target = cache_dir / listing.model_id
        target.mkdir(parents=True, exist_ok=True)
        total = sum(f.size for f in listing.files)
        done = 0
        fetched: dict[str, str] = {}
        for info in listing.files:
            path = target / info.path
            with _exclusive(path):  # another worker of this host may be fetching it into the same cache
                if path.is_file() and path.stat().st_size == info.size:
                    # hashed at every start: a copy that rotted or was overwritten on disk since
                    # it was fetched must not be loaded (NaN logits, or wrong text silently)
                    digest = file_sha256(path)
                    if digest == info.sha256:
                        log.info("%s: cached copy checked, not fetched again", info.path)
                        done += info.size
                        fetched[info.path] = digest  # the rank-file check before loading reuses it
                        continue
                    log.warning("%s: the cached copy is corrupted (sha256 %s… differs from the coordinator's "
                                "%s…); fetching it again", info.path, digest[:16], info.sha256[:16])
                    path.unlink()
                done = _fetch_file(stub, meta, info, path, done, total, progress)
            fetched[info.path] = info.sha256  # _fetch_file checked the bytes against it
        if progress:
            progress(total, total)
    log.info("model files for rank %d ready in %s", rank, target)
    return target, fetched


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (flock): two processes sharing a cache dir (``--local-workers 2``, or
    two workers on one host) once appended to the same ``.partial`` file and corrupted it."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _fetch_file(stub: spb_grpc.ShardSourceStub, meta: tuple, info: spb.FileInfo, path: Path, done: int,
                total: int, progress: FetchProgress | None) -> int:
    """Append the missing bytes of one file to ``<path>.partial`` (resuming where a previous
    attempt stopped), verify its sha256, then move it into place."""
    partial = path.with_name(path.name + ".partial")
    offset = partial.stat().st_size if partial.is_file() else 0
    if offset > info.size:
        partial.unlink()
        offset = 0
    if offset:
        log.info("resuming %s at byte %d of %d", info.path, offset, info.size)
    done += offset
    with open(partial, "ab") as out:
        try:
            for chunk in stub.Fetch(spb.FetchRequest(path=info.path, offset=offset), metadata=meta):
                if chunk.offset != offset:
                    raise CheckpointError(f"{info.path}: chunk at {chunk.offset}, expected {offset}")
                out.write(chunk.data)
                offset += len(chunk.data)
                done += len(chunk.data)
                if progress:
                    progress(done, total)
        except grpc.RpcError as exc:
            raise CheckpointError(f"fetching {info.path} stopped at byte {offset}: {exc.details()} "
                                  f"(the next attempt resumes there)") from None
    if offset != info.size or file_sha256(partial) != info.sha256:
        partial.unlink()
        raise CheckpointError(f"{info.path}: the fetched copy does not match the coordinator's sha256")
    partial.replace(path)
    return done
