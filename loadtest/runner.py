"""When to send: closed-loop concurrency or open-loop arrivals, a warm-up phase, the bounds.

A phase stops issuing requests once it has issued them all or its duration has passed,
whichever comes first; requests already in flight then finish, each within its own timeout.
So a run takes at most ``duration + timeout`` per phase.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from loadtest.client import RequestResult, endpoint_url, request_body, send_request
from loadtest.workload import RequestSpec

log = logging.getLogger(__name__)

# Sends one request; the float is the phase's start (perf_counter) for the result's start_s.
Sender = Callable[[RequestSpec, float], Coroutine[Any, Any, RequestResult]]


@dataclass(frozen=True)
class Target:
    """The server and how each request is sent."""

    url: str  # base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)
    model: str
    endpoint: str = "completions"  # "chat" | "completions"
    temperature: float = 0.0
    api_key: str | None = None
    timeout_s: float = 120.0


@dataclass
class Phase:
    """The results of one phase and its wall time, from its start to the end of its last request."""

    results: list[RequestResult]
    elapsed_s: float
    stopped_by: str  # "requests" (all issued) or "duration"
    issued_per_s: float | None = None  # open loop: the arrival rate achieved


def _progress(send: Sender, total: int, label: str) -> Sender:
    step = max(1, total // 10)
    done = 0

    async def wrapped(spec: RequestSpec, start: float) -> RequestResult:
        nonlocal done
        result = await send(spec, start)
        done += 1
        if done % step == 0 or done == total:
            log.info("%s: %d/%d requests done", label, done, total)
        return result

    return wrapped


async def closed_loop(send: Sender, specs: Sequence[RequestSpec], concurrency: int, duration_s: float) -> Phase:
    """``concurrency`` clients, each sending its next request as soon as its last one ends."""
    start = time.perf_counter()
    deadline = start + duration_s
    pending = iter(specs)  # shared: each request is taken by exactly one client
    results: list[RequestResult] = []
    stopped_by = "requests"

    async def client() -> None:
        nonlocal stopped_by
        for spec in pending:
            if time.perf_counter() >= deadline:
                stopped_by = "duration"
                return
            results.append(await send(spec, start))

    await asyncio.gather(*(client() for _ in range(max(1, min(concurrency, len(specs))))))
    results.sort(key=lambda r: r.index)
    return Phase(results, time.perf_counter() - start, stopped_by)


async def open_loop(send: Sender, specs: Sequence[RequestSpec], arrivals: Sequence[float],
                    duration_s: float) -> Phase:
    """Each request sent at its arrival time (seconds from the start), whatever is still in flight."""
    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestResult]] = []
    stopped_by = "requests"
    last_arrival = 0.0
    for spec, at in zip(specs, arrivals, strict=False):  # arrivals may run longer
        if at >= duration_s:
            stopped_by = "duration"
            break
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(spec, start)))
        last_arrival = at
    results = list(await asyncio.gather(*tasks))
    issued = (len(tasks) - 1) / last_arrival if len(tasks) > 1 and last_arrival > 0 else None
    return Phase(results, time.perf_counter() - start, stopped_by, issued)


def http_client(target: Target, max_connections: int | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    return httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(target.timeout_s),
                             limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=None))


def sender(client: httpx.AsyncClient, target: Target) -> Sender:
    url = endpoint_url(target.url, target.endpoint)

    async def send(spec: RequestSpec, start: float) -> RequestResult:
        body = request_body(target.endpoint, target.model, spec.prompt, spec.output_len, target.temperature)
        return await send_request(client, url, body, spec, start, target.timeout_s)

    return send


async def run_load(target: Target, specs: Sequence[RequestSpec], *, mode: str, concurrency: int = 1,
                   arrivals: Sequence[float] | None = None, duration_s: float = 300.0,
                   warmup: Sequence[RequestSpec] = ()) -> tuple[Phase | None, Phase]:
    """The warm-up phase (closed loop, excluded from the statistics), then the measured phase."""
    if mode not in ("closed", "open"):
        raise ValueError(f"mode is 'closed' or 'open', got {mode!r}")
    if mode == "open" and (arrivals is None or len(arrivals) < len(specs)):
        raise ValueError("the open loop needs one arrival time per request")
    async with http_client(target, concurrency if mode == "closed" else None) as client:
        send = sender(client, target)
        warm = None
        if warmup:
            log.info("warm-up: %d requests", len(warmup))
            warm = await closed_loop(send, warmup, concurrency if mode == "closed" else 1, duration_s)
        label = f"closed loop x{concurrency}" if mode == "closed" else "open loop"
        log.info("%s: up to %d requests within %g s", label, len(specs), duration_s)
        send = _progress(send, len(specs), label)
        if mode == "closed":
            measured = await closed_loop(send, specs, concurrency, duration_s)
        else:
            assert arrivals is not None
            measured = await open_loop(send, specs, arrivals, duration_s)
    return warm, measured


class ServerCheckError(Exception):
    """``GET /v1/models`` found no usable server at the URL; the message says why, in one line."""


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions under it: httpx wraps the socket error two or three levels down."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain and len(chain) < 32:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def connect_failure(url: str, exc: httpx.HTTPError, timeout_s: float) -> str:
    """Why nothing could be reached at ``url``: an unknown host, nothing listening, no answer at all."""
    causes = _causes(exc)
    if any(isinstance(c, socket.gaierror) for c in causes):
        return f"cannot resolve {httpx.URL(url).host} (--url {url})"
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"nothing listens at {url} (connection refused): is the server running, on that port?"
    if isinstance(exc, httpx.TimeoutException):
        return f"nothing answered at {url} within {timeout_s:g} s (connect timeout)"
    reason = next((str(c) for c in reversed(causes) if str(c)), type(exc).__name__)
    return f"cannot connect to {url}: {' '.join(reason.split())}"


async def fetch_model(url: str, api_key: str | None, timeout_s: float = 10.0) -> str:
    """The first model id listed by ``GET /v1/models``.

    Raises ``ServerCheckError`` saying what is at the URL instead: nothing (refused, unknown host),
    or a server that is not OpenAI-compatible (a 404, a page that is not JSON), so that a mistyped
    port reads as such rather than as a missing ``--model``.
    """
    base = url.rstrip("/")
    models_url = (base if base.endswith("/v1") else base + "/v1") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def not_openai(why: str) -> ServerCheckError:
        return ServerCheckError(f"{url} answered but is not an OpenAI-compatible server (GET /v1/models: {why})")

    try:
        async with httpx.AsyncClient(headers=headers, timeout=timeout_s) as client:
            resp = await client.get(models_url)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ServerCheckError(connect_failure(url, exc, timeout_s)) from None
    except httpx.TimeoutException:
        raise ServerCheckError(f"{url} accepted the connection but did not answer GET /v1/models within "
                               f"{timeout_s:g} s") from None
    except httpx.InvalidURL as exc:
        raise ServerCheckError(f"--url {url} is not a valid URL: {exc}") from None
    except httpx.HTTPError as exc:  # something answered, but not in HTTP (another protocol's port)
        raise not_openai(f"no HTTP answer: {type(exc).__name__}") from None
    if resp.status_code in (401, 403):
        raise ServerCheckError(f"{url} refused GET /v1/models ({resp.status_code}): check --api-key")
    if resp.status_code != 200:
        raise not_openai(str(resp.status_code))
    try:
        body: Any = resp.json()
    except ValueError:
        raise not_openai(f"200 but not JSON ({resp.headers.get('content-type', 'no content-type')})") from None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise not_openai("200 but no model list")
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise ServerCheckError(f"{models_url} lists no model: give --model")
    return str(data[0]["id"])
