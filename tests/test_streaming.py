"""The sliding window: same logits as resident weights, in order and after a restart, with a
clear error when the budget is too small, and the budget honoured by a real worker process."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from protos.edgellm.v1 import control_pb2 as pb
from protos.edgellm.v1 import control_pb2_grpc as pb_grpc
from tests.harness import inprocess_cluster
from tests.processes import START_S, edgellm, free_port
from tests.tiny_models import build_checkpoint
from worker.comm.collective import StarHub
from worker.config import ModelConfig
from worker.memory.budget import BudgetError
from worker.memory.weight_store import dense_order
from worker.rank.executor import Executor
from worker.rank.runtime import RankSpec
from worker.rank.service import TOKEN_METADATA_KEY, shard_to_proto, stats_dict
from worker.rank.step import SeqSpan
from worker.shards.shard_file import ShardFile
from worker.shards.shard_writer import write_shards
from worker.shards.sharding import plan_shards
from worker.shards.weights import HEAD_BLOCK, rank_shard_path

MiB = 1 << 20
PROMPT = [1, 17, 42, 99, 7, 250, 31, 5, 64, 128, 3, 77]
# What a worker process holds beyond its budget: Python, torch, gRPC, ZeroMQ and activations.
# An idle worker is ~240 MiB on this VM; docs/memory.md ("Fixed overhead") states this number.
RUNTIME_OVERHEAD = 384 * MiB


def _shards(model_dir: Path, weights: list[float], out: Path) -> Path:
    return write_shards(model_dir, plan_shards(ModelConfig.from_dir(model_dir), weights), out, progress=False)


def _window_budget(shard_dir: Path, weights: list[float], slots: int, max_batch: int = 4,
                   max_context: int = 128) -> int:
    """A budget that leaves exactly ``slots`` window buffers on the rank with the largest blocks."""
    config = ModelConfig.from_dir(shard_dir)
    largest, kv = 0, 0
    for shard in plan_shards(config, weights):
        file = ShardFile(rank_shard_path(shard_dir, shard))
        largest = max(largest, *(file.block_bytes(b) for b in dense_order(config.num_layers)))
        # MoE: the predictor's routers and norms stay resident, inside the budget.
        predictor = sum(t.dtype.itemsize * torch.Size(t.shape).numel() for b in dense_order(config.num_layers)
                        if any(t.name == "router" for t in file.blocks[b].tensors)
                        for t in file.blocks[b].tensors if t.name in ("router", "norm"))
        head = file.block_bytes(HEAD_BLOCK)  # the LM head rows stay resident, inside the budget (untied heads)
        file.close()
        rope = 2 * 4 * max_context * config.head_dim  # cos and sin tables, fp32
        kv = max(kv, head + predictor + rope + 2 * 4 * config.num_layers * max_batch * max_context * shard.num_kv_heads
                 * config.head_dim)
    return kv + slots * largest


def _run(model_dir: Path, weights: list[float], decode: list[int], **spec: object) -> tuple[torch.Tensor, list]:
    with inprocess_cluster(model_dir, weights, **spec) as executor:  # type: ignore[arg-type]
        got = [executor.step([PROMPT], [SeqSpan(slot=0, start=0, length=len(PROMPT))], all_logits=True)]
        # A batch step: a second sequence prefills while the first decodes.
        got.append(executor.step([[decode[0]], PROMPT[:5]], [SeqSpan(0, len(PROMPT), 1), SeqSpan(1, 0, 5)]))
        for i, token in enumerate(decode[1:], start=1):
            got.append(executor.step([[token], [token]], [SeqSpan(0, len(PROMPT) + i, 1), SeqSpan(1, 4 + i, 1)]))
        return torch.cat(got), [executor.rank.stats()]


@pytest.fixture(scope="module")
def llama4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four layers, so that windows of 2 and 3 blocks are both smaller than the 8 blocks."""
    return build_checkpoint(tmp_path_factory.mktemp("llama4"), "llama", num_hidden_layers=4)


@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_window_logits_equal_resident(checkpoints, llama4: Path, tmp_path: Path, arch: str, slots: int) -> None:
    weights = [2.0, 1.0, 1.0]
    shard_dir = _shards(llama4 if arch == "llama" else checkpoints(arch), weights, tmp_path / "shards")
    decode = [5, 9, 300, 42, 17, 8]
    resident, _ = _run(shard_dir, weights, decode)
    budget = _window_budget(shard_dir, weights, slots)
    own_cache = {"expert_cache_bytes": 1 << 30} if arch != "llama" else {}  # the budget is the window's alone
    streamed, stats = _run(shard_dir, weights, decode, memory_budget=budget, **own_cache)
    assert torch.equal(streamed, resident)
    assert stats[0]["window_slots"] == slots
    shard_bytes = ShardFile(rank_shard_path(shard_dir, plan_shards(ModelConfig.from_dir(shard_dir), weights)[0]))
    dense = sum(shard_bytes.block_bytes(b) for b in dense_order(ModelConfig.from_dir(shard_dir).num_layers))
    assert stats[0]["weight_bytes_read"] >= 1 + len(decode) * dense  # every step read every block again
    assert 0.0 <= stats[0]["overlap_ratio"] <= 1.0


