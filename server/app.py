"""The FastAPI application: error handling, health, models; generation routes live in routes.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine import Engine
from server.metrics import Metrics
from server.protocol import error_body, now
from server.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI-style fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


@dataclass
class ServerState:
    """What the routes need; filled in when the cluster has loaded."""

    model_name: str
    tokenizer: TextTokenizer | None = None
    engine: Engine | None = None
    max_context: int = 0
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    status: str = "loading"  # loading | ready | failed
    detail: str = "loading the model across the cluster"
    created: int = field(default_factory=now)

    def ready_engine(self) -> tuple[Engine, TextTokenizer]:
        if self.status != "ready" or self.engine is None or self.tokenizer is None:
            raise APIError(503, f"the server is not ready: {self.detail}", "service_unavailable",
                           code="not_ready", headers={"Retry-After": "5"})
        if self.engine.error:
            raise APIError(503, self.engine.error, "service_unavailable", code="cluster_unavailable",
                           headers={"Retry-After": "1"})
        return self.engine, self.tokenizer


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        error = str(first.get("ctx", {}).get("error", first.get("msg")))
        if "hex escape" in error:  # what the JSON parser says of "\ud800" alone, which is no Unicode text
            error += " (a lone UTF-16 surrogate escape is not Unicode text)"
        return f"malformed JSON body: {error}", None
    # drop "body" and pydantic's union-branch tags ("str", "list[int]", ...) from the location
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    what = first.get("msg", "invalid request")
    return (f"{param}: {what}" if param else what), param


class InternalErrors:
    """A bug in a route answers 500 with an OpenAI error body and the connection stays open.

    Starlette's own handler for ``Exception`` sends its response and then re-raises, so uvicorn
    logged the traceback a second time and closed the keep-alive connection without saying so:
    the client's next request on it failed with a reset. Here the error ends with the response
    (or, once a response has started, e.g. a stream, is re-raised: nothing else can be sent)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                raise
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            await JSONResponse(error_body("internal server error", "server_error"), 500)(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    from server.routes import router

    app = FastAPI(title="edgellm", version="0.1.0")
    app.state.edgellm = state
    app.include_router(router)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    app.add_middleware(InternalErrors)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' health checks
    async def health() -> JSONResponse:
        engine_error = state.engine.health_problem() if state.engine else None
        ok = state.status == "ready" and not engine_error
        status = "ok" if ok else ("degraded" if engine_error and state.status == "ready" else state.status)
        body = {"status": status, "detail": engine_error or state.detail}
        if ok:
            return JSONResponse(body)
        # like every 503: loading takes seconds, a repair about one
        return JSONResponse(body, 503, headers={"Retry-After": "5" if state.status != "ready" else "1"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
