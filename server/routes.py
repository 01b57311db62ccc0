"""Generation endpoints: validate, fan a request out into engine requests (one per prompt and
per ``n``), then stream their merged events as SSE or collect them into one response."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from server.engine import Engine, EngineError, Event, QueueFull
from server.engine import Request as EngineRequest
from server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LogprobFormatter,
    TokenizeRequest,
    _Request,
    error_body,
    new_id,
    now,
    usage,
)
from server.sampler import SamplingParams, TokenLogprob
from server.state import ServerState
from server.tokenizer import ChatTemplateError, TextOffsets, TextTokenizer

# How often a non-streaming request checks that its client is still there: a cheap check (one
# non-blocking receive), short enough that a dropped request stops well before a fast model
# (hundreds of tokens a second) finishes it anyway.
DISCONNECT_POLL_S = 0.1
RETRY_AFTER = {"Retry-After": "1"}


class ClientGone(Exception):
    """The client of a non-streaming request disconnected; its choices are cancelled."""


def _state(request: Request) -> ServerState:
    return request.app.state.edgellm


async def require_api_key(request: Request) -> None:
    key = _state(request).api_key
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())):  # RFC 7235
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       "authentication_error", code="invalid_api_key")


router = APIRouter(dependencies=[Depends(require_api_key)])


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "edgellm",
            "max_model_len": state.max_context}


@router.get("/v1/models")
async def models(http: Request) -> dict:
    return {"object": "list", "data": [_model_card(_state(http))]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, http: Request) -> dict:
    """One model (the OpenAI client's ``models.retrieve``); a name this server does not serve is a 404."""
    state = _state(http)
    if model_id != state.model_name:
        raise APIError(404, f"model {model_id!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    return _model_card(state)


def _check_model(body: _Request, state: ServerState) -> None:
    if body.model != state.model_name:
        # 404 as OpenAI answers it (its client raises NotFoundError)
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       "not_found_error", param="model", code="model_not_found")


def _params(body: _Request, prompt_len: int, max_tokens: int | None, state: ServerState, prompt_param: str,
            logprobs: int | None) -> SamplingParams:
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
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
        min_p=body.min_p, seed=body.seed, stop=body.stop_list(), presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        logprobs=logprobs, ignore_eos=body.ignore_eos)


def _check_token_ids(ids: list[int], tokenizer: TextTokenizer, param: str) -> list[int]:
    if not ids or not all(0 <= t < tokenizer.vocab_size for t in ids):
        raise APIError(400, f"token ids must be a non-empty list of integers in [0, {tokenizer.vocab_size})",
                       param=param)
    return ids


def _check_text_fits(texts: list[str], tokenizer: TextTokenizer, state: ServerState, param: str) -> None:
    """Refuse a text that cannot fit the context before tokenizing it: a 5 MB prompt took 4.4 s to
    tokenize, and every other stream stalled meanwhile. A token stands for at most
    ``TextTokenizer.longest_token_chars`` characters; the factor 4 leaves room for normalizers that merge
    characters, so nothing that could fit is refused here."""
    limit = 4 * state.max_context * tokenizer.longest_token_chars
    for i, text in enumerate(texts):
        if len(text) > limit:
            which = f"prompt {i}" if len(texts) > 1 else "the prompt"
            raise APIError(400, f"{which} has {len(text)} characters, far more than this model's context of "
                                f"{state.max_context} tokens can hold", param=param, code="context_length_exceeded")