def test_without_an_expert_cache_the_experts_share_the_memory_budget(checkpoints, tmp_path: Path) -> None:
    """``--memory-budget`` alone bounds the experts too: they get what the window leaves (they
    were once all loaded outside it); a budget that leaves too few is a clear error."""
    shard_dir = _shards(checkpoints("qwen2_moe"), [1.0], tmp_path / "shards")
    config = ModelConfig.from_dir(shard_dir)
    file = ShardFile(rank_shard_path(shard_dir, plan_shards(config, [1.0])[0]))
    expert = max(file.block_bytes(f"layers.{m}.experts.{e}") for m in range(config.num_layers)
                 for e in range(config.num_experts) if file.has(f"layers.{m}.experts.{e}"))
    file.close()
    window = _window_budget(shard_dir, [1.0], 2)
    resident, _ = _run(shard_dir, [1.0], [5, 9, 300])
    streamed, stats = _run(shard_dir, [1.0], [5, 9, 300], memory_budget=window + 3 * expert)
    assert torch.equal(streamed, resident)
    assert stats[0]["window_slots"] == 2 and stats[0]["expert_cache_slots"] == 3
    with pytest.raises(BudgetError, match="without --expert-cache the experts get what --memory-budget leaves"):
        _run(shard_dir, [1.0], [5], memory_budget=window + expert)
    # A budget with room for a third window buffer, but then for less than one token's experts
    # (2 here): the window keeps 2 buffers and the experts the rest. Before, the window took 3 and
    # the start failed, though a smaller budget started.
    largest = _window_budget(shard_dir, [1.0], 3) - window
    assert config.experts_per_token == 2 and largest > expert
    between, stats = _run(shard_dir, [1.0], [5, 9, 300], memory_budget=window + largest + expert)
    assert torch.equal(between, resident)
    assert stats[0]["window_slots"] == 2 and stats[0]["expert_cache_slots"] >= 2


def test_window_restarts_after_an_abandoned_step(checkpoints, tmp_path: Path) -> None:
    """A step that dies half-way leaves the window mid-cycle; the next step starts at layer 0."""
    shard_dir = _shards(checkpoints("llama"), [1.0], tmp_path / "shards")
    decode = [5, 9, 300]
    resident, _ = _run(shard_dir, [1.0], decode)
    with inprocess_cluster(shard_dir, [1.0], memory_budget=_window_budget(shard_dir, [1.0], 2)) as executor:
        store = executor.rank.store
        with store.attention(0):
            pass
        with store.attention(1):  # MLP 0 skipped, as by a step that died: the window restarts here
            pass
        got = [executor.step([PROMPT], [SeqSpan(slot=0, start=0, length=len(PROMPT))], all_logits=True)]
        got.append(executor.step([[decode[0]], PROMPT[:5]], [SeqSpan(0, len(PROMPT), 1), SeqSpan(1, 0, 5)]))
        for i, token in enumerate(decode[1:], start=1):
            got.append(executor.step([[token], [token]], [SeqSpan(0, len(PROMPT) + i, 1), SeqSpan(1, 4 + i, 1)]))
        assert store.restarts >= 2  # type: ignore[attr-defined]
    assert torch.equal(torch.cat(got), resident)


def test_budget_too_small_is_a_clear_error(checkpoints, tmp_path: Path) -> None:
    shard_dir = _shards(checkpoints("llama"), [1.0], tmp_path / "shards")
    budget = _window_budget(shard_dir, [1.0], 2) - 1
    with pytest.raises(BudgetError, match="too small: the sliding window needs at least 2 blocks"), \
            inprocess_cluster(shard_dir, [1.0], memory_budget=budget):
        pass


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_a_streamed_shard_in_another_dtype_is_a_clear_error(checkpoints, llama4: Path, tmp_path: Path,
                                                            arch: str) -> None:
    """Streamed blocks are used as their file bytes lie. An MoE rank always streams its experts, so
    an fp32 MoE shard served in bf16 failed at its first step with a matmul dtype error."""
    shard_dir = _shards(llama4 if arch == "llama" else checkpoints(arch), [1.0], tmp_path / "shards")
    streaming = {"memory_budget": _window_budget(shard_dir, [1.0], 2, max_context=128)} if arch == "llama" else {}
    with pytest.raises(BudgetError, match="holds float32 weights but this rank computes in bfloat16"), \
            inprocess_cluster(shard_dir, [1.0], dtype=torch.bfloat16, **streaming):  # type: ignore[arg-type]
        pass
    if arch == "qwen2_moe":  # the same shard in its own dtype serves
        with inprocess_cluster(shard_dir, [1.0]) as executor:
            assert executor.step([PROMPT], [SeqSpan(slot=0, start=0, length=len(PROMPT))]).isfinite().all()


def test_streaming_needs_shard_files(checkpoints) -> None:
    with pytest.raises(BudgetError, match="streaming reads `edgellm shard` output"), \
            inprocess_cluster(checkpoints("llama"), [1.0], memory_budget=64 << 10):
        pass


