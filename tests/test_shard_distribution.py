"""Workers without the model fetch their own shard from the coordinator (sha256-checked,
cached, resumable); a corrupted shard file is refused with a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import worker.shards.shard_fetch
from server.shard_source import serve_shards
from tests.processes import ROOT, START_S, edgellm, free_port, served, stop
from worker.config import CheckpointError
from worker.shards.shard_fetch import fetch_model, file_sha256, verify_rank_file
from worker.shards.weights import SHARD_MANIFEST

pytestmark = pytest.mark.cluster
BODY = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def shard_dir(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "llama-3"
    subprocess.run([sys.executable, "-m", "server.cli", "shard", "--model", str(checkpoints("llama")), "--ranks", "3",
                    "--weights", "2,1,1", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=START_S)
    return out


def _serve_with_fetching_workers(shard_dir: Path, caches: list[Path], log: Path) -> str:
    ports = [free_port(), free_port()]
    workers = [edgellm("worker", "--host", "127.0.0.1", "--port", str(p), "--cluster-token", "t", "--cache-dir",
                       str(c)) for p, c in zip(ports, caches, strict=True)]
    try:
        with served(shard_dir, "--workers", ",".join(f"127.0.0.1:{p}" for p in ports), "--weights", "2,1,1",
                    "--cluster-token", "t", "--ship-shards", "--model-name", "m", log_path=log) as url:
            return httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
    finally:
        for w in workers:
            stop(w)


def test_workers_fetch_only_their_own_shard_then_reuse_the_cache(shard_dir: Path, tmp_path: Path) -> None:
    # no --weights: a shard directory is served with the split it was written with (2,1,1)
    with served(shard_dir, "--local-workers", "2", "--model-name", "m") as url:
        expected = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
    caches = [tmp_path / "cache1", tmp_path / "cache2"]
    assert _serve_with_fetching_workers(shard_dir, caches, tmp_path / "first.log") == expected
    for rank, cache in enumerate(caches, start=1):
        files = {p.name for p in cache.rglob("*.safetensors")}
        assert files == {f"rank-{rank:02d}-of-03.safetensors"}, files  # its own slice, nothing else
    log = (tmp_path / "first.log").read_text()
    assert "fetched" in log and "Traceback" not in log

    cached = next(caches[0].rglob("*.safetensors"))
    mtime = cached.stat().st_mtime_ns
    assert _serve_with_fetching_workers(shard_dir, caches, tmp_path / "second.log") == expected
    assert cached.stat().st_mtime_ns == mtime, "a cached, verified file must not be fetched again"
    assert not list(caches[0].rglob("*.partial"))


def test_an_interrupted_fetch_resumes_where_it_stopped(shard_dir: Path, tmp_path: Path) -> None:
    source = shard_dir / "rank-01-of-03.safetensors"
    caches = [tmp_path / "c1", tmp_path / "c2"]
    # a previous attempt got the first half of rank 1's file into its model cache directory
    first = _serve_with_fetching_workers(shard_dir, caches, tmp_path / "a.log")
    model_cache = next(caches[0].iterdir())
    half = source.read_bytes()[: source.stat().st_size // 2]
    (model_cache / source.name).unlink()
    (model_cache / (source.name + ".partial")).write_bytes(half)
    worker_port = free_port()
    worker = edgellm("worker", "--host", "127.0.0.1", "--port", str(worker_port), "--cluster-token", "t",
                     "--cache-dir", str(caches[0]), log_path=tmp_path / "worker.log")
    other_port = free_port()
    other = edgellm("worker", "--host", "127.0.0.1", "--port", str(other_port), "--cluster-token", "t",
                    "--cache-dir", str(caches[1]))
    try:
        with served(shard_dir, "--workers", f"127.0.0.1:{worker_port},127.0.0.1:{other_port}", "--weights", "2,1,1",
                    "--cluster-token", "t", "--ship-shards", "--model-name", "m") as url:
            again = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
    finally:
        stop(worker)
        stop(other)
    assert again == first
    assert f"resuming {source.name} at byte {len(half)}" in (tmp_path / "worker.log").read_text()
    assert file_sha256(model_cache / source.name) == file_sha256(source)


def _with_corrupted_file(shard_dir: Path, out: Path, victim: str) -> Path:
    """A copy of ``shard_dir`` whose file ``victim`` has one flipped byte inside a weight
    (safetensors itself would not notice)."""
    out.mkdir()
    for f in shard_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    data = bytearray((out / victim).read_bytes())
    data[-100] ^= 0xFF
    (out / victim).write_bytes(bytes(data))
    return out


# a worker's file, and the coordinator's own two (rank 0's was once loaded unchecked)
@pytest.mark.parametrize("victim", ["rank-01-of-03.safetensors", "rank-00-of-03.safetensors", "hub.safetensors"])
def test_corrupted_shard_file_is_refused_with_a_clear_error(shard_dir: Path, tmp_path: Path, victim: str) -> None:
    broken = _with_corrupted_file(shard_dir, tmp_path / "broken", victim)
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(broken), "--weights",
                             "2,1,1", "--local-workers", "2", "--port", str(free_port())],
                            cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert result.returncode != 0
    assert f"{victim} is corrupted" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("extra", "message"), [
    (["--weights", "2,1", "--local-workers", "1"], "holds shards for 3 ranks, but this cluster has 2"),
    (["--weights", "1,1,1", "--local-workers", "2"],
     "was sharded with another split (MLP columns per rank: "),
    (["--weights", "1,1,1", "--local-workers", "2"], "pass --weights 2,1,1, or re-run `edgellm shard`"),
])
def test_a_shard_dir_served_with_another_split_says_which_it_holds(shard_dir: Path, extra: list[str],
                                                                   message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(shard_dir), *extra,
                             "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_shard_dir_split_by_an_earlier_rule_asks_for_a_reshard(shard_dir: Path, tmp_path: Path) -> None:
    """A directory written when MLP slices were not rounded to units (before ``split_columns``)
    holds other column ranges for the same --weights: passing its weights cannot help."""
    import json
    import shutil

    old = shutil.copytree(shard_dir, tmp_path / "old")
    manifest = json.loads((old / SHARD_MANIFEST).read_text())
    (start, _), (_, end) = manifest["shards"][0]["mlp_columns"], manifest["shards"][1]["mlp_columns"]
    manifest["shards"][0]["mlp_columns"], manifest["shards"][1]["mlp_columns"] = [start, start + 1], [start + 1, end]
    (old / SHARD_MANIFEST).write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(old), "--local-workers", "2",
                             "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was written by an earlier edgellm that split the MLP columns differently" in result.stderr
    assert "re-run `edgellm shard`" in result.stderr


def _fetch_and_verify(model_dir: Path, cache: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Rank 1's files fetched from an in-process ShardSource over gRPC, then checked as a worker
    checks them before loading; ``reads`` collects the name of every file this side hashes."""
    real = worker.shards.shard_fetch.file_sha256

    def counting(path: Path) -> str:
        reads.append(Path(path).name.removesuffix(".partial"))  # a fetch hashes its .partial file
        return real(path)

    server, port = serve_shards(model_dir, "127.0.0.1", 0, "t")
    try:
        monkeypatch.setattr(worker.shards.shard_fetch, "file_sha256", counting)
        local, hashed = fetch_model(f"127.0.0.1:{port}", "t", 1, 3, cache)
        verify_rank_file(local, 1, 3, hashed)
        return local
    finally:
        monkeypatch.setattr(worker.shards.shard_fetch, "file_sha256", real)
        server.stop(None)