def _completion_prompts(body: CompletionRequest, tokenizer: TextTokenizer) -> list[list[int]]:
    """Token ids of every prompt (tokenizing: called in a worker thread, off the event loop)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    # protocol._prompt_shape has checked that every item is of the first one's kind
    if isinstance(prompt[0], str):
        return [tokenizer.encode(p) for p in prompt]
    if isinstance(prompt[0], int):
        return [_check_token_ids(prompt, tokenizer, "prompt")]
    return [_check_token_ids(p, tokenizer, "prompt") for p in prompt]


@dataclass
class _Choice:
    """Progress of one choice (one engine request) of a response."""

    req: EngineRequest
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


def _check_fits_queue(engine: Engine, prompts: list[list[int]], n: int) -> None:
    """A request whose sequences could never all be queued is a 400, not a 503 to retry forever."""
    limits = engine.limits
    if len(prompts) * n > limits.max_waiting:
        raise APIError(400, f"this request asks for {len(prompts) * n} sequences ({len(prompts)} prompt(s) x n={n}); "
                            f"this server queues at most {limits.max_waiting}", param="n" if n > 1 else "prompt")
    if (tokens := n * sum(len(p) for p in prompts)) > limits.max_waiting_tokens:
        raise APIError(400, f"this request queues {tokens} prompt tokens (n={n}); this server queues at most "
                            f"{limits.max_waiting_tokens}", param="prompt")


def _submit_all(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], n: int) -> list[_Choice]:
    """One engine request per prompt and per ``n``; choice ``i * n + j`` is prompt i's j-th."""
    _check_fits_queue(engine, prompts, n)
    choices: list[_Choice] = []
    try:
        for prompt, base in zip(prompts, params, strict=True):
            for j in range(n):
                seeded = base if base.seed is None else _with_seed(base, base.seed + j)
                choices.append(_Choice(engine.submit(prompt, seeded)))
    except QueueFull as exc:
        _cancel(choices)
        raise APIError(503, str(exc), "service_unavailable", code="queue_full", headers=RETRY_AFTER) from None
    except EngineError as exc:
        _cancel(choices)
        raise APIError(503, str(exc), "service_unavailable", code="cluster_unavailable", headers=RETRY_AFTER) from None
    return choices


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


def _cancel(choices: list[_Choice]) -> None:
    for choice in choices:
        if not choice.req.finished:
            choice.req.cancelled = True


async def _merged(choices: list[_Choice]) -> AsyncGenerator[tuple[int, Event], None]:
    """Events of all choices as they come, until each has finished or failed."""
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, req: EngineRequest) -> None:
        async for event in req.stream():
            await queue.put((index, event))

    tasks = [asyncio.create_task(pump(i, c.req)) for i, c in enumerate(choices)]
    remaining = len(choices)
    try:
        while remaining:
            index, event = await queue.get()
            if event.finish_reason or event.error:
                remaining -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


def _error_for(event: Event) -> APIError:
    if event.error_code == "timeout":
        return APIError(504, event.error or "timed out", "timeout", code="timeout")
    if event.error_code == "internal_error":
        return APIError(500, event.error or "internal error", "server_error", code="internal_error")
    return APIError(503, event.error or "unavailable", "service_unavailable", code=event.error_code,
                    headers=RETRY_AFTER)


async def _collect(choices: list[_Choice], http: Request) -> None:
    """Fill every choice; cancel them all if the client goes away (checked every
    ``DISCONNECT_POLL_S``, tokens arriving or not) or one fails."""
    events = _merged(choices)
    next_event: asyncio.Task | None = None
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_S
    try:
        while True:
            if next_event is None:
                next_event = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({next_event}, timeout=max(0.0, next_check - loop.time()))
            if loop.time() >= next_check:
                if await http.is_disconnected():
                    raise ClientGone
                next_check = loop.time() + DISCONNECT_POLL_S
            if not done:
                continue
            try:
                index, event = next_event.result()
            except StopAsyncIteration:
                return
            next_event = None
            if event.error:
                raise _error_for(event)
            choice = choices[index]
            choice.text.append(event.text)
            if event.logprob:
                choice.logprobs.append(event.logprob)
            choice.finish_reason = event.finish_reason or choice.finish_reason
    finally:
        if next_event is not None:
            next_event.cancel()
            # the generator cannot be closed while that task is still inside it
            await asyncio.gather(next_event, return_exceptions=True)
        _cancel(choices)
        await events.aclose()


def _usage_of(choices: list[_Choice], prompts: list[list[int]]) -> dict[str, int]:
    return usage(sum(len(p) for p in prompts), sum(len(c.req.output) for c in choices))


