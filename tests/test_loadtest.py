"""The load generator: pure statistics and schedules, then real runs against a real edgellm server."""

from __future__ import annotations

import asyncio
import json
import random
import selectors
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest import runner
from loadtest.cli import main
from loadtest.client import RequestResult, StreamFailure, StreamState, endpoint_url, request_body, sse_data
from loadtest.report import PNG_MAGIC, human_summary
from loadtest.runner import closed_loop, connect_failure, open_loop
from loadtest.stats import SLO, count_failures, describe, meets_slo, percentile, summarize
from loadtest.workload import (
    WORDS,
    LengthSpec,
    RequestSpec,
    fit_prompt,
    make_workload,
    poisson_arrivals,
    sample_lengths,
)
from tests.processes import ROOT, START_S, free_port, served

# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([], 50, None),
    ([7.0], 0, 7.0),
    ([7.0], 99, 7.0),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 50, 5.5),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90, 9.1),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99, 9.91),
    ([10, 1, 9, 2, 8, 3, 7, 4, 6, 5], 99, 9.91),  # order does not matter
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0, 1),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 100, 10),
    ([0, 100], 25, 25.0),
])
def test_percentile_interpolates_between_ranks(values: list[float], q: float, expected: float | None) -> None:
    got = percentile(values, q)
    assert got == expected if expected is None else got == pytest.approx(expected)


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@pytest.mark.parametrize(("values", "scale", "expected"), [
    ([], 1.0, {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None}),
    ([0.1, 0.2, 0.3], 1000.0, {"n": 3, "mean": 200.0, "p50": 200.0, "p90": 280.0, "p99": 298.0}),
    ([2.0], 1.0, {"n": 1, "mean": 2.0, "p50": 2.0, "p90": 2.0, "p99": 2.0}),
])
def test_describe(values: list[float], scale: float, expected: dict[str, Any]) -> None:
    assert describe(values, scale) == pytest.approx(expected)


def _result(i: int = 0, ok: bool = True, failure: str | None = None, ttft: float | None = 0.1,
            itl: tuple[float, ...] = (0.02, 0.02, 0.02), e2e: float = 0.16, usage: int | None = None,
            requested: int = 4) -> RequestResult:
    return RequestResult(index=i, input_len=8, output_len=requested, ok=ok, failure=failure, ttft_s=ttft,
                         e2e_s=e2e, itl_s=list(itl), chunks=len(itl) + 1 if ttft is not None else 0,
                         usage_output_tokens=usage)


def test_tokens_come_from_usage_else_chunks_and_tpot_follows() -> None:
    by_chunks = _result()
    assert by_chunks.output_tokens == 4 and by_chunks.tpot_s == pytest.approx(0.02)
    by_usage = _result(usage=7)  # a server that packs several tokens per chunk
    assert by_usage.output_tokens == 7 and by_usage.tpot_s == pytest.approx(0.06 / 6)
    assert _result(itl=(), e2e=0.1).tpot_s is None  # one token: no time per output token


@pytest.mark.parametrize(("result", "slo", "meets"), [
    (_result(), SLO(), True),
    (_result(), SLO(ttft_ms=100), True),  # the bound is inclusive
    (_result(), SLO(ttft_ms=99), False),
    (_result(ttft=None, itl=()), SLO(ttft_ms=1000), False),  # no token, no TTFT
    (_result(itl=(0.01, 0.04)), SLO(itl_ms=30), True),  # the mean gap (25 ms), not the longest
    (_result(itl=(0.01, 0.06)), SLO(itl_ms=30), False),
    (_result(itl=()), SLO(itl_ms=1), True),  # a single token has no gap to miss
    (_result(), SLO(e2e_ms=150), False),
    (_result(), SLO(ttft_ms=500, itl_ms=50, e2e_ms=500), True),
    (_result(ok=False, failure="http_503"), SLO(), False),
])
def test_meets_slo(result: RequestResult, slo: SLO, meets: bool) -> None:
    assert meets_slo(result, slo) is meets


