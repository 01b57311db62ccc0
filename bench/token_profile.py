"""Where one decode token's time goes at 2 ranks (lanes, native step), as JSON: per-token µs of
each phase on rank 0 and on the worker, for three drivers of the same loaded cluster, interleaved:

- ``direct``: a greedy loop on ``Executor.step`` (what ``bench/native_step.py`` measures);
- ``engine``: the serving engine (``server.engine.Engine``: scheduler, sampler, detokenizer,
  metrics), a request submitted from an asyncio loop in this process, no HTTP;
- ``http``: the same engine behind the FastAPI app (uvicorn in a thread of this process, as
  ``edgellm serve`` runs it), read as an SSE stream by a client in another process.

    .venv/bin/python bench/token_profile.py --models DIR [--make-models] [--only small_fp32_2,small_int8_2]
        [--tokens 64] [--rounds 3] [--out FILE]

DIR holds ``bench/tp_vs_dllama.py``'s checkpoints (``--make-models`` writes them). Rank 0 runs in
this process and rank 1 in a spawned one, 1 thread each, batch 1, greedy. Phases are timed by
wrapping the functions a step calls (``time.perf_counter_ns``, about 0.3 µs per wrap); ``other``
is a total less its timed parts. ``allreduce_wait`` is the part of the native step spent in its
allreduces (step.c's own counters), i.e. waiting for the other rank. A token's time is a whole
request's (prompt of one token, so every step is a native decode step) over its tokens: from the
first step to the last logits (``direct``), from ``submit`` to the last event (``engine``), from
the POST to ``[DONE]`` seen by the client (``http``). The worker's ``idle`` is its time between
steps (waiting for rank 0). The machine is shared: compare drivers within one round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
import types
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402
from tp_vs_dllama import make_models, set_lanes  # noqa: E402

from worker.comm.collective import StarHub  # noqa: E402
from worker.config import ModelConfig  # noqa: E402
from worker.rank.executor import Executor  # noqa: E402
from worker.rank.runtime import RankSpec, WorkerRank  # noqa: E402
from worker.rank.step import SeqSpan  # noqa: E402
from worker.shards.sharding import plan_shards  # noqa: E402

log = logging.getLogger("bench.token_profile")
TOKEN = "token-profile"
PROMPT = [3]  # one token: every step, the first included, is a native decode step
# (name, model, weights)
CONFIGS = [("small_fp32_2", "small", "fp32"), ("small_int8_2", "small", "int8"), ("big_fp32_2", "big", "fp32")]


class Phases:
    """Nanoseconds spent in each named phase, summed over calls: wall (``ns``) and the calling
    thread's CPU (``cpu``; on a loaded machine the wall time also holds waits for a core)."""

    def __init__(self) -> None:
        self.ns: defaultdict[str, int] = defaultdict(int)
        self.cpu: defaultdict[str, int] = defaultdict(int)
        self.process_cpu = time.process_time_ns()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter_ns(), time.thread_time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ns[name] += time.perf_counter_ns() - start
                self.cpu[name] += time.thread_time_ns() - cpu
        return timed

    def take(self) -> dict[str, Any]:
        """The sums since the last ``take`` (the process's CPU included), and a fresh start."""
        now = time.process_time_ns()
        out = {"ns": dict(self.ns), "cpu": dict(self.cpu), "process_cpu": now - self.process_cpu}
        self.ns.clear()
        self.cpu.clear()
        self.process_cpu = now
        return out

    def patch(self, owner: Any, attr: str, name: str | None = None) -> None:
        setattr(owner, attr, self.wrap(name or attr, getattr(owner, attr)))



def _timed_plan(phases: Phases, module: types.ModuleType) -> None:
    """``module.StepPlan.build`` timed as ``plan`` (modules call it through their own name)."""
    plan_class = module.StepPlan
    module.StepPlan = types.SimpleNamespace(build=phases.wrap("plan", plan_class.build))  # type: ignore[attr-defined]


