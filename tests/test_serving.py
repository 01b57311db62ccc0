"""Serving under load: the fuller OpenAI API, batching equivalence, cancellation, overload, auth,
metrics. Real coordinator and worker processes on loopback."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.processes import EXIT_S, START_S, served, wait_for

pytestmark = pytest.mark.cluster
MODEL = "tiny"


@pytest.fixture(scope="module")
def url(checkpoints, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with served(checkpoints("llama"), "--local-workers", "1", "--model-name", MODEL, "--max-batch", "8",
                log_path=log) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=START_S, max_retries=0)


def _coordinator(url: str) -> psutil.Process:
    port = url.rsplit(":", 1)[1]
    return next(p for p in psutil.process_iter(["cmdline"]) if f"--port {port}" in " ".join(p.info["cmdline"] or []))


def _metric(url: str, name: str, default: float | None = None) -> float:
    """A series of /metrics; ``default`` for a labelled one not created yet (none counted)."""
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    if match is None and default is not None:
        return default
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_stream_with_include_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_differ_and_are_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="The quick", max_tokens=12, temperature=1.0, n=3, seed=7,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "n samples with one seed must still differ from each other"
    again = client.completions.create(**kwargs)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    assert first.usage is not None and first.usage.completion_tokens == 36


def test_list_of_prompts(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=["Hello", "The quick brown"], max_tokens=4,
                                      temperature=0)
    solo = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0).choices[0].text
            for p in ["Hello", "The quick brown"]]
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == solo


def test_completion_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 5 and len(lp.token_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and chosen <= 0.0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely


def test_chat_logprobs_and_stop(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hello!"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert content is not None and len(content) == 8
    assert all(len(item.top_logprobs) == 2 for item in content)
    text = reply.choices[0].message.content
    stop = text[2:4]
    stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                             stop=[stop], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


def test_seed_gives_the_same_text_alone_or_batched_with_seven_others(client: openai.OpenAI) -> None:
    def ask(seed: int, prompt: str = "Raspberry Pi boards") -> str:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.9, top_p=0.95,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    alone = ask(1234)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        others = [pool.submit(ask, s, f"prompt number {s}") for s in range(7)]
        batched = pool.submit(ask, 1234)
        concurrent.futures.wait(others)
    assert batched.result() == alone


def test_eight_concurrent_greedy_streams_equal_their_solo_runs(client: openai.OpenAI) -> None:
    prompts = [f"Stream {i}: the quick brown fox" * (1 + i % 3) for i in range(8)]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks if c.choices)

    solo = [stream(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, prompts))
    assert together == solo


def test_client_that_drops_mid_stream_frees_its_slot(url: str, client: openai.OpenAI) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=START_S) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
        assert _metric(url, "edgellm_requests_running") == 1
    wait_for(lambda: _metric(url, "edgellm_requests_running") == 0, "the dropped stream's slot is free")
    assert _metric(url, 'edgellm_requests_total{finish_reason="cancelled"}') >= 1
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=3).choices[0].finish_reason


def test_client_that_drops_a_non_streaming_request_frees_its_slot(url: str) -> None:
    """Tokens keep arriving for this request, and still its client's disconnect is noticed."""
    warm = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}  # a cold start's pause would reveal it anyway
    assert httpx.post(f"{url}/v1/completions", json=warm, timeout=60).status_code == 200
    cancelled = _metric(url, 'edgellm_requests_total{finish_reason="cancelled"}', 0)
    finished = _metric(url, 'edgellm_requests_total{finish_reason="length"}', 0)
    # as long as the tiny model's 256 positions allow, 8 times over: on data-plane lanes with the
    # native step one choice of 250 tokens took 1.15 s beside a CPU hog, so under half a second
    # when calm, and it could end before the disconnect was noticed
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 250, "ignore_eos": True,
                       "temperature": 0, "n": 8}).encode()
    host, port = url.removeprefix("http://").split(":")
    # the client hangs up once its request runs (not after a fixed wait, which a busy server may
    # not even have read the request by)
    with socket.create_connection((host, int(port)), timeout=START_S) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        wait_for(lambda: _metric(url, "edgellm_requests_running") >= 1, "the request runs", poll_s=0.01)
    # one finished sequence per choice (the counter's unit), whether it was running or still waiting
    wait_for(lambda: _metric(url, 'edgellm_requests_total{finish_reason="cancelled"}', 0) >= cancelled + 8,
             "the dropped request's 8 choices are cancelled", poll_s=0.05)
    assert _metric(url, 'edgellm_requests_total{finish_reason="cancelled"}', 0) == cancelled + 8
    assert _metric(url, 'edgellm_requests_total{finish_reason="length"}', 0) == finished, "it ran to its end"
    wait_for(lambda: _metric(url, "edgellm_requests_running") == 0, "its slot is free")


def test_tokenize_detokenize(url: str) -> None:
    tokens = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 1
    text = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Hello world"
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert chat["count"] > 1
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{url}/detokenize", json={"tokens": []}).json()["prompt"] == ""