def test_a_fetched_rank_file_is_read_once_and_a_cached_one_rechecked(shard_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-GB shard on a Pi: hashing it at the fetch and again before loading doubles the
    start-up reads. The fetch's digest is compared with the manifest instead; a cached copy
    (which may have rotted on disk since) is hashed again at every start."""
    name = "rank-01-of-03.safetensors"
    reads: list[str] = []
    local = _fetch_and_verify(shard_dir, tmp_path / "cache", reads, monkeypatch)
    assert reads.count(name) == 1, reads
    assert file_sha256(local / name) == file_sha256(shard_dir / name)
    reads.clear()
    _fetch_and_verify(shard_dir, tmp_path / "cache", reads, monkeypatch)
    assert reads.count(name) == 1, reads  # nothing fetched; the cached copy is hashed once, at the fetch


def test_a_corrupted_cached_file_is_fetched_again(shard_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached file whose bytes changed on disk (same size) was trusted by a checksum saved at
    the first fetch: a Hugging Face weight file loaded corrupted (NaN logits, /health ok), a
    rank file failed the manifest check at every restart and was never repaired."""
    name = "rank-01-of-03.safetensors"
    local = _fetch_and_verify(shard_dir, tmp_path / "cache", [], monkeypatch)
    data = bytearray((local / name).read_bytes())
    data[-100] ^= 0xFF
    (local / name).write_bytes(bytes(data))
    reads: list[str] = []
    _fetch_and_verify(shard_dir, tmp_path / "cache", reads, monkeypatch)  # verify_rank_file would raise
    assert reads.count(name) == 2, reads  # the cached copy, then the new fetch
    assert file_sha256(local / name) == file_sha256(shard_dir / name)


def test_a_coordinator_serving_a_corrupted_shard_is_refused(shard_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The fetch checks the bytes against the coordinator's own sha256, which a corrupted file on
    the coordinator matches; the manifest's digest (from `edgellm shard`) still refuses it."""
    broken = _with_corrupted_file(shard_dir, tmp_path / "broken", "rank-01-of-03.safetensors")
    with pytest.raises(CheckpointError, match="rank-01-of-03.safetensors is corrupted"):
        _fetch_and_verify(broken, tmp_path / "cache", [], monkeypatch)


def test_workers_sharing_a_cache_dir_fetch_concurrently_without_corrupting_it(checkpoints, tmp_path: Path) -> None:
    """Two local workers (one host, one cache dir) fetch the same Hugging Face checkpoint at once;
    they once appended to the same .partial file and neither could start."""
    import concurrent.futures

    model = checkpoints("llama")
    server, port = serve_shards(model, "127.0.0.1", 0, "t")
    try:
        for attempt in range(3):
            def fetch(rank: int, cache: Path = tmp_path / f"cache-{attempt}") -> Path:
                return fetch_model(f"127.0.0.1:{port}", "t", rank % 2 + 1, 3, cache)[0]

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(fetch, range(4)))
            for local in results:
                fetched = [f for f in local.iterdir() if f.suffix not in (".lock", ".sha256")]
                assert {"config.json", "model.safetensors"} <= {f.name for f in fetched}
                for f in fetched:
                    assert file_sha256(f) == file_sha256(model / f.name), f.name
    finally:
        server.stop(None)
