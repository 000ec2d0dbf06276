"""The in-memory multipart parser against what real clients send, and against broken bodies."""

from __future__ import annotations

import httpx
import pytest

from saikyo.server.routes import multipart


def encoded(files: list[tuple[str, tuple[str, bytes, str]]], data: dict | None = None) -> tuple[bytes, str]:
    req = httpx.Request("POST", "http://127.0.0.1/", files=files, data=data)
    return req.read(), req.headers["content-type"]


def test_parses_what_httpx_sends_including_binary_payloads_and_text_fields() -> None:
    payloads = [bytes(range(256)) * 40, b"\r\n--not-the-boundary\r\n", b""]
    files = [("images", (f"f{i}.jpg", p, "image/jpeg")) for i, p in enumerate(payloads)]
    body, ctype = encoded(files, data={"note": "hello"})
    parts = multipart.parse(body, multipart.boundary_of(ctype), 10)
    by_name = [(p.name, p.filename, p.data) for p in parts]
    assert ("note", None, b"hello") in by_name
    images = [p for p in parts if p.name == "images"]
    assert [p.filename for p in images] == ["f0.jpg", "f1.jpg", "f2.jpg"]
    assert [p.data for p in images] == payloads
    assert images[0].content_type == "image/jpeg"


def test_quoted_and_rfc5987_filenames_and_preamble() -> None:
    boundary = b"XyZ"
    body = (
        b"preamble to ignore\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="images"; filename="a \\"quoted\\" name.png"\r\n\r\nAAA\r\n'
        b"--XyZ\r\nContent-Disposition: form-data; name=images; filename*=UTF-8''%E7%8C%AB.jpg\r\n\r\nBBB\r\n"
        b"--XyZ--\r\nepilogue"
    )
    parts = multipart.parse(body, boundary, 10)
    assert [(p.filename, p.data) for p in parts] == [('a "quoted" name.png', b"AAA"), ("\u732b.jpg", b"BBB")]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"no boundary at all", "no multipart boundary"),
        (b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nunterminated", "missing closing boundary"),
        (b"--B\r\nContent-Disposition: form-data; name=\"a\"", "headers never end"),
        (b"--B\r\nX-Other: 1\r\n\r\ndata\r\n--B--", "Content-Disposition"),
        (b"--B\r\nContent-Disposition: form-data\r\n\r\ndata\r\n--B--", "without a field name"),
        (b"--B\r\nnot a header line\r\n\r\ndata\r\n--B--", "bad part header"),
        (b"--Bjunk\r\n", "bad boundary line"),
    ],
)
def test_malformed_bodies_raise_multipart_error(body: bytes, needle: str) -> None:
    with pytest.raises(multipart.MultipartError, match=needle):
        multipart.parse(body, b"B", 10)


def test_part_count_is_bounded() -> None:
    body, ctype = encoded([("images", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(5)])
    with pytest.raises(multipart.TooManyParts):
        multipart.parse(body, multipart.boundary_of(ctype), 4)


@pytest.mark.parametrize("ctype", ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=\"a\x01b\""])
def test_bad_boundary_parameter(ctype: str) -> None:
    with pytest.raises(multipart.MultipartError):
        multipart.boundary_of(ctype)