def test_metrics_are_exported(url: str, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    text = httpx.get(f"{url}/metrics").text
    for name in ["edgellm_requests_total", "edgellm_time_to_first_token_seconds_bucket",
                 "edgellm_inter_token_latency_seconds_bucket", "edgellm_e2e_request_latency_seconds_bucket",
                 "edgellm_queue_time_seconds_bucket", "edgellm_requests_running", "edgellm_requests_waiting",
                 "edgellm_prompt_tokens_total", "edgellm_generation_tokens_total", "edgellm_step_seconds_bucket",
                 "edgellm_allreduce_seconds_bucket", "edgellm_workers_up", 'edgellm_rank_steps{rank="1"}']:
        assert name in text, name
    # rank 0 (in the coordinator) too, and a figure that is 0 (a resident shard has no window) still reads 0
    for rank in ("0", "1"):
        assert _metric(url, f'edgellm_rank_steps{{rank="{rank}"}}') > 0
        assert _metric(url, f'edgellm_rank_window_slots{{rank="{rank}"}}') == 0
    assert _metric(url, "edgellm_workers_up") == 1


def test_overload_gets_503_at_once_and_loses_nothing(checkpoints, tmp_path: Path) -> None:
    with served(checkpoints("llama"), "--model-name", MODEL, "--max-batch", "1", "--max-queue", "1",
                log_path=tmp_path / "serve.log") as url:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 250, "ignore_eos": True, "temperature": 0}

        answered: list[httpx.Response] = []  # in the order the answers arrived
        lock = threading.Lock()

        def post() -> httpx.Response:
            resp = httpx.post(f"{url}/v1/completions", json=body, timeout=START_S)
            with lock:
                answered.append(resp)
            return resp

        # six arrive together; one slot and one queue place: at most two are admitted before the
        # first of them (250 steps) can finish, the rest must be refused at once
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: post(), range(6)))
        refused = [r for r in results if r.status_code == 503]
        served_ok = [r for r in results if r.status_code != 503]
        assert len(refused) >= 3, [r.status_code for r in results]
        for resp in refused:
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] == "queue_full"
        # a refusal does not wait for a slot: the first refusals came back before anything was served
        assert [r.status_code for r in answered[:3]] == [503] * 3, [r.status_code for r in answered]
        assert served_ok, "the admitted requests must be served"
        for resp in served_ok:
            assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 250


def test_api_key_and_request_timeout(checkpoints, tmp_path: Path) -> None:
    with served(checkpoints("llama"), "--model-name", MODEL, "--api-key", "k3y", "--request-timeout", "5",
                "--max-batch", "1", log_path=tmp_path / "serve.log") as url:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
        missing = httpx.post(f"{url}/v1/completions", json=body)
        wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        for resp in (missing, wrong):
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        # the scheme is case-insensitive (RFC 7235): some clients send "bearer"
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "bearer k3y"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        # one step: far inside the timeout
        assert good.completions.create(model=MODEL, prompt="Hello", max_tokens=1).choices[0].finish_reason
        # 16 choices of 250 steps, one at a time (--max-batch 1). Once the first runs and the others
        # wait, the server is stopped (SIGSTOP) for longer than the timeout: when it goes on, the
        # request is past its deadline whatever the machine's speed
        auth = {"Authorization": "Bearer k3y"}
        slow_body = {"model": MODEL, "prompt": "Hello", "max_tokens": 250, "ignore_eos": True, "n": 16}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, f"{url}/v1/completions", headers=auth, json=slow_body, timeout=START_S)
            wait_for(lambda: _metric(url, "edgellm_requests_waiting") > 0, "the slow request is queued", poll_s=0.01)
            server = _coordinator(url)
            server.suspend()
            try:
                time.sleep(6)  # the server's clock passes the 5 s timeout while it cannot run
            finally:
                server.resume()
            resp = slow.result(timeout=START_S)
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "timeout"


@pytest.mark.parametrize("to_the_group", [False, True])
def test_ctrl_c_ends_an_open_stream_cleanly_and_leaves_no_worker(checkpoints, tmp_path: Path,
                                                                to_the_group: bool) -> None:
    """SIGINT (Ctrl-C) to the coordinator, or SIGTERM to its whole process group (``timeout``,
    ``docker stop``, systemd: the local workers get it at the same moment) mid-stream: the client
    gets an error event and [DONE], not a cut-off body; the server exits 0 without repairing the
    cluster or restarting the workers (it restarted both before: torch loaded again on the way out)."""
    import signal

    from tests.processes import edgellm, free_port, stop, wait_healthy

    port = free_port()
    log = tmp_path / "serve.log"
    proc = edgellm("serve", "--model", str(checkpoints("llama")), "--model-name", MODEL, "--local-workers", "1",
                   "--port", str(port), "--threads", "1", log_path=log, own_process_group=to_the_group)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=START_S) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    if to_the_group:
                        os.killpg(proc.pid, signal.SIGTERM)
                    else:
                        proc.send_signal(signal.SIGINT)
        # uvicorn re-raises the signal it handled once it has shut down: SIGTERM ends the process
        # as the signal's own (what systemd and docker expect), SIGINT as KeyboardInterrupt, caught
        assert proc.wait(EXIT_S) == (-signal.SIGTERM if to_the_group else 0)
    finally:
        stop(proc)
    assert lines[-1] == "data: [DONE]"
    assert '"code": "shutting_down"' in lines[-2]
    assert "replaying" not in log.read_text() and "restarting it" not in log.read_text()
