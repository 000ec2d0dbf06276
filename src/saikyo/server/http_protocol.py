"""Bounds on a request's head (request line + headers), enforced where the bytes arrive.

uvicorn's httptools protocol buffers header bytes for as long as they keep coming, and waits for them
for as long as the client likes: one connection could hold 50 MB of "header" in memory, or a slot for
ever by sending a byte a minute (slowloris). The ASGI app only sees a request once its head is complete,
so no middleware can help; this protocol refuses, before buffering more, a head over `max_header_bytes`
(431) and one not complete within `header_timeout_s` of its first byte (408), then closes the connection.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from saikyo.server.errors import error_body
from saikyo.settings import Settings

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class BoundedHeadProtocol(HttpToolsProtocol):
    max_header_bytes = 64 * 1024
    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        if self._head_bytes == 0 and data:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)
        room = self.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed what fits: the head may end inside it, and what follows is body (or the next request).
        self._head_bytes += room
        super().data_received(data[:room])
        if self._in_head:
            self._refuse(431, f"request line and headers exceed {self.max_header_bytes} bytes", "max_header_bytes")
            return
        self.data_received(data[room:])

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The next bytes on this connection are the next request's head (keep-alive).
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, f"request headers not received within {self.header_timeout_s:g} s", "header_timeout_s")

    def _cancel_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, error: str, setting: str) -> None:
        self._cancel_timer()
        body = json.dumps(error_body(error, {"setting": setting})).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))
            + body
        )
        self.transport.close()


def bounded_protocol(settings: Settings) -> type[BoundedHeadProtocol]:
    """The protocol class for uvicorn's `http=` with this server's limits."""
    return type(
        "BoundedHeadProtocol",
        (BoundedHeadProtocol,),
        {"max_header_bytes": settings.max_header_bytes, "header_timeout_s": settings.header_timeout_s},
    )