class _Shape:
    """How one API shapes its chunks and its final choices (completions vs chat)."""

    object_name: str
    chunk_name: str

    def __init__(self, logprobs: LogprobFormatter, want_logprobs: bool):
        self.fmt = logprobs
        self.want_logprobs = want_logprobs

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def chunk(self, index: int, event: Event) -> dict[str, Any]:
        raise NotImplementedError

    def final(self, index: int, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionShape(_Shape):
    object_name = chunk_name = "text_completion"

    def __init__(self, logprobs: LogprobFormatter, want_logprobs: bool):
        super().__init__(logprobs, want_logprobs)
        self._offsets: dict[int, TextOffsets] = {}  # choice index -> its text_offset count, across a stream

    def chunk(self, index: int, event: Event) -> dict[str, Any]:
        lp = None
        if self.want_logprobs and event.logprob:
            if index not in self._offsets:
                self._offsets[index] = self.fmt.offsets()
            lp = self.fmt.completion([event.logprob], self._offsets[index])
        return {"index": index, "text": event.text, "logprobs": lp, "finish_reason": event.finish_reason}

    def final(self, index: int, choice: _Choice) -> dict[str, Any]:
        lp = self.fmt.completion(choice.logprobs) if self.want_logprobs else None
        return {"index": index, "text": "".join(choice.text), "logprobs": lp, "finish_reason": choice.finish_reason}


class _ChatShape(_Shape):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def opening(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def chunk(self, index: int, event: Event) -> dict[str, Any]:
        lp = self.fmt.chat([event.logprob]) if self.want_logprobs and event.logprob else None
        return {"index": index, "delta": {"content": event.text} if event.text else {}, "logprobs": lp,
                "finish_reason": event.finish_reason}

    def final(self, index: int, choice: _Choice) -> dict[str, Any]:
        lp = self.fmt.chat(choice.logprobs) if self.want_logprobs else None
        return {"index": index, "message": {"role": "assistant", "content": "".join(choice.text)}, "logprobs": lp,
                "finish_reason": choice.finish_reason}


def _sse(choices: list[_Choice], prompts: list[list[int]], shape: _Shape, state: ServerState,
         include_usage: bool) -> StreamingResponse:
    rid, created = new_id("cmpl" if isinstance(shape, _CompletionShape) else "chatcmpl"), now()
    extra = {"usage": None} if include_usage else {}

    def frame(choice_list: list[dict[str, Any]], **more: Any) -> str:
        body = {"id": rid, "object": shape.chunk_name, "created": created, "model": state.model_name,
                "choices": choice_list, **extra, **more}
        return f"data: {json.dumps(body)}\n\n"

    async def body() -> AsyncIterator[str]:
        try:
            for i in range(len(choices)):
                if (opening := shape.opening(i)) is not None:
                    yield frame([opening])
            async for index, event in _merged(choices):
                if event.error:
                    err = _error_for(event)
                    yield f"data: {json.dumps(error_body(err.message, err.type, code=err.code))}\n\n"
                    break
                if event.text or event.finish_reason or (shape.want_logprobs and event.logprob):
                    yield frame([shape.chunk(index, event)])
            else:
                if include_usage:
                    yield frame([], usage=_usage_of(choices, prompts))
            yield "data: [DONE]\n\n"
        finally:
            _cancel(choices)  # the client went away, or one choice failed

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _respond(http: Request, body: _Request, prompts: list[list[int]], params: list[SamplingParams],
                   shape: _Shape) -> Response:
    state = _state(http)
    engine, _ = state.ready_engine()
    choices = _submit_all(engine, prompts, params, body.n)
    if body.stream:
        return _sse(choices, prompts, shape, state, body.include_usage)
    try:
        await _collect(choices, http)
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request": nobody is there to read it
    return JSONResponse({
        "id": new_id("cmpl" if isinstance(shape, _CompletionShape) else "chatcmpl"),
        "object": shape.object_name, "created": now(), "model": state.model_name,
        "choices": [shape.final(i, c) for i, c in enumerate(choices)], "usage": _usage_of(choices, prompts)})


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    unsupported = [("logit_bias", bool(body.logit_bias))]
    if isinstance(body, CompletionRequest):
        unsupported += [("echo", body.echo), ("suffix", body.suffix is not None),
                        ("best_of", body.best_of not in (None, 1, body.n))]
    elif body.top_logprobs is not None and not body.logprobs:  # OpenAI's rule too
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    for name, given in unsupported:
        if given:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


MAX_BODY_BYTES = 32 << 20  # past any prompt a context holds; a larger body is a 413 before it is read


async def _read_body(http: Request) -> bytes:
    """The request body, refused with a 413 once it passes ``MAX_BODY_BYTES`` (a 200 MB body was
    read whole before its prompt was found too long)."""
    too_large = APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", code="request_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parser(model: type[BaseModel]) -> Any:
    """A dependency that reads the body (``_read_body``'s limit) as ``model``. Parsing stays on the
    event loop: pydantic holds the GIL throughout, so a thread measured no shorter stall (a 2.5 MB
    body of token-id lists held other streams 0.8-1.0 s either way, after ``_prompt_shape`` and
    ``freeze_loaded_objects``; 4.5-4.8 s before them)."""

    async def parse(http: Request) -> BaseModel:
        raw = await _read_body(http)
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None

    return parse


BODY_MODELS: list[type[BaseModel]] = []  # every model a route reads its body as; app.openapi() adds their schemas


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The route's ``openapi_extra``: its request body is ``model``, which ``_parser`` validates.
    FastAPI documents only the bodies it parses itself, and it parses JSON with ``json.loads``
    (which takes lone surrogates, and has no size limit before reading): so the body is read by
    our dependency and declared here, the schema coming from the same pydantic model."""
    if model not in BODY_MODELS:
        BODY_MODELS.append(model)
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


CompletionBody = Annotated[CompletionRequest, Depends(_parser(CompletionRequest))]
ChatBody = Annotated[ChatCompletionRequest, Depends(_parser(ChatCompletionRequest))]
TokenizeBody = Annotated[TokenizeRequest, Depends(_parser(TokenizeRequest))]
DetokenizeBody = Annotated[DetokenizeRequest, Depends(_parser(DetokenizeRequest))]


@router.post("/v1/completions", response_model=None, openapi_extra=json_body(CompletionRequest))
async def completions(http: Request, body: CompletionBody) -> Response:
    state = _state(http)
    _, tokenizer = state.ready_engine()
    _check_model(body, state)
    _refuse_unsupported(body)
    texts = [body.prompt] if isinstance(body.prompt, str) else [p for p in body.prompt if isinstance(p, str)]
    _check_text_fits(texts, tokenizer, state, "prompt")
    prompts = await run_in_threadpool(_completion_prompts, body, tokenizer)
    params = [_params(body, len(p), body.max_tokens, state, "prompt", body.logprobs) for p in prompts]
    shape = _CompletionShape(LogprobFormatter(tokenizer), body.logprobs is not None)
    return await _respond(http, body, prompts, params, shape)


@router.post("/v1/chat/completions", response_model=None, openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(http: Request, body: ChatBody) -> Response:
    state = _state(http)
    _, tokenizer = state.ready_engine()
    _check_model(body, state)
    _refuse_unsupported(body)
    messages = [m.template_dict() for m in body.messages]
    _check_text_fits(["".join(str(m.get("content") or "") for m in messages)], tokenizer, state, "messages")
    try:
        prompt = await run_in_threadpool(tokenizer.encode_chat, messages)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(body, len(prompt), max_tokens, state, "messages", top)
    shape = _ChatShape(LogprobFormatter(tokenizer), body.logprobs)
    return await _respond(http, body, [prompt], [params], shape)


@router.post("/tokenize", openapi_extra=json_body(TokenizeRequest))
async def tokenize(http: Request, body: TokenizeBody) -> dict:
    state = _state(http)
    _, tokenizer = state.ready_engine()
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    try:
        if body.messages is not None:
            tokens = tokenizer.encode_chat([m.template_dict() for m in body.messages])
        else:
            tokens = tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_context}


@router.post("/detokenize", openapi_extra=json_body(DetokenizeRequest))
async def detokenize(http: Request, body: DetokenizeBody) -> dict:
    _, tokenizer = _state(http).ready_engine()
    return {"prompt": tokenizer.decode(_check_token_ids(body.tokens, tokenizer, "tokens")) if body.tokens else ""}
