"""``/v1/completions`` and ``/v1/chat/completions``: validate, submit, stream or collect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.app import APIError, ServerState
from server.engine import Event
from server.engine import Request as EngineRequest
from server.protocol import ChatCompletionRequest, CompletionRequest, _Request, error_body, new_id, now
from server.sampler import SamplingParams
from server.tokenizer import ChatTemplateError

router = APIRouter()

DISCONNECT_POLL_S = 0.5


def _state(request: Request) -> ServerState:
    return request.app.state.edgellm


def _params(body: _Request, prompt_len: int, max_tokens: int | None, state: ServerState,
            prompt_param: str) -> SamplingParams:
    if body.model != state.model_name:
        raise APIError(400, f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    room = state.max_context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {state.max_context} "
                            f"tokens, leaving no room to generate", param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                            f"context of {state.max_context} tokens", param="max_tokens",
                       code="context_length_exceeded")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=max(body.top_k, 0), seed=body.seed, stop=body.stop_list())


async def _collect(req: EngineRequest, http: Request) -> tuple[str, str]:
    """Wait for the whole output; cancel the request if the client goes away."""
    text = []
    while True:
        try:
            # waiting on the queue itself (not on an async generator) is safe to time out
            event = await asyncio.wait_for(req.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                req.cancelled = True
                raise asyncio.CancelledError from None
            continue
        if event.error:
            raise APIError(503, event.error, "service_unavailable", code="cluster_unavailable")
        text.append(event.text)
        if event.finish_reason:
            return "".join(text), event.finish_reason


def _usage(req: EngineRequest) -> dict[str, int]:
    return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.output),
            "total_tokens": len(req.prompt) + len(req.output)}


def _sse(req: EngineRequest, chunk: Callable[[Event], dict[str, Any] | None],
         first: dict[str, Any] | None = None) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for event in req.stream():
                if event.error:
                    err = error_body(event.error, "service_unavailable", code="cluster_unavailable")
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                payload = chunk(event)
                if payload is not None:
                    yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not req.finished:
                req.cancelled = True  # the client went away mid-stream

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, http: Request) -> JSONResponse | StreamingResponse:
    state = _state(http)
    engine, tokenizer = state.ready_engine()
    if isinstance(body.prompt, str):
        prompt = tokenizer.encode(body.prompt)
    else:
        prompt = body.prompt
        if not prompt or not all(0 <= t < state_vocab(state) for t in prompt):
            raise APIError(400, f"prompt token ids must be non-empty and in [0, {state_vocab(state)})", param="prompt")
    params = _params(body, len(prompt), body.max_tokens, state, "prompt")
    req = engine.submit(prompt, params)
    rid, created = new_id("cmpl"), now()

    def frame(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        return _sse(req, lambda e: frame(e.text, e.finish_reason) if e.text or e.finish_reason else None)
    text, finish = await _collect(req, http)
    return JSONResponse(frame(text, finish) | {"usage": _usage(req)})


def state_vocab(state: ServerState) -> int:
    assert state.tokenizer is not None
    return state.tokenizer.vocab_size


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, http: Request) -> JSONResponse | StreamingResponse:
    state = _state(http)
    engine, tokenizer = state.ready_engine()
    try:
        prompt = tokenizer.encode_chat([m.model_dump() for m in body.messages])
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _params(body, len(prompt), max_tokens, state, "messages")
    req = engine.submit(prompt, params)
    rid, created = new_id("chatcmpl"), now()

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        def on_event(e: Event) -> dict[str, Any] | None:
            if not (e.text or e.finish_reason):
                return None
            return chunk({"content": e.text} if e.text else {}, e.finish_reason)

        return _sse(req, on_event, first=chunk({"role": "assistant", "content": ""}, None))
    text, finish = await _collect(req, http)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": _usage(req),
    })
