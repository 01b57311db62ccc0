"""One streaming request against an OpenAI-compatible server, timed chunk by chunk.

The request is sent with ``stream: true`` and ``stream_options.include_usage``; the
Server-Sent Events are read line by line with httpx. The time to the first content chunk is
the TTFT, the gaps between content chunks are the inter-token latencies, the end of the
stream (``[DONE]``) ends the end-to-end latency. Output tokens come from the ``usage`` chunk
when the server sends one, otherwise from the number of content chunks (a lower bound when
a server packs several tokens into one chunk).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.workload import RequestSpec

log = logging.getLogger(__name__)

ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}
ERROR_BODY_CHARS = 300


@dataclass
class RequestResult:
    """What one request did. Times are seconds; ``start_s`` is from the start of its phase."""

    index: int
    input_len: int
    output_len: int  # requested (max_tokens)
    start_s: float = 0.0
    ok: bool = False
    failure: str | None = None  # "http_503", "timeout", "connection_error", "stream_error"
    error: str | None = None  # the server's message or the exception, for the report
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    chunks: int = 0  # content chunks received
    usage_output_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.usage_output_tokens if self.usage_output_tokens is not None else self.chunks

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: ``(e2e - ttft) / (tokens - 1)``."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def mean_itl_s(self) -> float | None:
        return sum(self.itl_s) / len(self.itl_s) if self.itl_s else None


class StreamFailure(Exception):
    """A request failed; ``kind`` is the failure's key in the report."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def endpoint_url(base_url: str, endpoint: str) -> str:
    """``http://h:8000`` or ``http://h:8000/v1`` plus the endpoint's path."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + ENDPOINTS[endpoint]


def request_body(endpoint: str, model: str, prompt: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    """The JSON body: streaming with usage, ``ignore_eos`` so that servers that know it generate ``max_tokens``."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def sse_data(line: str) -> str | None:
    """The payload of a ``data:`` line; None for blank lines, comments, ``event:``/``id:`` lines.

    A line ``error: ...`` (older llama.cpp servers) is a stream error.
    """
    if line.startswith("data:"):
        return line[5:].strip()
    if line.startswith("error:"):
        raise StreamFailure("stream_error", line[6:].strip()[:ERROR_BODY_CHARS])
    return None


def chunk_content(payload: dict[str, Any]) -> str:
    """The generated text in one chunk: ``delta.content`` (chat, plus reasoning text) or ``text`` (completions)."""
    pieces = []
    for choice in payload.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            pieces.append(delta.get("content") or "")
            pieces.append(delta.get("reasoning_content") or "")
        else:
            pieces.append(choice.get("text") or "")
    return "".join(pieces)


@dataclass
class StreamState:
    """Folds the chunks of one stream into a ``RequestResult``; ``t0`` is when the request was sent."""

    result: RequestResult
    t0: float
    last_content: float | None = None

    def feed(self, payload: Any, now: float) -> None:
        if not isinstance(payload, dict):
            raise StreamFailure("stream_error", f"a chunk is not a JSON object: {str(payload)[:ERROR_BODY_CHARS]}")
        if payload.get("error") is not None or payload.get("object") == "error":
            err = payload.get("error", payload)
            message = err.get("message", err) if isinstance(err, dict) else err
            raise StreamFailure("stream_error", str(message)[:ERROR_BODY_CHARS])
        r = self.result
        usage = payload.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                r.usage_output_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                r.prompt_tokens = usage["prompt_tokens"]
        for choice in payload.get("choices") or []:
            r.finish_reason = choice.get("finish_reason") or r.finish_reason
        if chunk_content(payload):
            if self.last_content is None:
                r.ttft_s = now - self.t0
            else:
                r.itl_s.append(now - self.last_content)
            self.last_content = now
            r.chunks += 1


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], state: StreamState) -> None:
    headers_seen = False
    try:
        async with client.stream("POST", url, json=body) as resp:
            headers_seen = True
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise StreamFailure(f"http_{resp.status_code}", text[:ERROR_BODY_CHARS])
            done = False
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                data = sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    done = True
                    state.result.e2e_s = now - state.t0
                    break
                try:
                    payload = json.loads(data)
                except ValueError:
                    raise StreamFailure("stream_error", f"not JSON: {data[:ERROR_BODY_CHARS]}") from None
                try:
                    state.feed(payload, now)
                except (AttributeError, TypeError) as exc:  # e.g. "choices" that is not a list of objects
                    raise StreamFailure("stream_error", f"malformed chunk ({exc}): {data[:ERROR_BODY_CHARS]}") from None
            # A stream that closes cleanly after a finish_reason is complete even without [DONE].
            if not done and state.result.finish_reason is None:
                raise StreamFailure("stream_error", "the stream ended without [DONE] or a finish_reason")
            if not done:
                state.result.e2e_s = time.perf_counter() - state.t0
    except httpx.TimeoutException as exc:
        raise StreamFailure("timeout", f"{type(exc).__name__}: {exc}") from None
    except httpx.HTTPError as exc:  # refused, reset, closed mid-body, undecodable
        kind = "stream_error" if headers_seen else "connection_error"
        raise StreamFailure(kind, f"{type(exc).__name__}: {exc}") from None


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], spec: RequestSpec,
                       phase_start: float, timeout_s: float) -> RequestResult:
    """Send one request and time it; never raises for a failed request (the result says why)."""
    result = RequestResult(index=spec.index, input_len=spec.input_len, output_len=spec.output_len)
    t0 = time.perf_counter()
    result.start_s = t0 - phase_start
    state = StreamState(result, t0)
    try:
        await asyncio.wait_for(_stream(client, url, body, state), timeout_s)
        result.ok = True
    except asyncio.TimeoutError:
        result.failure, result.error = "timeout", f"no complete answer within {timeout_s:g} s"
    except StreamFailure as exc:
        result.failure, result.error = exc.kind, str(exc)
    if result.e2e_s is None or result.failure:
        result.e2e_s = time.perf_counter() - t0
    if result.failure:
        log.debug("request %d failed: %s (%s)", spec.index, result.failure, result.error)
    return result
