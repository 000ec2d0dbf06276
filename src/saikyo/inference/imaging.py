"""Encoded image bytes -> uint8 HWC pixels, resized and centre-cropped for one network.

The only module that knows pixels. Normalisation (cast, layout, mean/std) is *not* done here: it is
folded into the ONNX graph (see runtime/onnxruntime.py), so the CPU work per image is one JPEG decode
at reduced DCT scale plus one resampling pass.
"""

from __future__ import annotations

import io
import re
import threading
import time
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from saikyo.inference.preprocessing import Preprocessing

# What we accept, by content (Pillow's sniffed format), never by file name. Pillow is asked to try only
# these parsers: the other thirty-odd formats it knows never see a client's bytes.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO"})
_OPEN_FORMATS = sorted(ACCEPTED_FORMATS - {"MPO"})  # MPO files open through the JPEG parser

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

# Truncated files must raise, not silently decode grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """The bytes are not an image we can classify. The message is safe to show to the user."""


class BudgetExceeded(Exception):
    """The request's images together claim more pixels than it may decode (a 413, not one bad file)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request's images hold more than {limit} pixels in all")
        self.limit = limit


class DecodeAbandoned(Exception):
    """Nobody waits for this request any more (deadline passed, or the client left): stop decoding it."""


class RequestBudget:
    """What one request may still spend on decoding, shared by the threads that decode its images.

    Each image takes its width x height from the pixel budget when its header has been read, before any
    pixel is decoded; once the budget is exceeded, the deadline has passed or the client is gone, the
    request's remaining images are not decoded at all.
    """

    def __init__(self, max_pixels: int | None, deadline: float | None = None) -> None:
        self.max_pixels = max_pixels
        self.deadline = deadline  # time.monotonic() seconds
        self.abandoned = threading.Event()  # set when the client goes away
        self._left = max_pixels
        self._exceeded = False
        self._lock = threading.Lock()

    def check(self) -> None:
        if self._exceeded:
            raise BudgetExceeded(self.max_pixels or 0)
        if self.abandoned.is_set():
            raise DecodeAbandoned("the client went away")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DecodeAbandoned("the request's deadline passed")

    def take(self, pixels: int) -> None:
        with self._lock:
            self.check()
            if self._left is not None:
                if pixels > self._left:
                    self._exceeded = True
                    raise BudgetExceeded(self.max_pixels or 0)
                self._left -= pixels


def crop_box(width: int, height: int, pp: Preprocessing) -> tuple[float, float, float, float]:
    """The source rectangle that "resize shorter side to resize_size, centre-crop input_size" keeps."""
    side = min(width, height) * pp.input_size / pp.resize_size
    left = (width - side) / 2
    top = (height - side) / 2
    return (left, top, left + side, top + side)


def decode(
    data: bytes, pp: Preprocessing, max_pixels: int | None = None, budget: RequestBudget | None = None
) -> np.ndarray:
    """Decode, resize and centre-crop in one resampling pass. Returns uint8 [H, W, 3] (RGB).

    ImageError when this file is unusable; with a `budget`, BudgetExceeded / DecodeAbandoned when the
    request as a whole must stop.
    """
    if not data:
        raise ImageError("empty file")
    if budget is not None:
        budget.check()
    try:
        with warnings.catch_warnings():
            # Pillow warns (and later raises) on huge images; we check the size ourselves first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
        if img.format not in ACCEPTED_FORMATS:
            raise ImageError(
                f"unsupported image format {img.format}; accepted: JPEG, PNG, WebP, BMP, GIF"
            )
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageError("image has no pixels")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        if budget is not None:
            budget.take(width * height)
        if img.format in ("JPEG", "MPO"):
            # DCT scaling: let libjpeg decode at 1/2, 1/4 or 1/8 size while staying >= the crop we need.
            scale = pp.resize_size / min(width, height)
            img.draft("RGB", (max(1, int(width * scale + 1)), max(1, int(height * scale + 1))))
        return resize_crop(img, pp)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fired while reading the header (over 2 x Image.MAX_IMAGE_PIXELS): still
        # nothing was decoded, and the user deserves the real reason.
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(claimed.group(1))} pixels" if claimed else "too many pixels"
        limit = max_pixels if max_pixels is not None else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageError(f"image header claims {size}; the limit is {limit}") from None
    except UnidentifiedImageError:
        other = _sniff(data)
        if other is not None:
            raise ImageError(f"unsupported image format {other}; accepted: JPEG, PNG, WebP, BMP, GIF") from None
        raise ImageError("not a recognised image (accepted: JPEG, PNG, WebP, BMP, GIF)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        # Truncated or corrupt data surfaces as any of these from Pillow's decoders.
        raise ImageError(f"corrupt or truncated image ({type(exc).__name__})") from None


def _sniff(data: bytes) -> str | None:
    """The format of an image we do not accept, from its signature alone: Pillow's `accept` checks look
    at the first bytes only, so no parser of that format runs on the client's bytes."""
    Image.init()
    prefix = data[:16]
    for name, (_factory, accept) in Image.OPEN.items():
        if name not in ACCEPTED_FORMATS and accept is not None:
            try:
                if accept(prefix):
                    return name
            except Exception:  # an accept check that trips on a short prefix says nothing
                continue
    return None


def resize_crop(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """An opened image -> uint8 [H, W, 3] RGB: resize the shorter side and centre-crop in one resampling
    pass. Everything that turns a photo into a network's pixels goes through here (serving, calibration)."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    # draft() may have shrunk a JPEG: compute the crop on the decoded size.
    box = crop_box(img.width, img.height, pp)
    target = pp.input_size
    img = img.resize((target, target), _RESAMPLE[pp.interpolation], box=box, reducing_gap=3.0)
    return np.asarray(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white, as a viewer would show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def normalize(pixels: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], normalised; what the ONNX graph's front does.

    Used for the v2 FP32 tensor path in tests and by callers that want the network's raw input.
    """
    scale, shift = pp.pixel_affine()
    x = pixels.astype(np.float32) * scale + shift
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