def _instrument_model(phases: Phases, model: Any) -> None:
    """The layers' forward, the native step's Python and its one C call, its allreduce waits."""
    phases.patch(model, "forward")
    step = model.native_step
    if step is None:
        return
    phases.patch(step, "run", "native_step")
    step._kernel = types.SimpleNamespace(run=phases.wrap("native_call", step._kernel.run),
                                         scratch_floats=step._kernel.scratch_floats)

    passed_on = step._on_allreduces  # rank 0's: the executor's list, which the engine's metrics read

    def waited(seconds: list[float]) -> None:
        phases.ns["allreduce_wait"] += int(sum(seconds) * 1e9)
        if passed_on is not None:
            passed_on(seconds)
    step._on_allreduces = waited


# --- the worker process ------------------------------------------------------------------------

def _worker_process(spec: RankSpec, address: str, control: Any) -> None:
    """Rank 1, instrumented; answers "report" (per-phase ns since the last one) on ``control``."""
    import worker.rank.runtime as runtime

    torch.set_num_threads(1)
    phases = Phases()
    for name in ("spans_from_tensor", "validate_step", "logit_rows"):
        phases.patch(runtime, name)
    _timed_plan(phases, runtime)
    rank = WorkerRank(spec, address, TOKEN)
    phases.patch(rank.link, "recv", "receive")
    phases.patch(rank.link, "begin")
    phases.patch(rank.link, "send_logits")
    phases.patch(rank.loaded.head, "logits", "head")
    _instrument_model(phases, rank.model)
    phases.patch(rank, "_send_logits", "head_and_send")
    rank.start()

    def answer() -> None:
        reported = 0
        while control.poll(None):
            if control.recv() != "report":
                return
            control.send(phases.take() | {"steps": rank.steps - reported})
            reported = rank.steps
    threading.Thread(target=answer, daemon=True).start()
    while rank.running:
        time.sleep(0.1)
    rank.stop()


@contextmanager
def cluster(model_dir: Path, max_context: int) -> Iterator[tuple[Executor, Any]]:
    """(rank 0's executor, the worker's control pipe): 2 ranks on loopback, 1 thread each."""
    config = ModelConfig.from_dir(model_dir)
    specs = [RankSpec(str(model_dir), config, s, max_batch=1, max_context=max_context)
             for s in plan_shards(config, [1.0, 1.0])]
    torch.set_num_threads(1)
    hub = StarHub(2, token=TOKEN, timeout_s=120)
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_worker_process, args=(specs[1], hub.address, theirs), daemon=True)
    proc.start()
    executor = Executor(specs[0], hub)
    try:
        hub.wait_for_ranks(120)
        yield executor, ours
    finally:
        executor.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def thread_cpu_ns(thread: threading.Thread) -> int:
    """CPU time of a running thread of this process."""
    assert thread.ident is not None
    return time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))


def _worker_report(control: Any) -> dict[str, Any]:
    control.send("report")
    return control.recv()


# --- rank 0's instrumentation and the three drivers ------------------------------------------

def instrument_rank0(phases: Phases, executor: Executor) -> None:
    import worker.rank.executor as executor_module

    for name in ("spans_to_tensor", "logit_rows"):
        phases.patch(executor_module, name)
    _timed_plan(phases, executor_module)
    phases.patch(executor.hub, "start_step")
    phases.patch(executor.hub, "_broadcast", "broadcast")  # the STEP message over ZeroMQ, inside start_step
    phases.patch(executor.hub, "gather_logits")
    phases.patch(executor.rank.head, "logits", "head")
    _instrument_model(phases, executor.model)
    phases.patch(executor, "step")


def direct(executor: Executor, tokens: int) -> tuple[list[int], int]:
    """(greedy tokens, ns of the decode steps) of a greedy loop on ``Executor.step``."""
    start = time.perf_counter_ns()
    logits = executor.step([PROMPT], [SeqSpan(0, 0, len(PROMPT))])
    out = [int(logits[0].argmax())]
    for i in range(tokens - 1):
        logits = executor.step([[out[-1]]], [SeqSpan(0, len(PROMPT) + i, 1)])
        out.append(int(logits[0].argmax()))
    return out, time.perf_counter_ns() - start


