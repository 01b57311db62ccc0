"""The native decode step (``worker.models.native_step``, ``kernels/step.c``) computes what the
Python path computes, on 1 rank, on 2 ranks and on 3-4 (a star whose hub sums in C,
``lane_hub_allreduce_f32``, and runs the native step too) in real processes over real lanes;
steps it does not cover run in Python and the log says so; faults in the middle of a native step
(ABORT, STOP, a rank gone, allreduces that time out and resume, on a worker or on the hub) end or
finish it as on the Python path.

Exact equality is asserted against the Python path: the step calls the same kernels with the
same arguments in the same order, the residual adds are the same fp32 adds, the two-rank sum is
one fp32 addition of two terms (commutative), and the star's hub adds the partials in rank order
as the Python star does (every rank takes its bits), so any difference is a bug, not rounding.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_models import load_reference
from worker.comm import collective
from worker.comm import lane as lanes
from worker.comm.collective import StarHub
from worker.config import ModelConfig
from worker.kernels import native
from worker.kernels.quant import QuantSpec
from worker.models import native_step
from worker.rank.executor import Executor
from worker.rank.runtime import RankSpec, WorkerRank
from worker.rank.step import SeqSpan
from worker.shards.sharding import plan_shards

pytestmark = pytest.mark.skipif(native.decode_step() is None or lanes.library() is None,
                                reason="needs the native kernels and the lane library")
TOKEN = "t"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "server" / "default_model"
PROMPTS = ([1, 17, 42, 99, 7, 250, 31, 5], [3, 77, 200, 11, 64])
DECODE_STEPS = 6
TOL = 1e-4  # against transformers, as tests/test_reference.py
# int8 allreduce payloads: the max logit error as a share of the smallest row's logit range
# (measured 0.030 against a range of 4.26 on the 2-rank tiny Llama: 0.7%)
SYNC_INT8_SHARE = 0.02


def _run_worker(spec: RankSpec, address: str, native_on: bool, steps: Any) -> None:
    """A worker rank process: serves until the hub stops it, then reports its native steps."""
    os.environ[native_step.DISABLE_ENV] = "1" if native_on else "0"
    torch.set_num_threads(1)
    worker = WorkerRank(spec, address, TOKEN)
    worker.start()
    while worker.running:
        time.sleep(0.05)
    worker.stop()
    steps.put(worker.model.native_step.steps if worker.model.native_step is not None else 0)


def _specs(model_dir: Path, ranks: int, sync: str = "fp32") -> list[RankSpec]:
    config = ModelConfig.from_dir(model_dir)
    return [RankSpec(str(model_dir), config, s, max_batch=2, max_context=64, sync_dtype=sync)
            for s in plan_shards(config, [1.0] * ranks)]


def _decode(executor: Executor) -> torch.Tensor:
    """Logits (steps, V) of two prompts prefilled, then decoded alone (B = 1) and together (B = 2)."""
    got = []
    for slot, prompt in enumerate(PROMPTS):
        got.append(executor.step([prompt], [SeqSpan(slot, 0, len(prompt))]))
    for i in range(DECODE_STEPS):
        tokens = [[5 + i], [9 + 2 * i]]
        spans = [SeqSpan(slot, len(p) + i, 1) for slot, p in enumerate(PROMPTS)]
        got.append(executor.step(tokens[:1], spans[:1]) if i % 2 == 0 else executor.step(tokens, spans))
        if i % 2 == 0:  # keep slot 1 in step: its token of this position alone
            got.append(executor.step(tokens[1:], spans[1:]))
    return torch.cat(got)


def _cluster_logits(model_dir: Path, ranks: int, native_on: bool, monkeypatch: pytest.MonkeyPatch,
                    sync: str = "fp32") -> tuple[torch.Tensor, list[int]]:
    """(logits of ``_decode``, native steps run by each rank) with rank 0 here and the other
    ranks real processes, joined by lanes, their allreduces in ``sync``."""
    monkeypatch.setenv(native_step.DISABLE_ENV, "1" if native_on else "0")
    specs = _specs(model_dir, ranks, sync)
    hub = StarHub(ranks, token=TOKEN, timeout_s=60, lane=True, sync_dtype=sync)
    ctx = mp.get_context("spawn")
    steps = ctx.Queue()
    procs = [ctx.Process(target=_run_worker, args=(s, hub.address, native_on, steps), daemon=True) for s in specs[1:]]
    for p in procs:
        p.start()
    executor = None
    try:
        executor = Executor(specs[0], hub)
        hub.wait_for_ranks(120)
        assert ranks == 1 or hub.on_lanes
        logits = _decode(executor)
        ours = executor.model.native_step.steps if executor.model.native_step is not None else 0
    finally:
        if executor is not None:
            executor.close()
        else:
            hub.close()
        others = [steps.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
    return logits, [ours, *others]


def _model(checkpoints: Any, tmp_path: Path, arch: str, weights: str, ranks: int) -> Path:
    model_dir = checkpoints(arch)
    if weights == "fp32":
        return model_dir
    from server.quantized_cache import quantized_shards

    spec = QuantSpec(bits=8) if weights == "int8" else QuantSpec(bits=4, group_size=32)
    return quantized_shards(model_dir, [1.0] * ranks, spec, torch.float32, tmp_path)


NATIVE_STEPS = 2 * DECODE_STEPS - DECODE_STEPS // 2  # decode steps of _decode: B=1 twice, B=2 once, per pair


@pytest.mark.parametrize(("arch", "weights", "ranks", "sync"), [
    ("llama", "fp32", 1, "fp32"), ("llama", "fp32", 2, "fp32"), ("qwen2", "fp32", 2, "fp32"),
    ("mistral", "fp32", 2, "fp32"), ("llama", "int8", 1, "fp32"), ("llama", "int8", 2, "fp32"),
    ("llama", "int4", 1, "fp32"), ("llama", "fp32", 3, "fp32"), ("qwen2", "fp32", 3, "fp32"),
    ("llama", "int8", 3, "fp32"), ("llama", "fp32", 4, "fp32"),
    ("llama", "fp32", 2, "int8"), ("llama", "int8", 3, "int8")])
def test_the_native_step_computes_the_python_paths_bits(checkpoints, tmp_path: Path, arch: str, weights: str,
                                                       ranks: int, sync: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """qwen2 has biases (q/k/v, and rank 0's none here), mistral a sliding window of 12
    positions (the prompts plus decode pass it); int4 needs K % 32, which 2 ranks' MLP split lacks.
    int8 sync: the step's allreduces quantize in C (kernels/lane.c) what Python quantizes in
    wire.py, and both must give the same bits; the rounding must show against transformers."""
    model_dir = _model(checkpoints, tmp_path, arch, weights, ranks)
    native_logits, native_steps = _cluster_logits(model_dir, ranks, True, monkeypatch, sync)
    python_logits, python_steps = _cluster_logits(model_dir, ranks, False, monkeypatch, sync)
    assert native_steps == [NATIVE_STEPS] * ranks, "every decode step must have run natively on every rank"
    assert python_steps == [0] * ranks
    assert torch.equal(native_logits, python_logits), (native_logits - python_logits).abs().max()
    if weights == "fp32":
        reference = _reference_logits(checkpoints(arch))
        error = (native_logits - reference).abs().max().item()
        if sync == "fp32":
            assert error <= TOL
        else:  # lossy (the payloads were int8), by a small part of what tells tokens apart
            spread = (reference.amax(-1) - reference.amin(-1)).min().item()
            assert TOL < error <= SYNC_INT8_SHARE * spread, (error, spread)


def _reference_logits(model_dir: Path) -> torch.Tensor:
    """transformers' logits for ``_decode``'s steps, each sequence run alone."""
    reference = load_reference(model_dir)
    rows: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        for slot, prompt in enumerate(PROMPTS):
            fed = prompt + [t for i in range(DECODE_STEPS) for t in ([5 + i], [9 + 2 * i])[slot]]
            rows[slot] = list(reference(torch.tensor([fed])).logits[0, len(prompt) - 1:])
    got = [rows[0][0], rows[1][0]]
    for i in range(DECODE_STEPS):
        got += [rows[0][i + 1], rows[1][i + 1]]
    return torch.stack(got)


def test_steps_the_native_step_does_not_cover_run_in_python_and_the_log_says_why(
        checkpoints, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger=native_step.__name__)
    # a model with q/k norms and experts: never native
    moe = _specs(checkpoints("qwen3_moe"), 1)[0]
    with _inprocess(moe, 1, lane=False) as (executor, _):
        assert executor.model.native_step is None
        executor.step([[1, 2, 3]], [SeqSpan(0, 0, 3)])
    assert "rank 0: decode steps run layer by layer in Python: Qwen3MoeRankModel overrides" in caplog.text
    # two ranks over ZeroMQ: the allreduces are not one C call
    caplog.clear()
    specs = _specs(checkpoints("llama"), 2)
    with _inprocess(specs[0], 2, lane=False, worker_spec=specs[1]) as (executor, rank):
        executor.step([[1, 2, 3]], [SeqSpan(0, 0, 3)])
        executor.step([[4]], [SeqSpan(0, 3, 1)])
        assert executor.model.native_step is not None and executor.model.native_step.steps == 0
        assert rank is not None and rank.model.native_step is not None and rank.model.native_step.steps == 0
    assert "rank 0: some steps run layer by layer in Python: prefill steps" in caplog.text
    assert "rank 0: some steps run layer by layer in Python: steps whose allreduces are not one C call" in caplog.text
    assert "rank 1: some steps run layer by layer in Python: steps whose allreduces" in caplog.text
    # turned off
    caplog.clear()
    monkeypatch.setenv(native_step.DISABLE_ENV, "0")
    with _inprocess(specs[0], 2, lane=True, worker_spec=specs[1]) as (executor, _):
        assert executor.model.native_step is None
    assert f"rank 0: decode steps run layer by layer in Python: {native_step.DISABLE_ENV}=0" in caplog.text


class _inprocess:
    """Rank 0's executor and its worker ranks (``worker_spec``, or ``worker_specs`` for a star),
    each in a thread of this process; entered: (executor, the first worker)."""

    def __init__(self, spec: RankSpec, ranks: int, lane: bool, worker_spec: RankSpec | None = None,
                 worker_specs: list[RankSpec] | None = None):
        self.spec, self.ranks, self.lane = spec, ranks, lane
        self.worker_specs = worker_specs if worker_specs is not None else [worker_spec] if worker_spec else []

    def __enter__(self) -> tuple[Executor, WorkerRank | None]:
        self.hub = StarHub(self.ranks, token=TOKEN, timeout_s=30, lane=self.lane)
        self.workers = [WorkerRank(s, self.hub.address, TOKEN) for s in self.worker_specs]
        self.executor = Executor(self.spec, self.hub)
        if self.workers:
            joining = [threading.Thread(target=w.start) for w in self.workers]
            for t in joining:
                t.start()
            self.hub.wait_for_ranks(60)
            for t in joining:
                t.join()
        return self.executor, self.workers[0] if self.workers else None

    def __exit__(self, *exc: object) -> None:
        self.executor.close()
        for w in self.workers:
            w.stop()


def _rank_waits_in_its_native_step(checkpoints) -> tuple[_inprocess, Executor, WorkerRank, torch.Tensor]:
    """A 2-rank cluster on lanes whose worker is inside a native decode step, waiting for the
    hub's first partial (the hub started the step but computes nothing)."""
    specs = _specs(checkpoints("llama"), 2)
    cluster = _inprocess(specs[0], 2, lane=True, worker_spec=specs[1])
    executor, rank = cluster.__enter__()
    assert rank is not None and rank.model.native_step is not None
    hidden = torch.randn(1, specs[0].config.hidden_size)
    executor.hub.start_step(torch.tensor([[0, 0, 1]]), hidden)
    collective_seq = rank.link
    deadline = time.monotonic() + 60
    while collective_seq._seq == 0 and time.monotonic() < deadline:  # native_seqs took the step's seqs
        time.sleep(0.01)
    assert collective_seq._seq == 2 * specs[0].config.num_layers, "the rank never entered its native step"
    time.sleep(0.3)  # past the C call's wait slice: the rank now waits from Python (native_failed)
    return cluster, executor, rank, hidden


def test_an_abort_while_a_rank_waits_in_its_native_step_ends_the_step_and_the_next_one_runs(
        checkpoints, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cluster, executor, rank, _ = _rank_waits_in_its_native_step(checkpoints)
    try:
        executor.hub.abort_step()
        deadline = time.monotonic() + 30
        while "step abandoned" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "rank 1: step abandoned: hub sent ABORT during the step" in caplog.text
        assert rank.steps == 0 and rank.running
        token = 42
        logits = executor.step([[token]], [SeqSpan(0, 0, 1)])
        native = rank.model.native_step
        assert native is not None
        deadline = time.monotonic() + 30  # the rank returns from its last allreduce as rank 0 does
        while native.steps == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert native.steps == 1
        with torch.no_grad():
            expected = load_reference(checkpoints("llama"))(torch.tensor([[token]])).logits[0]
        assert (logits - expected).abs().max().item() <= TOL
    finally:
        cluster.__exit__()


def test_a_rank_stopped_while_it_waits_in_its_native_step_leaves_at_once(checkpoints) -> None:
    cluster, _, rank, _ = _rank_waits_in_its_native_step(checkpoints)
    try:
        rank.stop()
        assert not rank.running, "stop() returned while the step thread still waits for the hub"
        assert rank.steps == 0
    finally:
        cluster.__exit__()


def test_allreduces_that_time_out_in_c_resume_from_python_with_the_same_bits(
        checkpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each allreduce waits 1 ms in C, then returns to Python (``native_failed``), which waits,
    sums, and calls the step again from the next stage: the same logits as one call. Rank 0
    starts each step 5 ms late, so the worker's first allreduce does time out."""
    specs = _specs(checkpoints("llama"), 2)
    with _inprocess(specs[0], 2, lane=True, worker_spec=specs[1]) as (executor, _):
        straight = _decode(executor)
    monkeypatch.setattr(collective, "CANCEL_POLL_MS", 1)
    monkeypatch.setattr(collective, "LIVENESS_POLL_MS", 1)
    monkeypatch.setenv(lanes.SPIN_ENV, "0")
    resumed_calls = []
    real = native_step.NativeStep._run

    def counting(self: native_step.NativeStep, *args: Any) -> torch.Tensor:
        if self._who == "rank 0":
            time.sleep(0.005)  # the worker's first allreduce waits past its 1 ms slice
        out = real(self, *args)
        resumed_calls.append(self.resumed)
        return out

    monkeypatch.setattr(native_step.NativeStep, "_run", counting)
    with _inprocess(specs[0], 2, lane=True, worker_spec=specs[1]) as (executor, _):
        resumed = _decode(executor)
    assert torch.equal(straight, resumed)
    assert sum(resumed_calls) > 0, "no allreduce timed out in C: the resume path was not exercised"


@pytest.mark.parametrize("ranks", [2, 3])
def test_allreduces_that_time_out_in_the_hubs_c_star_resume_from_python_with_the_same_bits(
        checkpoints, monkeypatch: pytest.MonkeyPatch, ranks: int) -> None:
    """The workers start each step 5 ms late: the hub's allreduce (the exchange at 2 ranks, the C
    star at 3) waits past its 1 ms slice in C, returns to Python and goes on; same logits."""
    specs = _specs(checkpoints("llama"), ranks)
    with _inprocess(specs[0], ranks, lane=True, worker_specs=specs[1:]) as (executor, _):
        straight = _decode(executor)
    monkeypatch.setattr(collective, "CANCEL_POLL_MS", 1)
    monkeypatch.setattr(collective, "LIVENESS_POLL_MS", 1)
    monkeypatch.setenv(lanes.SPIN_ENV, "0")
    real = native_step.NativeStep._run

    def late(self: native_step.NativeStep, *args: Any) -> torch.Tensor:
        if self._who != "rank 0":
            time.sleep(0.005)
        return real(self, *args)

    monkeypatch.setattr(native_step.NativeStep, "_run", late)
    with _inprocess(specs[0], ranks, lane=True, worker_specs=specs[1:]) as (executor, _):
        resumed = _decode(executor)
        hub_step = executor.model.native_step
        assert hub_step is not None and hub_step.steps == NATIVE_STEPS
        assert hub_step.resumed > 0, "no allreduce of the hub timed out in C: the resume path was not exercised"
        assert (executor.hub._star is not None) == (ranks > 2)
    assert torch.equal(straight, resumed)


def test_a_rank_gone_while_the_hub_waits_in_its_native_step_ends_the_step_and_the_next_one_runs(
        checkpoints, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 ranks: rank 2 holds its first decode step back; the hub waits for its partial in C,
    returns to Python each slice, where the heartbeat now says rank 2 is gone: the step fails,
    the hub aborts it (as the engine does), every worker abandons it, and the step run again is
    native on every rank and right."""
    caplog.set_level(logging.INFO)
    specs = _specs(checkpoints("llama"), 3)
    hold = threading.Event()
    real = native_step.NativeStep._run

    def held(self: native_step.NativeStep, *args: Any) -> torch.Tensor:
        if self._who == "rank 2":
            hold.wait(60)
        return real(self, *args)

    monkeypatch.setattr(native_step.NativeStep, "_run", held)
    cluster = _inprocess(specs[0], 3, lane=True, worker_specs=specs[1:])
    executor, _ = cluster.__enter__()
    try:
        prompt = [1, 17, 42]
        executor.step([prompt], [SeqSpan(0, 0, 3)])  # prefill: in Python, not held
        executor.hub.missing_ranks = lambda: {2}
        with pytest.raises(collective.CollectiveError, match="rank-2 stopped answering heartbeats mid-step"):
            executor.step([[7]], [SeqSpan(0, 3, 1)])
        executor.hub.abort_step()
        executor.hub.missing_ranks = set
        hold.set()
        deadline = time.monotonic() + 30
        while caplog.text.count("step abandoned: hub sent ABORT during the step") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for rank in (1, 2):
            assert f"rank {rank}: step abandoned: hub sent ABORT during the step" in caplog.text
        assert executor.hub.on_lanes
        logits = executor.step([[7]], [SeqSpan(0, 3, 1)])
        steps = [m.native_step.steps for m in (executor.model, *(w.model for w in cluster.workers))]
        deadline = time.monotonic() + 30  # the workers return from their last allreduce as rank 0 does
        while steps != [1, 1, 1] and time.monotonic() < deadline:
            time.sleep(0.01)
            steps = [m.native_step.steps for m in (executor.model, *(w.model for w in cluster.workers))]
        assert steps == [1, 1, 1]
        with torch.no_grad():
            expected = load_reference(checkpoints("llama"))(torch.tensor([prompt + [7]])).logits[0, -1:]
        assert (logits - expected).abs().max().item() <= TOL
    finally:
        hold.set()
        cluster.__exit__()


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_served_greedy_text_is_the_python_paths(tmp_path: Path, capability: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` with 2 ranks on lanes, the embedded model: the same text with the native step on
    and off. Under ``ATEN_CPU_CAPABILITY=default`` the native kernels are off, so is the step, and
    the log of both ranks says so."""
    import httpx

    from tests.processes import served

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    texts = {}
    for on in ("1", "0"):
        monkeypatch.setenv(native_step.DISABLE_ENV, on)
        log = tmp_path / f"serve-{on}.log"
        with served(DEFAULT_MODEL, "--local-workers", "1", "--lanes", "--model-name", "m", log_path=log) as url:
            texts[on] = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        text = log.read_text()
        assert "Traceback" not in text
        for rank in (0, 1):
            assert (f"rank {rank}: decode steps run natively" in text) == (on == "1" and capability == "avx2"), text
            if on == "0":
                assert f"rank {rank}: decode steps run layer by layer in Python: {native_step.DISABLE_ENV}=0" in text
            elif capability == "default":
                assert f"rank {rank}: decode steps run layer by layer in Python: no native kernels" in text
    assert texts["1"] == texts["0"] and len(texts["1"]) > 40