def test_summarize_counts_rates_goodput_and_failures() -> None:
    results = [_result(0), _result(1, ttft=0.3, e2e=0.36), _result(2, usage=8, requested=8),
               _result(3, ok=False, failure="http_503", ttft=None, itl=()),
               _result(4, ok=False, failure="timeout", ttft=None, itl=()),
               _result(5, ok=False, failure="http_503", ttft=None, itl=())]
    results[3].error = "queue full"
    s = summarize(results, elapsed_s=2.0, slo=SLO(ttft_ms=200))
    assert s["requests"] == {"sent": 6, "succeeded": 3, "failed": 3}
    assert s["requests_per_s"] == 1.5
    assert s["output_tokens"]["total"] == 4 + 4 + 8 and s["output_tokens"]["from_usage"] == 1
    assert s["output_tokens_per_s"] == 8.0
    assert s["goodput_requests_per_s"] == 1.0 and s["slo_attainment"] == pytest.approx(2 / 6, abs=1e-4)
    assert s["failures"] == {"http_503": 2, "timeout": 1}
    assert s["failure_examples"]["http_503"] == "queue full"
    assert s["ttft_ms"]["n"] == 3 and s["ttft_ms"]["p50"] == 100.0
    assert s["itl_ms"]["n"] == 9  # pooled over the succeeded requests
    assert summarize(results, 2.0)["goodput_requests_per_s"] is None  # no target, no goodput
    assert summarize([], 0.0)["requests_per_s"] is None


def test_count_failures_sorts_kinds() -> None:
    results = [_result(ok=False, failure=k) for k in ("timeout", "connection_error", "timeout")]
    assert list(count_failures(results).items()) == [("connection_error", 1), ("timeout", 2)]


# ---------------------------------------------------------------- workload


@pytest.mark.parametrize(("seed", "rate"), [(0, 2.5), (1, 0.5), (7, 40.0)])
def test_poisson_arrivals_are_seeded_with_the_requested_mean_rate(seed: int, rate: float) -> None:
    n = 20_000
    arrivals = poisson_arrivals(rate, n, random.Random(seed))
    assert arrivals == poisson_arrivals(rate, n, random.Random(seed))
    assert arrivals[0] == 0.0 and all(b >= a for a, b in zip(arrivals, arrivals[1:], strict=False))
    # the sample mean of 20 000 exponential gaps is within 3% of 1/rate (about 4 standard errors)
    assert (n - 1) / arrivals[-1] == pytest.approx(rate, rel=0.03)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    # exponential: the median gap is ln 2 / rate, well below the mean
    assert percentile(gaps, 50) == pytest.approx(0.6931 / rate, rel=0.05)


def test_poisson_arrivals_reject_a_zero_rate() -> None:
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 3, random.Random(0))


@pytest.mark.parametrize(("text", "low", "high"), [("32:256", 32, 256), ("1:2", 1, 2), (" 8 : 9 ", 8, 9)])
def test_length_range_is_half_open(text: str, low: int, high: int) -> None:
    spec = LengthSpec.parse_range(text)
    assert (spec.low, spec.high) == (low, high)


@pytest.mark.parametrize("text", ["32", "0:4", "8:8", "9:3", "a:b"])
def test_bad_length_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        LengthSpec.parse_range(text)


@pytest.mark.parametrize(("spec", "seen"), [
    (LengthSpec.fixed(64), {64}),
    (LengthSpec(3, 7), {3, 4, 5, 6}),  # every value of [3, 7), never 7
])
def test_sample_lengths_cover_the_range(spec: LengthSpec, seen: set[int]) -> None:
    lengths = sample_lengths(spec, 2000, random.Random(0))
    assert set(lengths) == seen
    assert lengths == sample_lengths(spec, 2000, random.Random(0))
    if len(seen) > 1:  # uniform: each value about a quarter of the draws
        assert all(abs(lengths.count(v) / 2000 - 1 / len(seen)) < 0.05 for v in seen)


@pytest.mark.parametrize(("target", "per_word", "expected_words"), [
    (10, 1, 10),
    (10, 2, 5),
    (11, 2, 5),  # never over the target
    (0, 1, 0),
    (100, 1, 40),  # only 40 words to choose from
])
def test_fit_prompt_takes_the_longest_prefix_within_the_target(target: int, per_word: int,
                                                               expected_words: int) -> None:
    words = [f"w{i}" for i in range(40)]

    def count(text: str) -> int:
        return per_word * len(text.split())

    assert fit_prompt(words, target, count) == " ".join(words[:expected_words])


