"""Every error a client can cause becomes JSON {"error": ..., "detail": ...} with the right status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


class ClientGone(Exception):
    """The client closed the connection before its answer was ready (logged and counted, not an error)."""


def error_body(error: str, detail: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": error}
    if detail is not None:
        body["detail"] = detail
    return body


# The body of every error, as the OpenAPI schema documents it.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "detail": {}},
}


def error_response(description: str) -> dict[str, Any]:
    """An OpenAPI response entry for an error status."""
    return {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}


async def send_json(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    error: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> None:
    """The error body, sent from a pure ASGI middleware (where ApiError's handler does not reach)."""
    await JSONResponse(error_body(error, detail), status_code=status, headers=headers)(scope, receive, send)


# nginx's "client closed request": nobody receives it, but access logs and /metrics show what happened.
CLIENT_CLOSED_REQUEST = 499


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnect)
    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: Exception) -> JSONResponse:
        # The client's doing, not a server error: no traceback, counted on /metrics.
        route = getattr(request.scope.get("route"), "path", request.url.path)
        when = "mid-upload" if isinstance(exc, ClientDisconnect) else "before its answer was ready"
        log.info("client disconnected %s (%s %s)", when, request.method, route)
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.client_disconnects.labels(route).inc()
        return JSONResponse(error_body("client closed the connection"), status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        # With keys on, an anonymous caller of an open route (a probe) learns no model names from a 404.
        anonymous = exc.status == 404 and getattr(request.state, "anonymous", False)
        detail = None if anonymous else exc.detail
        return JSONResponse(error_body(exc.error, detail), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "path", "body")),
             "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse(error_body(f"invalid request: {summary}", problems), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "not found", 405: "method not allowed"}
        text = exc.detail if isinstance(exc.detail, str) and exc.detail else messages.get(exc.status_code, "error")
        if exc.status_code == 404 and text == "Not Found":
            text = "not found"
        return JSONResponse(error_body(text), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback here; the client sees no internals.
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error"), status_code=500)
