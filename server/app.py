"""The FastAPI application: error handling, health, metrics and the OpenAPI schema; the API's routes
live in routes.py."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.protocol import APIError, ErrorResponse, error_body
from server.routes import BODY_MODELS, router
from server.state import ServerState

log = logging.getLogger(__name__)


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


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies the routes read themselves (``routes.json_body``),
    as the pydantic models that validate them describe them."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        models: list[type[BaseModel]] = [*BODY_MODELS, ErrorResponse]
        _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        error = {"description": "an OpenAI-style error", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                # an invalid request is a 400 here (``invalid`` below), never FastAPI's 422
                if operation["responses"].pop("422", None) is not None:
                    operation["responses"]["400"] = error
                if path.startswith("/v1/") or "requestBody" in operation:
                    operation["responses"].setdefault("400", error)
                    operation["responses"]["default"] = error
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="edgellm", version="0.1.0")
    app.state.edgellm = state
    app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

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

    @app.head("/health", operation_id="health_head")  # load balancers' health checks
    @app.get("/health", operation_id="health")
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
