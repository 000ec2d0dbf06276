"""Admission control and request-body limits, as one pure ASGI middleware in front of every route.

Everything here happens before a route reads the body, so a flood or an oversized upload costs the
server a header parse, not memory:
- too many requests in flight: 503 + Retry-After at once (health, metrics and docs are never counted);
- Content-Length over max_body_bytes: 413 at once, without reading a byte of the body;
- a body (chunked, or lying about its length) that grows past the limit while streaming: 413 as soon as
  the limit is crossed, whatever the route was doing with it;
- a body that is still arriving after body_timeout_s: 408, so slow uploads cannot hold slots forever;
- bodies (with their parsed and inflated copies) over the memory budget (memory.py): 503 + Retry-After,
  reserved from Content-Length at admission, or as a chunked body arrives;
- the request's deadline (see deadline.py) is parsed and published for the pipeline; a bad header is 400.
Responses that cut a body short carry `Connection: close`: the rest of the body is never read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from saikyo.server import deadline, memory
from saikyo.server.path_groups import endpoint_group
from saikyo.server.errors import send_json


log = logging.getLogger(__name__)

OVER_BUDGET = "server busy: request bodies in memory are at the memory budget, retry later"


class _BodyRefused(Exception):
    """Raised into the route from `receive`; the middleware answers instead of the route."""

    def __init__(self, status: int, error: str, detail: dict[str, Any]) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


class LimitsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout_s: float,
        max_concurrent_requests: int,
        request_timeout_ms: float,
        max_decompressed_bytes: int,
        memory_budget: tuple[int, str],  # bytes, and where that number came from (memory.body_budget)
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout_s
        self.max_in_flight = max_concurrent_requests
        self.default_timeout_ms = request_timeout_ms
        self.max_decompressed = max_decompressed_bytes
        self.in_flight = 0  # only touched from the event loop: no lock needed
        self.memory_budget, source = memory_budget
        self.bytes_reserved = 0
        log.info("request bodies may hold up to %.0f MiB at once (%s)", self.memory_budget / 2**20, source)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            request_deadline = deadline.parse(headers.get(deadline.HEADER), self.default_timeout_ms)
        except ValueError as exc:
            await send_json(scope, receive, send, 400, str(exc), {"header": deadline.HEADER})
            return

        counted = endpoint_group(scope["path"]) is None
        if counted:
            if self.in_flight >= self.max_in_flight:
                await send_json(
                    scope, receive, send, 503,
                    "server overloaded: too many requests in flight, retry later",
                    {"in_flight": self.in_flight, "limit": self.max_in_flight},
                    headers={"Retry-After": "1"},
                )  # fmt: skip
                return
            self.in_flight += 1
        token = deadline.current.set(request_deadline)
        try:
            await self._with_body_limits(scope, receive, send, headers)
        finally:
            deadline.current.reset(token)
            if counted:
                self.in_flight -= 1

    async def _with_body_limits(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        length = headers.get("content-length", "").strip()
        known = int(length) if length.isascii() and length.isdigit() else 0  # 0: no length said (chunked)
        if known > self.max_body:
            await send_json(
                scope, receive, send, 413,
                f"request body of {known} bytes exceeds the limit of {self.max_body} bytes",
                {"limit_bytes": self.max_body, "content_length": known},
                headers={"Connection": "close"},
            )  # fmt: skip
            return
        compressed = headers.get("content-encoding", "identity").strip().lower() not in ("", "identity")
        reserved = 0

        def reserve(cost: int) -> bool:
            nonlocal reserved
            others = self.bytes_reserved - reserved
            if cost and self.bytes_reserved + cost > self.memory_budget and others:
                return False  # a request alone is always let through: max_body_bytes bounds it
            self.bytes_reserved += cost
            reserved += cost
            return True

        try:
            if not reserve(memory.request_cost(known, compressed, self.max_decompressed) if known else 0):
                await send_json(
                    scope, receive, send, 503,
                    OVER_BUDGET, self._budget_detail(), headers={"Retry-After": "1", "Connection": "close"},
                )  # fmt: skip
                return
            await self._receive_within_limits(scope, receive, send, known, compressed, reserve)
        finally:
            self.bytes_reserved -= reserved

    def _budget_detail(self) -> dict[str, Any]:
        return {"budget_bytes": self.memory_budget, "setting": "memory_budget_bytes"}

    async def _receive_within_limits(
        self, scope: Scope, receive: Receive, send: Send, known: int, compressed: bool, reserve: Any
    ) -> None:
        received = 0
        charged = known  # body bytes whose cost is reserved
        body_done = False
        started = time.monotonic()
        refused: _BodyRefused | None = None
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, charged, body_done, refused
            if body_done or refused is not None:
                return await receive()
            remaining = self.body_timeout - (time.monotonic() - started)
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    message = await receive()
            except TimeoutError:
                refused = _BodyRefused(
                    408,
                    f"request body not received within {self.body_timeout:g} s",
                    {"timeout_s": self.body_timeout, "received_bytes": received},
                )
                raise refused from None
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                if received > self.max_body:
                    refused = _BodyRefused(
                        413,
                        f"request body exceeds the limit of {self.max_body} bytes",
                        {"limit_bytes": self.max_body, "received_bytes": received},
                    )
                    raise refused
                # A body without a length (or longer than it said) is reserved for as it arrives.
                if received > charged:
                    extra = memory.request_cost(received, compressed, self.max_decompressed) - (
                        memory.request_cost(charged, compressed, self.max_decompressed) if charged else 0
                    )
                    charged = received
                    if not reserve(extra):
                        refused = _BodyRefused(503, OVER_BUDGET, self._budget_detail())
                        raise refused
                if not message.get("more_body", False):
                    body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused is not None and not response_started:
                return  # the route's answer to a body it could not read is replaced by ours
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyRefused:
            pass
        except Exception:
            if refused is None:
                raise
        if refused is not None and not response_started:
            retry = {"Retry-After": "1"} if refused.status == 503 else {}
            await send_json(
                scope, receive, send, refused.status, refused.error, refused.detail,
                headers={"Connection": "close", **retry},
            )  # fmt: skip
