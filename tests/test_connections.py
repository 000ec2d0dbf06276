"""Connections that cost the server nothing for long: idle ones, trickling ones, too many, pipelined heads
and chunk framing counted, and kept-alive ones that outlast a load balancer's idle timeout. Raw sockets
against a real server on loopback."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from support.paths import CAT
from support.serverproc import ServerProcess, running_server

from saikyo.models.repository import ModelRepository

HEADER_TIMEOUT_S = 1.0
MAX_HEADER = 8 * 1024
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 20


def address(server: ServerProcess) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def connect(server: ServerProcess, timeout: float = 15.0) -> socket.socket:
    s = socket.create_connection(address(server), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length framed); (0, {}, b"") when the server closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0, {}, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closes the connection (recv sees EOF or a reset) before the socket's timeout."""
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


GET_LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture(scope="module")
def server(tiny_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(
        tiny_repository.root, "tiny", tmp_path_factory.mktemp("logs"),
        "--header-timeout-s", str(HEADER_TIMEOUT_S), "--max-header-bytes", str(MAX_HEADER),
        "--max-body-bytes", str(MAX_BODY), "--max-connections", str(MAX_CONNECTIONS),
    ) as s:  # fmt: skip
        yield s
        assert "Traceback" not in s.log(), s.log_tail(60)


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server: ServerProcess) -> None:
    with connect(server) as s:
        assert closed_by_server(s)
    with connect(server) as s:  # one that sent part of a head gets a 408 first
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        status, _, body = read_response(s)
        assert status == 408 and json.loads(body)["detail"]["setting"] == "header_timeout_s"


def test_a_body_still_trickling_after_its_answer_is_cut_off(server: ServerProcess) -> None:
    with connect(server) as s:
        # A route that answers without reading the body (405), then a body that never completes.
        s.sendall(b"POST /v2/health/live HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        status, _, _ = read_response(s)
        assert status == 405
        for _ in range(3):
            with contextlib.suppress(OSError):
                s.sendall(b"x")
            time.sleep(0.2)
        assert closed_by_server(s)


def test_connections_beyond_the_cap_are_answered_503_and_the_others_served(server: ServerProcess) -> None:
    socks = [connect(server) for _ in range(MAX_CONNECTIONS + 5)]
    try:
        time.sleep(0.2)  # every one accepted
        socks[-1].sendall(GET_LIVE)
        status, headers, body = read_response(socks[-1])
        assert status == 503 and headers["connection"] == "close", body
        assert json.loads(body)["detail"] == {"limit": MAX_CONNECTIONS, "setting": "max_connections"}
        socks[0].sendall(GET_LIVE)
        assert read_response(socks[0])[0] == 200
    finally:
        for s in socks:
            s.close()


def test_a_pipelined_head_is_counted_from_its_start_in_the_same_read(server: ServerProcess) -> None:
    half = b"a" * (MAX_HEADER * 3 // 4)
    with connect(server) as s:
        # The second request's head starts in the first request's packet and ends in the next one: 1.5x
        # the limit in all.
        s.sendall(GET_LIVE + b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Pad: " + half)
        assert read_response(s)[0] == 200
        time.sleep(0.2)
        with contextlib.suppress(OSError):
            s.sendall(half + b"\r\n\r\n")
        status, _, body = read_response(s)
        assert status == 431, body


def test_chunk_framing_counts_toward_the_body_limit(server: ServerProcess) -> None:
    # 200 bytes of body in chunks of one byte, each with a 4 kB extension: 800 kB on the wire.
    chunk = b"1;ext=" + b"e" * 4000 + b"\r\nZ\r\n"
    head = b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(server) as s:
        s.sendall(head)
        with contextlib.suppress(OSError):
            for _ in range(200):
                s.sendall(chunk)
            s.sendall(b"0\r\n\r\n")
        status, _, body = read_response(s)
        assert status == 413 and json.loads(body)["detail"]["setting"] == "max_body_bytes", body


def test_a_kept_alive_connection_idle_past_the_old_5_s_carries_the_next_request(server: ServerProcess) -> None:
    with connect(server) as s:
        s.sendall(GET_LIVE)
        assert read_response(s)[0] == 200
        time.sleep(6.5)  # uvicorn's default keep-alive (5 s) closed it here
        s.sendall(GET_LIVE)
        assert read_response(s)[0] == 200


# Over 1,000, and past the common soft limit of 1,024 open files the server starts with.
IDLE = 1200


@pytest.mark.slow
def test_a_thousand_idle_connections_leave_room_for_a_normal_request(
    tiny_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < IDLE + 512:
        pytest.skip(f"the hard limit on open files ({hard}) leaves no room for {IDLE} sockets on each side")
    # The server starts at the common soft limit of 1024 (raising it is its job); this process needs more.
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        with running_server(tiny_repository.root, "tiny", tmp_path_factory.mktemp("logs")) as server:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE + 1024) if hard != resource.RLIM_INFINITY else IDLE + 1024, hard))
            idle = [connect(server) for _ in range(IDLE)]
            try:
                started = time.perf_counter()
                r = httpx.post(f"{server.url}/classify", files={"images": ("cat.jpg", CAT.read_bytes())}, timeout=10)
                print(f"/classify beside {IDLE} idle connections: {(time.perf_counter() - started) * 1000:.0f} ms")
                assert r.status_code == 200, r.text
            finally:
                for s in idle:
                    s.close()
            assert "Too many open files" not in server.log(), server.log_tail(30)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
