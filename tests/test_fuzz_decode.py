"""Fuzzing the decode path: whatever the bytes, `imaging.decode` returns the network's pixels or raises
`ImageError` (the documented error, shown to users as a 400) -- never anything else, and an image whose
header claims too many pixels is refused before a single pixel is decoded."""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from support.paths import CAT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from support.stress import every_format, png_claiming

from saikyo.inference import imaging
from saikyo.inference.preprocessing import Preprocessing

PP = Preprocessing(input_size=32, crop_pct=0.875)
LIMIT = 1_000_000  # small, so that fuzzed headers under the limit stay cheap to decode
SEEDS = [*every_format().values(), CAT.read_bytes()]
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def decode_checked(data: bytes) -> None:
    """The property: a correct array, or ImageError. Any other exception fails the test."""
    try:
        out = imaging.decode(data, PP, LIMIT)
    except imaging.ImageError as exc:
        assert str(exc)  # the message is what the user reads
        return
    assert out.dtype == np.uint8 and out.shape == (PP.input_size, PP.input_size, 3)


@settings(FUZZ, max_examples=300)
@pytest.mark.slow  # fuzz
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    decode_checked(data)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
    return bytes(data)


@settings(FUZZ, max_examples=1000)
@pytest.mark.slow  # fuzz
@given(mutated())
def test_mutated_images_of_every_format(data: bytes) -> None:
    decode_checked(data)


# ---- headers that claim any size: the pixel limit holds before decoding ----
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(w: int, h: int, colour: int) -> bytes:
    depth = 8
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def gif_header(w: int, h: int) -> bytes:
    screen = struct.pack("<HHBBB", w, h, 0, 0, 0)
    image = b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00;"
    return b"GIF89a" + screen + image


def bmp_header(w: int, h: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + b"\0" * 64


def jpeg_header(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x12" * 64 + b"\xff\xd9"


HEADERS = {"png": lambda w, h: png_header(w, h, 2), "png-grey": lambda w, h: png_header(w, h, 0),
           "gif": gif_header, "bmp": bmp_header, "jpeg": jpeg_header}  # fmt: skip
SIDE = {"png": 2**31 - 1, "png-grey": 2**31 - 1, "gif": 65535, "bmp": 2**31 - 1, "jpeg": 65535}


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any pixel decoding fail loudly (AssertionError is not a type decode() catches)."""
    calls: list[str] = []

    def forbidden(self, *args, **kwargs):
        calls.append(type(self).__name__)
        raise AssertionError(f"pixels decoded for a {self.size} image over the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden)
    monkeypatch.setattr(Image.Image, "load", forbidden)
    return calls


@settings(FUZZ, max_examples=300)
@pytest.mark.slow  # fuzz
@given(kind=st.sampled_from(sorted(HEADERS)), data=st.data())
def test_claimed_sizes_over_the_limit_are_refused_before_decoding(kind: str, data: st.DataObject) -> None:
    side = SIDE[kind]
    w = data.draw(st.integers(LIMIT // side + 1, side), label="width")
    h = data.draw(st.integers(max(1, LIMIT // w + 1), side), label="height")  # w * h > LIMIT
    blob = HEADERS[kind](w, h)
    with pytest.MonkeyPatch.context() as mp:
        calls: list[str] = []

        def forbidden(self, *args, **kwargs):
            calls.append(kind)
            raise AssertionError(f"pixels decoded for a {w}x{h} {kind} over the limit")

        mp.setattr(ImageFile.ImageFile, "load", forbidden)
        mp.setattr(Image.Image, "load", forbidden)
        with pytest.raises(imaging.ImageError) as exc:
            imaging.decode(blob, PP, LIMIT)
    assert calls == []
    message = str(exc.value)
    # Either our limit or a header Pillow itself cannot parse: never a decode attempt.
    assert "limit" in message or "not a recognised image" in message or "corrupt" in message, message


@settings(FUZZ, max_examples=150)
@pytest.mark.slow  # fuzz
@given(kind=st.sampled_from(sorted(HEADERS)), w=st.integers(1, 1000), h=st.integers(1, 1000))
def test_claimed_sizes_under_the_limit_decode_or_fail_cleanly(kind: str, w: int, h: int) -> None:
    decode_checked(HEADERS[kind](w, h))


def test_the_50000_square_png_bomb_is_refused_from_its_header(no_pixel_decoding) -> None:
    bomb = png_claiming(50_000, 50_000)
    with pytest.raises(imaging.ImageError, match="2500000000 pixels; the limit is 40000000"):
        imaging.decode(bomb, PP, 40_000_000)
    with pytest.raises(imaging.ImageError, match="8000x8000 = 64000000 pixels; the limit is 40000000"):
        imaging.decode(png_claiming(8000, 8000), PP, 40_000_000)
    assert no_pixel_decoding == []


# ---- atheris: coverage-guided, when it is installed ----
HARNESS = Path(__file__).parent / "support" / "fuzz_decode_harness.py"


@pytest.mark.slow  # fuzz
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_coverage_guided_fuzzing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(seed)
    out = subprocess.run(
        [sys.executable, str(HARNESS), "-runs=20000", "-max_len=65536", "-rss_limit_mb=4096", str(corpus)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    tail = out.stderr[-3000:]
    assert out.returncode == 0, tail
    assert "Done 20000 runs" in out.stderr, tail