def test_workload_is_seeded_real_words_of_the_requested_lengths() -> None:
    specs = make_workload(50, LengthSpec(4, 12), LengthSpec.fixed(16), seed=3)
    assert specs == make_workload(50, LengthSpec(4, 12), LengthSpec.fixed(16), seed=3)
    assert [s.index for s in specs] == list(range(50))
    for s in specs:
        words = s.prompt.split()
        assert len(words) == s.input_len and 4 <= s.input_len < 12 and set(words) <= set(WORDS)
        assert s.output_len == 16
    assert len({s.prompt for s in specs}) == 50  # distinct prompts: no shared-prefix shortcut
    # another output range keeps the prompts; another seed changes them
    assert [s.prompt for s in make_workload(50, LengthSpec(4, 12), LengthSpec(1, 9), seed=3)] == [
        s.prompt for s in specs]
    assert make_workload(50, LengthSpec(4, 12), LengthSpec.fixed(16), seed=4) != specs


def test_workload_with_a_tokenizer_hits_the_length_exactly() -> None:
    def count(text: str) -> int:  # a tokenizer that splits every word of 5+ letters in two
        return sum(1 + (len(w) >= 5) for w in text.split())

    for spec in make_workload(20, LengthSpec(5, 40), LengthSpec.fixed(4), seed=0, count_tokens=count):
        assert spec.input_len - 1 <= count(spec.prompt) <= spec.input_len  # a 2-token word may not fit


# ---------------------------------------------------------------- the request and its stream


@pytest.mark.parametrize(("base", "endpoint", "url"), [
    ("http://127.0.0.1:8000", "chat", "http://127.0.0.1:8000/v1/chat/completions"),
    ("http://127.0.0.1:8000/", "completions", "http://127.0.0.1:8000/v1/completions"),
    ("http://127.0.0.1:8080/v1", "chat", "http://127.0.0.1:8080/v1/chat/completions"),
    ("http://127.0.0.1:8080/v1/", "completions", "http://127.0.0.1:8080/v1/completions"),
])
def test_endpoint_url(base: str, endpoint: str, url: str) -> None:
    assert endpoint_url(base, endpoint) == url


def test_request_body_streams_with_usage_and_ignores_eos() -> None:
    chat = request_body("chat", "m", "hello world", 12, 0.0)
    assert chat["messages"] == [{"role": "user", "content": "hello world"}] and "prompt" not in chat
    assert chat["max_tokens"] == 12 and chat["stream"] is True and chat["ignore_eos"] is True
    assert chat["stream_options"] == {"include_usage": True}
    assert request_body("completions", "m", "hi", 3, 0.7)["prompt"] == "hi"


@pytest.mark.parametrize(("line", "data"), [
    ("data: {\"a\": 1}", "{\"a\": 1}"),
    ("data:[DONE]", "[DONE]"),
    ("", None),
    (": keep-alive", None),
    ("event: message", None),
])
def test_sse_data(line: str, data: str | None) -> None:
    assert sse_data(line) == data


def test_sse_error_line_is_a_stream_error() -> None:
    with pytest.raises(StreamFailure) as info:
        sse_data('error: {"message": "boom"}')
    assert info.value.kind == "stream_error"


def _chat(content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None}