class _PeakSampler:
    """Samples a process's RSS from outside (psutil) until stopped."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _vm_hwm(pid: int) -> int:
    """The kernel's high-water mark of the process's RSS, read from outside it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _greedy(executor: Executor, tokens: int) -> list[int]:
    logits = executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))])
    out = [int(logits[0].argmax())]
    for i in range(tokens - 1):
        out.append(int(executor.step([[out[-1]]], [SeqSpan(0, len(PROMPT) + i, 1)])[0].argmax()))
    return out


@pytest.mark.cluster
def test_worker_process_streams_a_shard_4x_its_budget(tmp_path: Path) -> None:
    """Rank 1 is a real `edgellm worker --memory-budget 64MiB` holding 3/4 of a ~470 MB model
    (~350 MB, 5x its budget); its tokens equal the all-resident run and its peak RSS, read
    from outside the process, stays under budget + RUNTIME_OVERHEAD."""
    budget = 64 * MiB
    model_dir = build_checkpoint(tmp_path / "big", "llama", hidden_size=1024, intermediate_size=2816,
                                 num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4)
    weights = [1.0, 3.0]
    shard_dir = _shards(model_dir, weights, tmp_path / "shards")
    for f in model_dir.glob("*.safetensors"):
        f.unlink()  # only the shards are read from now on
    config = ModelConfig.from_dir(shard_dir)
    shards = plan_shards(config, weights)
    worker_bytes = rank_shard_path(shard_dir, shards[1]).stat().st_size
    assert worker_bytes >= 4 * budget
    tokens = 6
    with inprocess_cluster(shard_dir, weights, max_batch=1, max_context=64) as executor:
        expected = _greedy(executor, tokens)

    port = free_port()
    worker = edgellm("worker", "--host", "127.0.0.1", "--port", str(port), "--cluster-token", "t", "--threads", "1",
                     "--memory-budget", "64MiB", log_path=tmp_path / "worker.log")
    sampler = _PeakSampler(worker.pid)
    hub = StarHub(2, token="t", timeout_s=120)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    meta = ((TOKEN_METADATA_KEY, "t"),)
    executor = None
    try:
        stub = pb_grpc.WorkerStub(channel)
        grpc.channel_ready_future(channel).result(timeout=START_S)
        stub.Configure(pb.ConfigureRequest(
            shard=shard_to_proto(shards[1]), model_dir=str(shard_dir), hub_address=hub.address,
            config_json=(shard_dir / "config.json").read_text(), max_batch=1, max_context=64, dtype="float32"),
            metadata=meta, timeout=30)
        loading = threading.Thread(target=lambda: list(stub.Load(pb.LoadRequest(), metadata=meta, timeout=START_S)))
        loading.start()
        executor = Executor(RankSpec(str(shard_dir), config, shards[0], 1, 64), hub)
        hub.wait_for_ranks(START_S)
        loading.join(START_S)
        start = time.monotonic()
        got = _greedy(executor, tokens)
        elapsed = time.monotonic() - start
        stats = stats_dict(stub.Stats(pb.StatsRequest(), metadata=meta, timeout=10))
        peak_outside = max(sampler.stop(), _vm_hwm(worker.pid))
    finally:
        if executor is not None:
            executor.close()
        else:
            hub.close()
        channel.close()
        worker.kill()
        worker.wait()
    assert got == expected
    assert stats["window_slots"] >= 2 and stats["weight_bytes"] <= budget
    assert stats["weight_bytes_read"] >= tokens * 0.9 * worker_bytes, stats  # the shard really was re-read
    assert peak_outside <= budget + RUNTIME_OVERHEAD, (
        f"peak RSS {peak_outside / MiB:.0f} MiB > budget 64 MiB + {RUNTIME_OVERHEAD / MiB:.0f} MiB; "
        f"shard {worker_bytes / MiB:.0f} MiB, {elapsed:.1f} s for {tokens} tokens")
    assert stats["peak_rss_bytes"] <= budget + RUNTIME_OVERHEAD


def test_closing_a_streaming_moe_cluster_closes_its_shard_files(checkpoints, tmp_path: Path) -> None:
    """The window and the expert cache each read (and the cache hints read-ahead) through a
    descriptor of their own: a worker that loads models one after another (a coordinator restart
    reconfigures it) must not keep them per load, nor wait for the garbage collector to close them."""
    weights = [1.0, 1.0]
    shard_dir = _shards(checkpoints("mixtral"), weights, tmp_path / "shards")
    budget = _window_budget(shard_dir, weights, 2)
    fds = Path("/proc/self/fd")
    before = {p.name for p in fds.iterdir()}
    for _ in range(2):
        _run(shard_dir, weights, [5, 9], memory_budget=budget, expert_cache_bytes=3 * 36 * 1024)
    leaked = [os.readlink(fds / n) for n in {p.name for p in fds.iterdir()} - before
              if (fds / n).exists() and (fds / n).resolve().name.endswith(".safetensors")]
    assert not leaked, leaked
