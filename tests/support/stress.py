"""Helpers for the limit, fault, overload and soak tests: crafted images, raw HTTP, memory, a flood client."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import re
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image


# ---- images ----
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def white_png(size: int = 48) -> bytes:
    return encode(Image.new("RGB", (size, size), (255, 255, 255)), "PNG")


def every_format(seed: int = 0) -> dict[str, bytes]:
    """One small image in every accepted format (the GIF animated: the first frame counts)."""
    img = noise_image(seed=seed)
    frames = [img.convert("P"), noise_image(seed=seed + 1).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "JPEG": encode(img, "JPEG", quality=90),
        "PNG": encode(img, "PNG"),
        "WEBP": encode(img, "WEBP"),
        "BMP": encode(img, "BMP"),
        "GIF": gif.getvalue(),
    }


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header claims width x height RGB pixels.

    Decoded for real it would need width*height*3 bytes (7.5 GB for 50000x50000): a decompression bomb.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 4096, 9)  # the start of the (all-black) pixel stream
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


# ---- memory of another process (Linux /proc) ----
def _status_kib(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    assert m, f"{key} not in /proc/{pid}/status"
    return int(m.group(1))


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    """The process's high-water mark of resident memory since it started."""
    return _status_kib(pid, "VmHWM") / 1024


# ---- raw HTTP, for what httpx will not send ----
def raw_exchange(url: str, request: bytes, *, then_wait: float = 10.0) -> tuple[int, dict[str, str], bytes, float]:
    """Send `request` bytes as they are and read the answer. Returns (status, headers, body, seconds)."""
    parts = urlsplit(url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=then_wait) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        want = int(headers.get("content-length", "0"))
        while len(body) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return status, headers, body, time.monotonic() - started


# ---- a flood client ----
@dataclass
class FloodResult:
    sent: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)  # counts by "error" text
    lost: list[str] = field(default_factory=list)  # transport errors and timeouts: never answered
    bad_bodies: list[str] = field(default_factory=list)  # non-200 answers that were not JSON errors
    missing_retry_after: int = 0
    ok_latencies: list[float] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def latency_ms(self, q: float) -> float:
        return float(np.percentile(self.ok_latencies, q) * 1000) if self.ok_latencies else float("nan")

    def summary(self) -> str:
        return (
            f"sent={self.sent} answered={self.answered} lost={len(self.lost)} statuses={dict(self.statuses)} "
            f"200 latency p50={self.latency_ms(50):.0f}ms p99={self.latency_ms(99):.0f}ms "
            f"max={self.latency_ms(100):.0f}ms reasons={dict(self.errors)}"
        )


def multipart_request(
    url: str, files: list[tuple[str, tuple[str, bytes, str]]], headers: dict[str, str], path: str = "/classify"
) -> bytes:
    """The bytes of one keep-alive HTTP/1.1 multipart POST, built once and sent many times."""
    boundary = "floodboundary7d1e"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
        for field, (name, data, ctype) in files
    ) + f"--{boundary}--\r\n".encode()
    host = urlsplit(url).netloc
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Type: multipart/form-data; boundary={boundary}",
            f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _flood(
    url: str, requests: list[bytes], seconds: float, concurrency: int, timeout: float
) -> FloodResult:
    # Plain asyncio streams, one keep-alive connection per client: a Python HTTP client library would
    # be the bottleneck on two cores, and this one counts exactly what it sent and what came back.
    result = FloodResult()
    stop_at = time.monotonic() + seconds
    parts = urlsplit(url)

    async def worker() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.monotonic() < stop_at:
            request = requests[result.sent % len(requests)]
            result.sent += 1
            started = time.monotonic()
            try:
                async with asyncio.timeout(timeout):
                    if conn is None:
                        conn = await asyncio.open_connection(parts.hostname, parts.port)
                    reader, writer = conn
                    writer.write(request)
                    await writer.drain()
                    status, headers, body = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
                result.lost.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            if headers.get("connection", "").lower() == "close":
                conn[1].close()
                conn = None
            result.statuses[status] += 1
            if status == 200:
                result.ok_latencies.append(time.monotonic() - started)
                continue
            try:
                result.errors[json.loads(body)["error"]] += 1
            except (ValueError, KeyError, TypeError):
                result.bad_bodies.append(body[:200].decode("latin-1"))
            if status == 503 and "retry-after" not in headers:
                result.missing_retry_after += 1
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


def flood(
    url: str, files: list[tuple[str, tuple[str, bytes, str]]], *, seconds: float, concurrency: int,
    headers: dict[str, str] | None = None, timeout: float = 60.0,
) -> FloodResult:  # fmt: skip
    """`concurrency` clients post `files` to /classify back to back for `seconds`; every outcome counts.

    A request in progress when the time is up is still awaited: nothing sent goes uncounted.
    """
    return flood_requests(url, [multipart_request(url, files, headers or {})], seconds=seconds,
                          concurrency=concurrency, timeout=timeout)  # fmt: skip


def flood_requests(url: str, requests: list[bytes], *, seconds: float, concurrency: int, timeout: float = 60.0) -> FloodResult:
    """Like flood, cycling through ready-made raw requests (see multipart_request)."""
    return asyncio.run(_flood(url, requests, seconds, concurrency, timeout))


def wait_settled(url: str, timeout: float = 120.0) -> dict[str, str]:
    """Wait until no model is loading any more (some may have failed); returns the model states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/v2/health/ready", timeout=2)
            if r.status_code == 200:
                return {}
            states = r.json().get("detail", {})
            if states and "loading" not in states.values():
                return states
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("models still loading")
