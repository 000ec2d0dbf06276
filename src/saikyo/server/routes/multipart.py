"""multipart/form-data (RFC 7578) parsed by python-multipart's streaming parser, within our limits.

The limits middleware has already bounded the body, and the route runs this in a worker thread. The
parser finds the parts with bytes.find (C speed); each part's bytes are kept in memory, not spooled to a
temporary file as Starlette's form parser does. Bounded here: the part count and each part's header block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data. The message is safe to show."""


class TooManyParts(MultipartError):
    def __init__(self, limit: int, parsed: list[Part]) -> None:
        super().__init__(f"more than {limit} parts in the multipart body")
        self.limit = limit
        self.parsed = parsed  # the parts before the limit, so the caller can say which kind overflowed


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None: a text field, not a file upload
    content_type: str | None
    data: bytes


# One part's header block (Content-Disposition, Content-Type): real ones are a few hundred bytes. The cap
# bounds the header parsing (unescaping, unquoting) a hostile filename could make us do.
MAX_PART_HEADER_BYTES = 16 * 1024
MAX_PART_HEADER_LINES = 16

_BOUNDARY_CHARS = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{1,70}$")
_EXTENDED_FILENAME = re.compile(r";\s*filename\*\s*=\s*[^';]*'[^';]*'([^;\s]*)")
_HEADER_STATES = {
    MultipartState.HEADER_FIELD_START, MultipartState.HEADER_FIELD, MultipartState.HEADER_VALUE_START,
    MultipartState.HEADER_VALUE, MultipartState.HEADER_VALUE_ALMOST_DONE, MultipartState.HEADERS_ALMOST_DONE,
}  # fmt: skip


def boundary_of(content_type: str) -> bytes:
    boundary = parse_options_header(content_type)[1].get(b"boundary", b"").decode("latin-1")
    if not boundary:
        raise MultipartError("multipart/form-data content type without a boundary parameter")
    if not _BOUNDARY_CHARS.match(boundary) or boundary.endswith(" "):
        raise MultipartError("invalid multipart boundary")
    return boundary.encode("ascii")


def parse(body: bytes, boundary: bytes, max_parts: int) -> list[Part]:
    """Every part of `body`, in order; MultipartError (TooManyParts past `max_parts`) for what is not
    well-formed. A preamble before the first boundary and an epilogue after the last are ignored."""
    if not body.strip():
        return []
    start = _first_boundary(body, boundary)
    parts = _Parts(max_parts)
    parser = MultipartParser(
        boundary, parts.callbacks(), max_header_count=MAX_PART_HEADER_LINES, max_header_size=MAX_PART_HEADER_BYTES
    )
    try:
        parser.write(body[start:] if start else body)  # a copy only when there is a preamble
    except MultipartParseError as exc:
        raise MultipartError(_reason(str(exc))) from None
    if parser.state in _HEADER_STATES:
        raise MultipartError("malformed multipart body: part headers never end")
    if parser.state is not MultipartState.END:
        raise MultipartError("malformed multipart body: missing closing boundary (truncated upload?)")
    return parts.done


def _first_boundary(body: bytes, boundary: bytes) -> int:
    """Where the first delimiter line starts: the parser itself takes no preamble (RFC 2046 allows one)."""
    if body.startswith(b"--" + boundary):
        return 0
    first = body.find(b"\r\n--" + boundary)
    if first < 0:
        raise MultipartError("no multipart boundary found in the body")
    return first + 2


def _reason(error: str) -> str:
    """The parser's message, as the kind of fault a client can fix (its state is not kept mid-write)."""
    if "header size" in error:
        return f"a multipart part's headers exceed {MAX_PART_HEADER_BYTES} bytes"
    if "header count" in error:
        return f"a multipart part has more than {MAX_PART_HEADER_LINES} header lines"
    if "boundary" in error:
        return "malformed multipart body: bad boundary line"
    if "header" in error:
        return "malformed multipart body: bad part header line"
    return "malformed multipart body"


class _Parts:
    """The parser's callbacks, collecting each part's headers and data."""

    def __init__(self, max_parts: int) -> None:
        self.max_parts = max_parts
        self.done: list[Part] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._header_bytes = 0
        self._data: list[bytes] = []

    def callbacks(self) -> dict:  # type: ignore[type-arg]
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._on_field,
            "on_header_value": self._on_value,
            "on_header_end": self._header_end,
            "on_part_data": self._on_data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        if len(self.done) >= self.max_parts:
            raise TooManyParts(self.max_parts, self.done)
        self._headers.clear()
        self._header_bytes = 0
        self._data = []

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise MultipartError(f"a multipart part's headers exceed {MAX_PART_HEADER_BYTES} bytes")

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _on_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(bytes(data[start:end]))

    def _end(self) -> None:
        self.done.append(_part(self._headers, b"".join(self._data)))
        self._data = []


def _part(headers: dict[bytes, bytes], data: bytes) -> Part:
    disposition = headers.get(b"content-disposition")
    if disposition is None or not disposition.lower().startswith(b"form-data"):
        raise MultipartError("multipart part without 'Content-Disposition: form-data'")
    params = parse_options_header(disposition)[1]  # bytes in, bytes out: names keep their UTF-8
    if b"name" not in params:
        raise MultipartError("multipart part without a field name")
    filename = params[b"filename"].decode("utf-8", "replace") if b"filename" in params else None
    if filename is None:
        # RFC 5987's filename*=UTF-8''..., which RFC 7578 forbids but some clients send (the parser skips it).
        extended = _EXTENDED_FILENAME.search(disposition.decode("utf-8", "replace"))
        filename = unquote(extended.group(1)) if extended else None
    content_type = headers.get(b"content-type")
    return Part(
        params[b"name"].decode("utf-8", "replace"),
        filename,
        content_type.decode("latin-1") if content_type is not None else None,
        data,
    )