def test_stream_state_times_content_chunks_only() -> None:
    result = RequestResult(index=0, input_len=4, output_len=3)
    state = StreamState(result, t0=10.0)
    chunks = [
        (10.05, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),  # not content
        (10.20, _chat("Hello")),
        (10.25, _chat("")),  # empty: not a token we can see
        (10.30, _chat(" wor")),
        (10.45, _chat("ld", finish="length")),
        (10.46, {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
    ]
    for now, payload in chunks:
        state.feed(payload, now)
    assert result.ttft_s == pytest.approx(0.20)
    assert result.itl_s == pytest.approx([0.10, 0.15])
    assert result.chunks == 3 and result.usage_output_tokens == 3 and result.prompt_tokens == 5
    assert result.finish_reason == "length"


@pytest.mark.parametrize("payload", [
    {"error": {"message": "cluster_unavailable", "type": "service_unavailable"}},  # edgellm, vLLM
    {"object": "error", "message": "boom"},  # older vLLM
    ["not", "an", "object"],
])
def test_stream_error_payloads(payload: Any) -> None:
    state = StreamState(RequestResult(index=0, input_len=1, output_len=1), t0=0.0)
    with pytest.raises(StreamFailure) as info:
        state.feed(payload, 1.0)
    assert info.value.kind == "stream_error"


def test_completions_text_is_content() -> None:
    result = RequestResult(index=0, input_len=1, output_len=2)
    state = StreamState(result, t0=0.0)
    state.feed({"choices": [{"index": 0, "text": "a", "finish_reason": None}]}, 0.5)
    state.feed({"choices": [{"index": 0, "text": "b", "finish_reason": "stop"}]}, 0.7)
    assert result.chunks == 2 and result.ttft_s == 0.5 and result.finish_reason == "stop"


# ---------------------------------------------------------------- scheduling (a stand-in sender, real loops)


def _specs(n: int) -> list[RequestSpec]:
    return [RequestSpec(i, "w", 1, 1) for i in range(n)]


class _VirtualSelector(selectors.DefaultSelector):
    """Waits for nothing: when no I/O is ready, the loop's clock jumps to the next timer."""

    def __init__(self, clock: list[float]):
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list:
        ready = super().select(0 if timeout is not None else None)
        if not ready and timeout:
            self.clock[0] += timeout
        return ready


class _VirtualClockLoop(asyncio.SelectorEventLoop):
    """asyncio on a virtual clock (from 0): ``asyncio.sleep`` advances it instead of waiting, so
    the tests of the schedulers see their arithmetic exactly, however busy the machine."""

    def __init__(self) -> None:
        self.clock = [0.0]
        super().__init__(_VirtualSelector(self.clock))

    def time(self) -> float:
        return self.clock[0]


@pytest.fixture
def virtual_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``asyncio.run`` on the virtual clock, which loadtest.runner's ``time.perf_counter`` reads too."""
    loop = _VirtualClockLoop()
    monkeypatch.setattr(runner, "time", type("VirtualTime", (), {"perf_counter": staticmethod(loop.time)}))
    yield loop.run_until_complete
    loop.close()


def _sleeper(seconds: float, log: list[tuple[int, float]]):
    async def send(spec: RequestSpec, start: float) -> RequestResult:
        log.append((spec.index, runner.time.perf_counter() - start))
        await asyncio.sleep(seconds)
        return RequestResult(index=spec.index, input_len=1, output_len=1, ok=True, e2e_s=seconds)
    return send


def test_closed_loop_keeps_concurrency_and_stops_at_the_duration(virtual_run) -> None:
    sent: list[tuple[int, float]] = []
    phase = virtual_run(closed_loop(_sleeper(0.1, sent), _specs(1000), concurrency=3, duration_s=0.35))
    assert phase.stopped_by == "duration"
    # 3 clients, each sending at 0, 0.1, 0.2 and 0.3 s; at 0.4 s the duration is over
    assert len(phase.results) == 12 and phase.elapsed_s == pytest.approx(0.4)
    assert [i for i, _ in sent] == list(range(12))
    assert [t for _, t in sent] == pytest.approx([r // 3 * 0.1 for r in range(12)])  # 3 at a time


def test_closed_loop_stops_at_the_count(virtual_run) -> None:
    phase = virtual_run(closed_loop(_sleeper(0.0, []), _specs(5), concurrency=8, duration_s=60))
    assert phase.stopped_by == "requests" and [r.index for r in phase.results] == list(range(5))


def test_open_loop_sends_on_schedule_and_stops_at_the_duration(virtual_run) -> None:
    sent: list[tuple[int, float]] = []
    arrivals = [0.0, 0.05, 0.1, 0.3, 5.0, 6.0]
    phase = virtual_run(open_loop(_sleeper(0.2, sent), _specs(6), arrivals, duration_s=1.0))
    assert phase.stopped_by == "duration" and len(phase.results) == 4
    assert [i for i, _ in sent] == [0, 1, 2, 3]
    assert [t for _, t in sent] == pytest.approx(arrivals[:4])  # each at its time, whatever is in flight
    # it did not wait for the arrivals past the duration (at 5 and 6 s), only for the last reply
    assert phase.elapsed_s == pytest.approx(0.3 + 0.2)


# ---------------------------------------------------------------- a real edgellm server

SERVED_NAME = "tiny"


@pytest.fixture(scope="module")
def url(checkpoints, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("loadtest-logs") / "serve.log"
    with served(checkpoints("llama"), "--model-name", SERVED_NAME, log_path=log) as base:
        yield base


def _run_main(args: list[str], tmp_path: Path) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "report.json"
    rc = main([*args, "--out", str(out)])
    return rc, json.loads(out.read_text())


def _check_run(run: dict[str, Any], sent: int | None = None) -> None:
    s, requests = run["summary"], run["requests"]
    assert s["failures"] == {} and s["failure_examples"] == {}
    assert s["requests"]["succeeded"] == s["requests"]["sent"] == len(requests)
    if sent is not None:
        assert len(requests) == sent
    assert s["output_tokens"]["total"] == sum(r["output_tokens"] for r in requests)
    assert s["itl_ms"]["n"] == sum(max(r["chunks"] - 1, 0) for r in requests)
    for r in requests:
        assert r["ok"] and r["failure"] is None
        # exactly max_tokens, unless the model ended it (the server may not implement ignore_eos)
        assert 1 <= r["output_tokens"] <= r["requested_output_tokens"]
        assert r["output_tokens"] == r["requested_output_tokens"] or r["finish_reason"] == "stop"
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["prompt_tokens"] is None or r["prompt_tokens"] >= r["input_len"]
    assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0
    for metric in ("ttft_ms", "e2e_ms"):
        d = s[metric]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"]


@pytest.mark.cluster
def test_closed_loop_cli_against_edgellm(url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--url", url, "--model", SERVED_NAME, "--mode", "closed",
         "--concurrency", "2", "--requests", "6", "--warmup", "1", "--input-len", "6", "--output-len", "8",
         "--slo-ttft-ms", "60000", "--slo-itl-ms", "60000", "--seed", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)  # stdout is the JSON and nothing else
    _check_run(run, sent=6)
    assert run["config"]["mode"] == "closed" and run["config"]["concurrency"] == 2
    assert run["summary"]["warmup"] == {"sent": 1, "failed": 0}
    assert run["summary"]["stopped_by"] == "requests"
    # generous targets: every request meets them, so goodput is the request rate
    assert run["summary"]["slo_attainment"] == 1.0
    assert run["summary"]["goodput_requests_per_s"] == run["summary"]["requests_per_s"]
    assert "closed loop, concurrency 2" in result.stderr and "TTFT" in result.stderr


@pytest.mark.cluster
def test_open_loop_against_edgellm_stops_at_the_duration(url: str, tmp_path: Path) -> None:
    rc, run = _run_main(["--url", url + "/v1", "--endpoint", "chat", "--mode", "open", "--rate", "10",
                         "--requests", "200", "--duration", "0.6", "--warmup", "0",
                         "--input-len-range", "3:9", "--output-len-range", "2:9", "--seed", "2"], tmp_path)
    assert rc == 0
    _check_run(run)
    s = run["summary"]
    # exactly the requests the schedule (the CLI's seeded Poisson arrivals) puts before the duration
    scheduled = poisson_arrivals(10.0, 200, random.Random("arrivals-2"))
    assert s["stopped_by"] == "duration" and s["requests"]["sent"] == sum(at < 0.6 for at in scheduled) >= 1
    assert run["config"]["rate"] == 10.0 and run["config"]["input_len"] == "[3, 9)"
    assert all(2 <= r["requested_output_tokens"] < 9 and 3 <= r["input_len"] < 9 for r in run["requests"])
    starts = [r["start_s"] for r in run["requests"]]
    assert starts == sorted(starts)


@pytest.mark.cluster
def test_sweep_writes_a_png_and_one_run_per_rate(url: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    rc, report = _run_main(["--url", url, "--model", SERVED_NAME, "--sweep-rates", "4,16", "--requests", "4",
                            "--warmup", "1", "--input-len", "4", "--output-len", "4", "--plot", str(png),
                            "--slo-ttft-ms", "60000"], tmp_path)
    assert rc == 0
    assert [run["config"]["rate"] for run in report["sweep"]] == [4.0, 16.0]
    for run in report["sweep"]:
        _check_run(run, sent=4)
    assert report["sweep"][0]["summary"]["warmup"]["sent"] == 1  # warm-up once, before the first rate
    assert report["sweep"][1]["summary"]["warmup"]["sent"] == 0
    assert report["plot"] == str(png) and png.read_bytes()[:8] == PNG_MAGIC
    assert "rate 16.0/s" in human_summary(report["sweep"][1])


@pytest.mark.cluster
def test_http_errors_are_counted_by_status(url: str, tmp_path: Path) -> None:
    rc, run = _run_main(["--url", url, "--model", "no-such-model", "--concurrency", "2", "--requests", "3",
                         "--warmup", "0", "--output-len", "4"], tmp_path)
    assert rc == 1  # nothing succeeded
    assert run["summary"]["failures"] == {"http_404": 3}  # an unknown model, as OpenAI answers it
    assert "no-such-model" in run["summary"]["failure_examples"]["http_404"]
    assert run["summary"]["requests_per_s"] == 0.0


def test_nothing_listening_is_a_connection_error_and_ends_promptly(tmp_path: Path) -> None:
    rc, run = _run_main(["--url", f"http://127.0.0.1:{free_port()}", "--model", "m", "--concurrency", "2",
                         "--requests", "5", "--warmup", "1", "--timeout", "5"], tmp_path)
    assert rc == 1  # connection errors, not 5 s timeouts: refused at once (no wall-clock assertion)
    s = run["summary"]
    assert s["failures"] == {"connection_error": 5} and s["requests"]["succeeded"] == 0
    assert s["warmup"] == {"sent": 1, "failed": 1}
    assert s["ttft_ms"]["n"] == 0 and s["output_tokens_per_s"] == 0.0


def test_a_server_that_never_answers_is_a_timeout(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts connections in the kernel, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        rc, run = _run_main(["--url", f"http://127.0.0.1:{port}", "--model", "m", "--concurrency", "2",
                             "--requests", "2", "--warmup", "0", "--timeout", "0.5"], tmp_path)
    assert rc == 1 and run["summary"]["failures"] == {"timeout": 2}


_CHUNK = 'data: {"choices": [{"index": 0, "text": "hi", "finish_reason": FINISH}]}\n\n'


@contextmanager
def _web_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A loopback HTTP server with ``handler``, in a thread; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def _canned_server(status: int, body: str) -> Iterator[str]:
    """A loopback HTTP server answering every POST with ``status`` and ``body`` as an event stream."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server API)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            payload = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream" if status == 200 else "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    with _web_server(Handler) as url:
        yield url


@pytest.mark.parametrize(("status", "body", "failures"), [
    (200, 'data: {"error": {"message": "cluster_unavailable"}}\n\ndata: [DONE]\n\n', {"stream_error": 2}),
    (200, "data: not json\n\n", {"stream_error": 2}),
    (200, 'data: {"choices": {"oops": 1}}\n\n', {"stream_error": 2}),
    (200, _CHUNK.replace("FINISH", "null"), {"stream_error": 2}),  # cut short: no finish, no [DONE]
    (200, _CHUNK.replace("FINISH", '"length"'), {}),  # complete without [DONE]
    (503, '{"error": {"message": "queue full"}}', {"http_503": 2}),
])
def test_failure_kinds_from_a_canned_server(status: int, body: str, failures: dict[str, int],
                                            tmp_path: Path) -> None:
    with _canned_server(status, body) as base:
        rc, run = _run_main(["--url", base, "--model", "m", "--concurrency", "2", "--requests", "2",
                             "--warmup", "0", "--timeout", "5"], tmp_path)
    assert run["summary"]["failures"] == failures
    assert rc == (1 if failures else 0)


def test_no_model_and_nothing_listening_exits_2() -> None:
    assert main(["--url", f"http://127.0.0.1:{free_port()}", "--requests", "1"]) == 2


def _loadtest_cli(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest", "--url", url, "--requests", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "ERROR" in result.stderr, result.stderr
    assert message in result.stderr and "give --model" not in result.stderr and "Traceback" not in result.stderr


def test_no_model_and_nothing_listening_says_so_in_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    _one_line_error(_loadtest_cli(url), f"nothing listens at {url} (connection refused)")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class _HtmlPage(_Quiet):
    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        payload = b"<html><body>a web page</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.mark.parametrize(("handler", "why"), [
    (_Quiet, "GET /v1/models: 404"),  # `python -m http.server`: a plain file server
    (_HtmlPage, "GET /v1/models: 200 but not JSON (text/html)"),
])
def test_no_model_and_a_server_that_is_not_openai_says_so_in_one_line(handler: type[BaseHTTPRequestHandler],
                                                                      why: str) -> None:
    with _web_server(handler) as url:
        result = _loadtest_cli(url)
    _one_line_error(result, f"{url} answered but is not an OpenAI-compatible server ({why})")


def test_an_unknown_host_is_named() -> None:
    """httpx's ConnectError for a failed lookup, as it raises it: the socket.gaierror is its cause."""
    try:
        try:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        except socket.gaierror as lookup:
            raise httpx.ConnectError(str(lookup)) from lookup
    except httpx.ConnectError as exc:
        message = connect_failure("http://no-such-host.invalid:8000", exc, 10.0)
    assert message == "cannot resolve no-such-host.invalid (--url http://no-such-host.invalid:8000)"


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://:8000"])
def test_a_url_without_a_usable_host_and_port_is_a_usage_error(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--url", url, "--requests", "1"])
    assert exit_.value.code == 2 and "--url" in capsys.readouterr().err
