"""Decode + preprocess: one resampling pass, DCT-scaled JPEG decode, matches a plain reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
from support.paths import CAT, DATA
from PIL import Image

from saikyo.inference import imaging
from saikyo.inference.preprocessing import Preprocessing

PP = Preprocessing(input_size=224, crop_pct=0.875, interpolation="bilinear")


def reference(data: bytes, pp: Preprocessing) -> np.ndarray:
    """The textbook pipeline: full decode, resize shorter side, centre crop."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = pp.resize_size / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
    left = (img.width - pp.input_size) // 2
    top = (img.height - pp.input_size) // 2
    return np.asarray(img.crop((left, top, left + pp.input_size, top + pp.input_size)))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("photo", ["cat.jpg", "coffee.jpg", "astronaut.jpg"])
def test_fast_path_matches_the_reference_pipeline(photo: str) -> None:
    data = (DATA / photo).read_bytes()
    fast = imaging.decode(data, PP)
    assert fast.shape == (224, 224, 3) and fast.dtype == np.uint8
    diff = np.abs(fast.astype(np.int16) - reference(data, PP).astype(np.int16))
    assert diff.mean() < 6.0  # DCT scaling and one-pass resampling differ from the reference only slightly


def test_large_jpeg_decodes_at_reduced_size_and_still_matches() -> None:
    big = Image.open(CAT).resize((2000, 1500), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=90)
    fast = imaging.decode(data, PP)
    diff = np.abs(fast.astype(np.int16) - reference(data, PP).astype(np.int16))
    assert diff.mean() < 6.0


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "GIF"])
def test_accepted_formats_by_content(fmt: str) -> None:
    img = Image.open(CAT)
    data = encode(img.convert("P") if fmt == "GIF" else img, fmt)
    assert imaging.decode(data, PP).shape == (224, 224, 3)


def test_transparent_png_and_grayscale_become_rgb() -> None:
    rgba = Image.new("RGBA", (300, 200), (255, 0, 0, 0))
    out = imaging.decode(encode(rgba, "PNG"), PP)
    assert (out == 255).all()  # fully transparent -> white
    gray = Image.open(CAT).convert("L")
    out = imaging.decode(encode(gray, "JPEG"), PP)
    assert out.shape == (224, 224, 3)
    assert (out[..., 0] == out[..., 1]).all()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"hello, not an image", "not a recognised image"),
        (CAT.read_bytes()[:3000], "corrupt or truncated"),
        (encode(Image.new("RGB", (8, 8)), "TIFF"), "unsupported image format TIFF"),
    ],
)
def test_bad_input_raises_image_error(data: bytes, needle: str) -> None:
    with pytest.raises(imaging.ImageError, match=needle):
        imaging.decode(data, PP)


@pytest.mark.parametrize("fmt", ["TIFF", "PCX", "ICO"])
def test_parsers_of_other_formats_never_see_the_bytes(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image as PILImage

    data = encode(Image.new("RGB", (16, 16)), fmt)
    assert PILImage.open(io.BytesIO(data)).format == fmt  # Pillow alone would parse it
    opened: list[str] = []
    factory, accept = PILImage.OPEN[fmt]
    monkeypatch.setitem(PILImage.OPEN, fmt, (lambda *a, **k: opened.append(fmt) or factory(*a, **k), accept))
    with pytest.raises(imaging.ImageError, match=f"unsupported image format {fmt}"):
        imaging.decode(data, PP)
    assert opened == []


def test_a_request_budget_counts_pixels_from_headers_and_stops_the_rest() -> None:
    small = encode(Image.new("RGB", (100, 100)), "PNG")
    budget = imaging.RequestBudget(25_000)
    imaging.decode(small, PP, budget=budget)
    imaging.decode(small, PP, budget=budget)
    with pytest.raises(imaging.BudgetExceeded):
        imaging.decode(small, PP, budget=budget)  # 30 000 > 25 000
    with pytest.raises(imaging.BudgetExceeded):
        imaging.decode(encode(Image.new("RGB", (2, 2)), "PNG"), PP, budget=budget)  # the request is over
    gone = imaging.RequestBudget(None)
    gone.abandoned.set()
    with pytest.raises(imaging.DecodeAbandoned):
        imaging.decode(small, PP, budget=gone)
    late = imaging.RequestBudget(None, deadline=0.0)
    with pytest.raises(imaging.DecodeAbandoned):
        imaging.decode(small, PP, budget=late)


def test_pixel_limit_refuses_before_decoding() -> None:
    data = (DATA / "cat.jpg").read_bytes()
    with pytest.raises(imaging.ImageError, match="pixels; the limit is 1000"):
        imaging.decode(data, PP, max_pixels=1000)


def test_normalize_matches_zoo_mean_std() -> None:
    pp = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    px = np.array([[[[0, 255, 127]]]], np.uint8)
    out = imaging.normalize(px, pp)
    assert out.shape == (1, 3, 1, 1)
    assert out[0, :, 0, 0] == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1.0], abs=1e-6)