def instrument_engine(phases: Phases, engine: Any) -> None:
    import server.engine as engine_module

    for name in ("sample", "apply_penalties", "token_logprob", "finite_rows"):
        phases.patch(engine_module, name)
    # not _iteration: an idle one waits up to 50 ms for work, which would land in a round's sum
    for method in ("_drop_finished_early", "_admit", "_step", "_accept", "_record_token_time"):
        phases.patch(engine, method)
    decoder = engine_module.IncrementalDecoder

    class TimedDecoder(decoder):  # type: ignore[misc, valid-type]
        push = phases.wrap("detokenize", decoder.push)
    engine_module.IncrementalDecoder = TimedDecoder  # type: ignore[misc]

    class TimedStops(engine_module.StopMatcher):
        feed = phases.wrap("stop_strings", engine_module.StopMatcher.feed)
    engine_module.StopMatcher = TimedStops  # type: ignore[misc]
    engine_module.Request.emit = phases.wrap("emit", engine_module.Request.emit)  # type: ignore[method-assign]
    metrics = engine.metrics
    for name in ("step_time", "step_tokens", "allreduce_time"):
        phases.patch(getattr(metrics, name), "observe", f"metrics_{name}")


async def _engine_request(engine: Any, tokens: int) -> tuple[list[int], int]:
    from server.sampler import SamplingParams

    start = time.perf_counter_ns()
    req = engine.submit(PROMPT, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    out = [event.token async for event in req.stream() if event.token is not None]
    return out, time.perf_counter_ns() - start


def engine_run(engine: Any, tokens: int) -> tuple[list[int], int]:
    return asyncio.run(_engine_request(engine, tokens))


CLIENT = """
import json, sys, time, httpx
url, tokens, prompt = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
        "stream": True}
with httpx.Client() as client:
    client.get(url + "/health")  # connected before the clock starts
    start = time.perf_counter_ns()
    with client.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        lines = list(r.iter_lines())
    ns = time.perf_counter_ns() - start
assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]
print(json.dumps({"ns": ns}))
"""


@contextmanager
def http_server(engine: Any, tokenizer: Any, max_context: int) -> Iterator[tuple[str, threading.Thread]]:
    import uvicorn

    from server.app import create_app
    from server.state import ServerState
    from tests.processes import free_port

    state = ServerState(model_name="m", tokenizer=tokenizer, engine=engine, max_context=max_context,
                        status="ready", detail="2 ranks")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", thread
    finally:
        server.should_exit = True
        thread.join(10)


def http_run(url: str, tokens: int) -> tuple[list[int], int]:
    done = subprocess.run([sys.executable, "-c", CLIENT, url, str(tokens), json.dumps(PROMPT)],
                          capture_output=True, text=True, timeout=300, check=True)
    return [], json.loads(done.stdout)["ns"]


# top-level phases (the others run inside these): what is left of a token's time is "other"
RANK0_TOP = {"direct": ("step",), "engine": ("_drop_finished_early", "_admit", "_step"),
             "http": ("_drop_finished_early", "_admit", "_step")}
STEP_PARTS = ("spans_to_tensor", "start_step", "plan", "forward", "logit_rows", "head", "gather_logits")
WORKER_TOP = ("receive", "spans_from_tensor", "validate_step", "begin", "plan", "forward", "head_and_send")


def round_record(wall_ns: int, tokens: int, steps: int, rank0: dict[str, Any], worker: dict[str, Any]
                 ) -> dict[str, Any]:
    """One driver's run: wall µs per token, each phase in µs per step (``steps`` of them), wall
    and thread CPU, what the timed phases leave of a step on each side, and each process's CPU."""
    wall = wall_ns / tokens / 1e3

    def per_step(sums: dict[str, int], top: tuple[str, ...] | None) -> dict[str, float]:
        us = {k: v / steps / 1e3 for k, v in sums.items()}
        if "step" in us:
            us["step_other"] = us["step"] - sum(us.get(k, 0.0) for k in STEP_PARTS)
        us["forward_python"] = us.get("forward", 0.0) - us.get("native_step", 0.0)
        us["native_step_python"] = us.get("native_step", 0.0) - us.get("native_call", 0.0)
        if top is not None:
            us["idle"] = wall - sum(us.get(k, 0.0) for k in top)
        return {k: round(v, 1) for k, v in sorted(us.items())}

    return {"tok_s": round(1e6 / wall, 1), "us_per_token": round(wall, 1),
            "rank0": per_step(rank0["ns"], None), "rank0_cpu": per_step(rank0["cpu"], None),
            "worker": per_step(worker["ns"], WORKER_TOP), "worker_cpu": per_step(worker["cpu"], None),
            "process_cpu_us": {"rank0": round(rank0["process_cpu"] / steps / 1e3, 1),
                               "worker": round(worker["process_cpu"] / steps / 1e3, 1)}}


# --- one configuration ---------------------------------------------------------------------------

def profile(model_dir: Path, tokens: int, rounds: int) -> dict[str, Any]:
    from server.engine import Engine, EngineLimits
    from server.metrics import Metrics
    from server.tokenizer import TextTokenizer

    max_context = len(PROMPT) + tokens + 8
    tokenizer = TextTokenizer(model_dir)
    with cluster(model_dir, max_context) as (executor, control):
        phases = Phases()
        instrument_rank0(phases, executor)
        engine = Engine(executor, tokenizer, EngineLimits(max_batch=1, max_context=max_context), Metrics())
        instrument_engine(phases, engine)
        engine.start()
        drivers: dict[str, Callable[[], tuple[list[int], int]]] = {
            "direct": lambda: direct(executor, tokens), "engine": lambda: engine_run(engine, tokens)}
        results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        texts: dict[str, list[int]] = {}
        with http_server(engine, tokenizer, max_context) as (url, loop_thread):
            drivers["http"] = lambda: http_run(url, tokens)
            threads = {"main": threading.main_thread(), "engine": engine._thread, "http_loop": loop_thread}
            for run in drivers.values():  # warm-up
                run()
            for r in range(rounds):
                for name in list(drivers) if r % 2 == 0 else list(drivers)[::-1]:
                    _worker_report(control)
                    phases.take()
                    before = {k: thread_cpu_ns(t) for k, t in threads.items()}
                    out, ns = drivers[name]()
                    if out:
                        texts[name] = out
                    rank0 = phases.take()
                    report = _worker_report(control)
                    results[name].append(round_record(ns, tokens, report["steps"], rank0, report))
                    results[name][-1]["thread_cpu_us"] = {
                        k: round((thread_cpu_ns(t) - before[k]) / report["steps"] / 1e3, 1) for k, t in threads.items()}
        engine.stop()
    for name, rows in results.items():
        for row in rows:
            top = sum(row["rank0"].get(k, 0.0) for k in RANK0_TOP[name])
            row["rank0"]["other"] = round(row["us_per_token"] - top, 1)  # the driver's own loop
    return {"same_greedy_tokens": len({tuple(t) for t in texts.values()}) == 1,
            "rounds": dict(results),
            "median_us_per_token": {k: statistics.median(r["us_per_token"] for r in v) for k, v in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--make-models", action="store_true")
    parser.add_argument("--only", default="small_fp32_2,small_int8_2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.make_models:
        make_models(args.models)
    set_lanes(True)
    os.environ["EDGELLM_NATIVE_STEP"] = "1"
    out: dict[str, Any] = {"load_average": os.getloadavg(), "tokens": args.tokens}
    for name, model, weights in CONFIGS:
        if name not in args.only.split(","):
            continue
        model_dir = args.models / model
        if weights == "int8":
            from server.quantized_cache import quantized_shards
            from worker.kernels.quant import QuantSpec

            model_dir = quantized_shards(model_dir, [1.0, 1.0], QuantSpec(bits=8), torch.float32,
                                         args.models / "cache")
        out[name] = profile(model_dir, args.tokens, args.rounds)
    out["load_average_after"] = os.getloadavg()
    emit(out, args.out)


if __name__ == "__main__":
    main()
