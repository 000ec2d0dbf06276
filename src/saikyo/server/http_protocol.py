"""Bounds on a connection and on a request's head (request line + headers), enforced where the bytes arrive.

uvicorn's httptools protocol buffers header bytes for as long as they keep coming, and waits for them
for as long as the client likes: one connection could hold 50 MB of "header" in memory, or a slot for
ever by sending a byte a minute (slowloris), or by sending nothing at all. The ASGI app only sees a
request once its head is complete, so no middleware can help. This protocol:
- refuses, before buffering more, a head over `max_header_bytes` (431), counting a pipelined request's
  head from where it starts even when it arrives in the same read as the request before it;
- closes a connection whose first head is not complete `header_timeout_s` after accept (silently when
  it sent nothing, else 408), and a kept-alive one whose next head is not complete that long after its
  first byte (between requests uvicorn's keep-alive timeout applies);
- counts a body's bytes as they arrive on the wire, chunk-size lines and extensions included: a chunked
  body of 1-byte chunks with kilobytes of extensions each is 413 like any body over `max_body_bytes`;
- closes a connection whose response is complete while its request body still trickles in, once the
  rest has not arrived within `header_timeout_s`;
- answers 503 to the requests of a connection accepted while `max_connections` were open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from saikyo.server.errors import error_body
from saikyo.settings import Settings

log = logging.getLogger(__name__)

_REASONS = {408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large"}


def _connection_cap_app(limit: int) -> Any:
    """The app a connection accepted beyond the cap gets instead of the server's: 503 and close."""
    body = json.dumps(
        error_body("server overloaded: too many open connections, retry later", {"limit": limit, "setting": "max_connections"})
    ).encode()

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), (b"retry-after", b"1")]  # fmt: skip
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return refuse


class BoundedHeadProtocol(HttpToolsProtocol):
    max_header_bytes = 64 * 1024
    header_timeout_s = 10.0
    max_body_bytes = 64 * 1024 * 1024
    max_connections = 2048

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._body_wire_bytes = 0
        self._in_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        self._over_cap = False
        self._completed_in_feed = False
        self._next_began_in_feed = False
        self._feed_began = False
        self._feed_first_head = self._feed_body = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over_cap = len(self.connections) > self.max_connections
        # Timed from accept: a connection that never sends a byte is closed too.
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if not data:
            return
        if not self._in_head:
            self._body_wire_bytes += len(data)
            if self._body_wire_bytes > self._body_wire_limit() and not self._response_started():
                self._refuse(
                    413, f"request body exceeds the limit of {self.max_body_bytes} bytes (chunk framing counted)",
                    "max_body_bytes", limit_bytes=self.max_body_bytes, received_bytes=self._body_wire_bytes,
                )  # fmt: skip
                return
            self._feed(data)
            return
        if self._head_timer is None:  # a kept-alive connection's next head: its first byte
            self._arm_timer()
        room = self.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            self._feed(data)
            return
        # Feed what fits: the head may end inside it, and what follows is body (or the next request).
        self._head_bytes += room
        self._feed(data[:room])
        if self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(431, f"request line and headers exceed {self.max_header_bytes} bytes", "max_header_bytes")
            return
        self.data_received(data[room:])

    def _feed(self, data: bytes) -> None:
        self._completed_in_feed = self._next_began_in_feed = False
        self._feed_began = False
        self._feed_first_head = self._feed_body = 0
        super().data_received(data)
        if self._next_began_in_feed and self._in_head and not self.transport.is_closing():
            # The next request's head began inside these bytes (pipelining): count it from its start, as
            # these bytes less the body and head before it (partly parsed headers are not surfaced yet).
            self._head_bytes = max(self._parsed_head_bytes(), len(data) - self._feed_body - self._feed_first_head)
            self._arm_timer()
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, f"request line and headers exceed {self.max_header_bytes} bytes", "max_header_bytes")

    def _body_wire_limit(self) -> int:
        # A body's framing (chunk-size lines) costs a few bytes per chunk when chunks are of any size.
        return self.max_body_bytes + self.max_body_bytes // 16 + self.max_header_bytes

    def _response_started(self) -> bool:
        return self.cycle is not None and self.cycle.response_started

    def _parsed_head_bytes(self) -> int:
        return len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)

    def on_message_begin(self) -> None:
        if self._completed_in_feed:
            self._next_began_in_feed = True
        else:
            self._feed_began = True
        super().on_message_begin()

    def on_body(self, body: bytes) -> None:
        if not self._completed_in_feed:
            self._feed_body += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The next bytes on this connection are the next request's head (keep-alive).
        self._in_head = True
        self._head_bytes = 0
        self._body_wire_bytes = 0
        self._completed_in_feed = True
        self._cancel_timer()  # a linger after an early response ends: the body did arrive

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._feed_began and not self._completed_in_feed:
            self._feed_first_head = self._parsed_head_bytes()
        self._cancel_timer()
        if not self._over_cap:
            super().on_headers_complete()
            return
        app, self.app = self.app, _connection_cap_app(self.max_connections)
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_head and not self.transport.is_closing():
            # Answered before its body arrived (a route that does not read it): the rest gets as long as a
            # head would, then the connection closes instead of waiting on a trickle for ever.
            self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def _arm_timer(self) -> None:
        self._cancel_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._in_head or (self._head_bytes == 0 and self.cycle is None):
            self.transport.close()  # a body trickling after its answer, or nothing sent since accept
            return
        if self._in_head:
            self._refuse(408, f"request headers not received within {self.header_timeout_s:g} s", "header_timeout_s")

    def _cancel_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, error: str, setting: str, **detail: int) -> None:
        self._cancel_timer()
        body = json.dumps(error_body(error, {"setting": setting, **detail})).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))
            + body
        )
        self.transport.close()


def bounded_protocol(settings: Settings) -> type[BoundedHeadProtocol]:
    """The protocol class for uvicorn's `http=` with this server's limits."""
    limits = {
        "max_header_bytes": settings.max_header_bytes,
        "header_timeout_s": settings.header_timeout_s,
        "max_body_bytes": settings.max_body_bytes,
        "max_connections": settings.max_connections,
    }
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), limits)


# Descriptors beside the connections: models, threads' pipes, the listening socket, logs.
_SPARE_FDS = 256


def raise_fd_limit(settings: Settings) -> None:
    """Raise this process's soft limit on open files (inherited by its workers) to what max_connections
    needs, up to the hard limit: at the common soft limit of 1024 a few hundred idle sockets would exhaust
    the descriptors long before the cap answers 503."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.max_connections + _SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning(
                "max_connections %d needs about %d open files; the hard limit is %d: lower max_connections or "
                "raise the limit (ulimit -n, the container's nofile)", settings.max_connections, wanted, hard,
            )  # fmt: skip
