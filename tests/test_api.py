"""The HTTP API against a real coordinator with two real worker processes on loopback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.processes import served
from tests.tiny_models import load_reference

pytestmark = pytest.mark.cluster
MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(checkpoints, tmp_path_factory) -> Path:
    # served under the name "tiny" so requests can name it
    link = tmp_path_factory.mktemp("served") / MODEL
    link.symlink_to(checkpoints("llama"))
    return link


@pytest.fixture(scope="module")
def url(model_dir: Path, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with served(model_dir, "--local-workers", "2", log_path=log) as base:
        yield base


def _post(url: str, path: str, body: object) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=60)


def test_health_and_models(url: str) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.head(f"{url}/health").status_code == 200  # load balancers check with HEAD (it was a 405)
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    # the OpenAI client's models.retrieve; an unknown name is a 404 with an OpenAI error body
    assert httpx.get(f"{url}/v1/models/{MODEL}").json() == models["data"][0]
    missing = httpx.get(f"{url}/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_greedy_completion_over_three_processes_matches_transformers(url: str, model_dir: Path) -> None:
    prompt = [1, 17, 42, 99, 7, 250]
    expected = load_reference(model_dir).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    from server.tokenizer import TextTokenizer

    expected_text = TextTokenizer(model_dir).decode(expected[0, len(prompt):].tolist())
    body = _post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                          "temperature": 0}).json()
    assert body["choices"][0]["text"] == expected_text
    assert body["usage"]["prompt_tokens"] == 6
    assert body["usage"]["completion_tokens"] == 12 or body["choices"][0]["finish_reason"] == "stop"


def test_streaming_completion_equals_non_streaming(url: str) -> None:
    req = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0}
    whole = _post(url, "/v1/completions", req).json()["choices"][0]["text"]
    pieces, finish, done = [], None, False
    with httpx.stream("POST", f"{url}/v1/completions", json=req | {"stream": True}, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            assert not done, "data after [DONE]"
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
    assert done and finish == "length"
    assert "".join(pieces) == whole


def test_sampling_with_seed_is_reproducible(url: str) -> None:
    req = {"model": MODEL, "prompt": "Hello", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9,
           "top_k": 50, "seed": 1234}
    first = _post(url, "/v1/completions", req).json()["choices"][0]["text"]
    second = _post(url, "/v1/completions", req).json()["choices"][0]["text"]
    other = _post(url, "/v1/completions", req | {"seed": 99}).json()["choices"][0]["text"]
    assert first == second
    assert first != other


def test_stop_string_ends_the_text_before_it(url: str) -> None:
    req = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 20, "temperature": 0}
    text = _post(url, "/v1/completions", req).json()["choices"][0]["text"]
    stop = text[3:5]
    assert stop, "need some generated text"
    body = _post(url, "/v1/completions", req | {"stop": [stop]}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(stop)]


def test_openai_client_chat_and_stream(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    completion = client.completions.create(model=MODEL, prompt="The quick", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 10 ** 9]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
    # a lone UTF-16 surrogate is no Unicode text: the tokenizer raised on it (a 500, and the next
    # request on the connection was reset); the JSON parser now refuses it
    ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b"}, None),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "\udfff"]}, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["\ud800"]}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a\udc00b"}]}, None),
    ("/tokenize", {"prompt": "\ud800"}, None),
    ("/v1/completions", {"model": MODEL, "prompt": [3] * 300}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[3]] * 2049}, "prompt"),  # OpenAI's limit: 2048 prompts
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1], "a"]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [True]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": None}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     "stream"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    # a seed past int64 once killed the engine thread (torch's generator refuses it) and hung every request
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2 ** 64}, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -(2 ** 63) - 1}, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "!"}, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, "best_of"),
    # biasing or banning tokens is not implemented: refused rather than ignored
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 100}}, "logit_bias"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "logit_bias": {"5": -100}}, "logit_bias"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "top_logprobs": 3}, "top_logprobs"),
    # more sequences than the queue holds (64): a 503 to retry would never succeed
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c", "d", "e"], "n": 16}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a"] * 65}, "prompt"),  # n=1: the prompts are too many
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_bad_input_is_400_with_openai_error_body(url: str, path: str, body: object, param: str | None) -> None:
    resp = _post(url, path, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in resp.text


def test_an_unknown_model_is_a_404_as_openai_answers_it(url: str) -> None:
    for path, body in [("/v1/completions", {"model": "gpt-4", "prompt": "hi"}),
                       ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})]:
        resp = _post(url, path, body)
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"] | {"message": ""} == {"message": "", "type": "not_found_error", "param": "model",
                                                           "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="x").completions.create(model="gpt-4", prompt="hi")


def test_an_image_part_says_that_only_text_parts_are_taken(url: str) -> None:
    resp = _post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert resp.status_code == 400
    assert "'image_url' are not supported" in resp.json()["error"]["message"], resp.json()
    assert resp.json()["error"]["param"] == "messages.0.content"


def test_a_body_past_the_limit_is_a_413_before_it_is_read(url: str) -> None:
    """A 200 MB body was read whole before its prompt was found too long."""
    from server.routes import MAX_BODY_BYTES

    big = b'{"model": "tiny", "prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    declared = httpx.post(f"{url}/v1/completions", content=big, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 1 << 20):
            yield big[start:start + (1 << 20)]

    try:
        streamed = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"},
                              timeout=60)
        assert streamed.status_code == 413
    except httpx.WriteError:  # the server answered and closed while the client still sent
        pass
    assert httpx.get(f"{url}/health").status_code == 200


def test_keep_alive_connection_survives_bad_input(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(3):
            bad = client.post("/v1/completions", content=json.dumps({"model": MODEL, "prompt": "a\ud800"}),
                              headers={"Content-Type": "application/json"})
            assert bad.status_code == 400 and "surrogate" in bad.json()["error"]["message"]
            good = client.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
            assert good.status_code == 200


def test_a_bug_in_a_route_is_a_500_with_an_error_body_and_is_not_re_raised() -> None:
    """Re-raised (Starlette's handler for Exception does), the error made uvicorn close the
    keep-alive connection under the client's next request; httpx's ASGI transport raises it."""
    import asyncio

    from server.app import ServerState, create_app

    app = create_app(ServerState("m"))

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/boom")

    resp = asyncio.run(call())
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                     "code": None}}


def test_null_max_tokens_is_the_default_and_seed_extremes_work(url: str) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": None, "ignore_eos": True, "seed": 2 ** 63 - 1, "n": 2}
    resp = _post(url, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 2 * 16  # OpenAI's default for completions


def test_developer_role_and_text_parts_equal_system_role_and_string(url: str) -> None:
    as_parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    as_strings = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    replies = [_post(url, "/v1/chat/completions", {"model": MODEL, "messages": m, "max_tokens": 8, "temperature": 0})
               for m in (as_parts, as_strings)]
    assert [r.status_code for r in replies] == [200, 200], replies[0].text
    assert replies[0].json()["usage"] == replies[1].json()["usage"]
    assert replies[0].json()["choices"][0]["message"] == replies[1].json()["choices"][0]["message"]


@pytest.mark.parametrize(("arch", "extra"), [
    ("qwen2_moe", []),  # routed experts and a shared expert, split over two processes
    # ~2 of each rank's 8 experts cached, so most are read on a miss (from `edgellm shard` output)
    ("mixtral", ["--expert-cache", "80KiB"]),
])
def test_moe_over_a_worker_process_matches_transformers(checkpoints, tmp_path: Path, arch: str,
                                                        extra: list[str]) -> None:
    from server.tokenizer import TextTokenizer

    model_dir = checkpoints(arch)
    prompt = [1, 17, 42, 99, 7, 250]
    expected = load_reference(model_dir).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    expected_text = TextTokenizer(model_dir).decode(expected[0, len(prompt):].tolist())
    if extra:
        from worker.config import ModelConfig
        from worker.shards.shard_writer import write_shards
        from worker.shards.sharding import plan_shards

        shards = plan_shards(ModelConfig.from_dir(model_dir), [1.0, 1.0])
        model_dir = write_shards(model_dir, shards, tmp_path / "shards", progress=False)
    with served(model_dir, "--local-workers", "1", "--model-name", MODEL, *extra,
                log_path=tmp_path / "serve.log") as base:
        body = _post(base, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                               "temperature": 0}).json()
        metrics = httpx.get(f"{base}/metrics").text
    assert body["choices"][0]["text"] == expected_text
    if extra:  # the worker's cache really was that small: it missed
        _check_expert_metrics(metrics)


def _series(metrics: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", metrics, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _check_expert_metrics(metrics: str) -> None:
    """The expert caches' counters, rank 1's through its gRPC StatsReply, and their cluster sums."""
    names = ("expert_hits", "expert_misses", "expert_late_prefetches", "expert_prefetches", "expert_prefetches_used",
             "expert_cancelled_prefetches", "expert_prefetch_skipped", "expert_bytes_read", "expert_fetched_bytes",
             "expert_prefetch_bytes", "expert_prefetch_bytes_read", "expert_prefetch_layers_open",
             "expert_prefetch_layers_off")
    ranks = [{n: _series(metrics, f'edgellm_rank_{n}{{rank="{r}"}}') for n in names} for r in (0, 1)]
    for name in names:
        assert _series(metrics, f"edgellm_{name}") == ranks[0][name] + ranks[1][name], name
    assert "edgellm_expert_hit_rate " not in metrics  # a ratio: per rank only
    worker = ranks[1]
    assert worker["expert_misses"] > 0 and worker["expert_fetched_bytes"] > 0
    # both ranks route alike: the same lookups; what was read covers what was used and what was guessed
    assert worker["expert_hits"] + worker["expert_misses"] == ranks[0]["expert_hits"] + ranks[0]["expert_misses"]
    assert worker["expert_bytes_read"] >= worker["expert_fetched_bytes"]
    assert worker["expert_bytes_read"] >= worker["expert_prefetch_bytes_read"]
    assert worker["expert_prefetches_used"] + worker["expert_cancelled_prefetches"] <= worker["expert_prefetches"]
    assert max(worker["expert_prefetch_layers_open"], worker["expert_prefetch_layers_off"]) <= 2  # two MoE layers


def test_unknown_route_is_404_with_error_body(url: str) -> None:
    resp = httpx.get(f"{url}/v1/nothing")
    assert resp.status_code == 404 and "error" in resp.json()


def test_server_still_serves_after_bad_input(url: str) -> None:
    body = _post(url, "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 3, "temperature": 0})
    assert body.status_code == 200


def test_long_non_streaming_request_completes(url: str) -> None:
    # longer than the disconnect poll interval, so the wait loop runs several rounds
    body = _post(url, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 200,
                                          "temperature": 0.8, "seed": 1}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" or body["usage"]["completion_tokens"] == 200


def test_concurrent_greedy_requests_equal_their_solo_runs(url: str) -> None:
    import concurrent.futures

    prompts = ["The quick brown fox", "Hello world", "A cluster of", "Raspberry Pi boards"]
    req = {"model": MODEL, "max_tokens": 16, "temperature": 0}
    solo = [_post(url, "/v1/completions", req | {"prompt": p}).json()["choices"][0]["text"] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: _post(url, "/v1/completions", req | {"prompt": p}).json(), prompts))
    assert [r["choices"][0]["text"] for r in together] == solo


@pytest.mark.parametrize(("path", "field"), [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")])
def test_a_prompt_far_too_long_is_refused_before_it_is_tokenized(url: str, path: str, field: str) -> None:
    """A 5 MB prompt took 4.4 s to tokenize on the event loop, stalling every other stream, before
    its 400. Its length in characters alone refuses it now (the message counts characters, not tokens)."""
    text = "word " * 1_000_000
    value = text if field == "prompt" else [{"role": "user", "content": text}]
    resp = _post(url, path, {"model": MODEL, field: value, "max_tokens": 4})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == field
    assert "5000000 characters" in error["message"]


_SPECIAL_NAMES = {"<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"}  # tests.tiny_models.build_tokenizer


def _logprob_token_bytes(token: str) -> bytes:
    """The bytes a completions logprobs token stands for ("bytes:\\xe2\\x80" for part of a character)."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def _streamed_logprobs(url: str, req: dict) -> tuple[str, list[str], list[int]]:
    text, tokens, offsets = "", [], []
    with httpx.stream("POST", f"{url}/v1/completions", json=req | {"stream": True}, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["text"]
                    if choice["logprobs"]:
                        tokens += choice["logprobs"]["tokens"]
                        offsets += choice["logprobs"]["text_offset"]
    return text, tokens, offsets


def test_completion_logprobs_show_real_token_text_and_offsets_into_the_text(url: str) -> None:
    """Tokens are shown by their text, not the byte-level BPE symbols ('Ġ', 'âĢ'); a token holding part
    of a character as "bytes:\\x..", so the tokens' bytes concatenated are the text's UTF-8; each
    text_offset indexes the returned text (special tokens add nothing to it); streamed offsets are those
    of the whole text, not [0] in every chunk."""
    req = {"model": MODEL, "prompt": "日本語 😀😀 émoji ñ ü 中文 ", "max_tokens": 40, "temperature": 1.5,
           "seed": 36, "logprobs": 2, "ignore_eos": True}
    choice = _post(url, "/v1/completions", req).json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    tokens, offsets = lp["tokens"], lp["text_offset"]
    assert len(tokens) == len(offsets) == 40
    assert not any(set(t) & {"Ġ", "Ċ"} for t in tokens + [k for top in lp["top_logprobs"] for k in top])
    pieces = [_logprob_token_bytes(t) for t in tokens if t not in _SPECIAL_NAMES]
    assert b"".join(pieces).decode("utf-8", errors="replace") == text
    assert any(t.startswith("bytes:") for t in tokens), "want a partial-character token in this test"
    assert any(t in _SPECIAL_NAMES for t in tokens), "want a special token in this test"
    assert offsets == sorted(offsets) and offsets[0] == 0
    for i, (token, offset) in enumerate(zip(tokens, offsets, strict=True)):
        if token in _SPECIAL_NAMES:  # adds no text: the next token is at the same place
            assert i + 1 == len(tokens) or offsets[i + 1] == offset
        elif not token.startswith("bytes:"):
            assert text[offset:].startswith(token), (i, token, offset, text)
    assert _streamed_logprobs(url, req) == (text, tokens, offsets)


def test_chat_logprobs_bytes_are_the_real_bytes_of_the_text(url: str) -> None:
    req = {"model": MODEL, "messages": [{"role": "user", "content": "日本語 😀 émoji ñ 中文"}], "max_tokens": 40,
           "temperature": 1.5, "seed": 7, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    choice = _post(url, "/v1/chat/completions", req).json()["choices"][0]
    content = choice["logprobs"]["content"]
    pieces = [bytes(c["bytes"]) for c in content if c["token"] not in _SPECIAL_NAMES]
    assert b"".join(pieces).decode("utf-8", errors="replace") == choice["message"]["content"]
    assert any(c["token"].startswith("bytes:") for c in content), "want a partial-character token in this test"
    for item in content + [top for c in content for top in c["top_logprobs"]]:
        assert bytes(item["bytes"]) == _logprob_token_bytes(item["token"]), item
