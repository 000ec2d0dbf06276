"""Encoded bytes -> uint8 HWC pixels on a torch device: nvJPEG decode, then resize + centre-crop there.

The device twin of `saikyo.inference.imaging` for the torch runner. A request's JPEGs are decoded in one batched
`torchvision.io.decode_jpeg(..., device="cuda")` call (nvJPEG; baseline JPEGs go to the hardware decoder
on A100/H100), then cropped and resampled with antialiasing on the GPU -- photos of one size together --
so the CPU never touches the pixels. Whatever nvJPEG does not take -- PNG, WebP, GIF, CMYK or truncated JPEGs -- goes through
`saikyo.inference.imaging` on the CPU, which also produces the user-facing errors, and is copied to the device.
Resampling reproduces Pillow's: the same fractional crop box (`imaging.crop_box`), the same filter
weights (Pillow's `precompute_coeffs`), horizontal pass first with a uint8 intermediate, applied as two
small matrix products. Pixels then differ from the CPU path only by the JPEG decoders' own rounding --
except for photos large enough that Pillow decodes them at reduced DCT scale, where both are fine but
not equal.

With device "cpu" the same code runs on torchvision's CPU decoder: that is how CI checks it.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from saikyo.inference import imaging
from saikyo.inference.preprocessing import Preprocessing

log = logging.getLogger(__name__)

# torchvision >= 0.29 warns on every call that TorchCodec supersedes it; its nvJPEG decode is what we use.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

JPEG_END = b"\xff\xd9"
# Source pixels resampled in one go (x 3 channels x 4 bytes of float32 working memory).
GROUP_PIXELS = 32_000_000
# Source pixels one nvJPEG call decodes (x 3 bytes of device memory, plus its own buffers): a request of
# 64 camera photos is decoded in several calls, not one that claims gigabytes.
DECODE_CHUNK_PIXELS = 64_000_000


def device_decodable(data: bytes, max_pixels: int | None = None) -> bool:
    """Whether `data` is a complete three-channel JPEG within the pixel limit: nvJPEG's to decode.

    Reads only the header, by hand: Pillow's open costs several times more, and this runs for every
    image under the GIL. Anything else -- including every malformed file -- goes to the CPU path,
    whose errors are the ones users see.
    """
    return _device_pixels(data, max_pixels) is not None


def _device_pixels(data: bytes, max_pixels: int | None) -> int | None:
    """width x height of a JPEG that device_decodable accepts; None for anything else."""
    # A truncated JPEG must be refused (Pillow raises); nvJPEG may decode it into grey. Complete
    # files end with the EOI marker; the rare file with trailing bytes just takes the CPU path.
    if len(data) < 4 or data[-2:] != JPEG_END:
        return None
    frame = jpeg_frame(data)
    if frame is None:
        return None
    width, height, components, adobe_rgb = frame
    # Three components, YCbCr: greyscale, CMYK/YCCK and Adobe's untransformed RGB stay on the CPU.
    if components != 3 or adobe_rgb or width < 1 or height < 1:
        return None
    return width * height if max_pixels is None or width * height <= max_pixels else None


# Start-of-frame markers nvJPEG decodes: baseline, extended sequential, progressive (Huffman coded).
_NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)
# Other SOF markers (lossless, hierarchical, arithmetic coded); C4, C8, CC are DHT, JPG, DAC.
_OTHER_FRAMES = frozenset(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_frame(data: bytes) -> tuple[int, int, int, bool] | None:
    """(width, height, components, Adobe RGB) from a JPEG's frame header; None if not one nvJPEG takes."""
    if data[:2] != b"\xff\xd8":
        return None
    adobe_rgb = False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker in _NVJPEG_FRAMES:
            if i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height, data[i + 9], adobe_rgb
        if marker in _OTHER_FRAMES or marker in (0xDA, 0xD9):  # no frame we take before the scan
            return None
        if marker == 0xEE and data[i + 4 : i + 9] == b"Adobe" and i + 15 < n:
            adobe_rgb = data[i + 15] == 0  # APP14 transform 0: components are RGB, not YCbCr
        i += 2 + length
    return None


def decode(
    blobs: Sequence[bytes],
    pp: Preprocessing,
    device: torch.device | str,
    max_pixels: int | None = None,
    budget: imaging.RequestBudget | None = None,
) -> list[torch.Tensor | imaging.ImageError]:
    """Each blob -> uint8 [S, S, 3] RGB on `device` (resized and centre-cropped), or its ImageError.

    With a `budget`, every image takes its pixels from it before it is decoded (BudgetExceeded or
    DecodeAbandoned stop the request), as on the CPU path.
    """
    device = torch.device(device)
    (first,) = decode_jpegs_of([DecodeJob(blobs, max_pixels, budget)], pp, device)
    if isinstance(first, BaseException):
        raise first
    return finish_on_cpu(blobs, first, pp, device, max_pixels, budget)


@dataclass(eq=False)
class DecodeJob:
    """One request's images for decode_jpegs_of."""

    blobs: Sequence[bytes]
    max_pixels: int | None = None
    budget: imaging.RequestBudget | None = None


# Per image: its device pixels; None where the CPU must decode it; False where nvJPEG refused it after
# its pixels were counted (the CPU path then reports the error, without counting them again).
DevicePart = list[torch.Tensor | None | bool]


def decode_jpegs_of(
    jobs: Sequence[DecodeJob], pp: Preprocessing, device: torch.device
) -> list[DevicePart | BaseException]:
    """The JPEGs of several requests in as few nvJPEG calls as DECODE_CHUNK_PIXELS allows, resized and
    cropped by size group across requests. Per job: its images' device pixels (see DevicePart), or the
    BudgetExceeded / DecodeAbandoned that stops that request (its images are then not decoded).

    Each chunk is resampled as soon as it is decoded, so full-size photos of at most one chunk are in
    device memory at a time, however many requests come together.
    """
    results: list[DevicePart | BaseException] = []
    todo: list[tuple[int, int, bytes, int]] = []  # (job, image, blob, pixels)
    for j, job in enumerate(jobs):
        part: DevicePart = [None] * len(job.blobs)
        # Each header is read once: which images go to nvJPEG, and how many pixels each takes from the budget.
        found = [(i, n) for i, b in enumerate(job.blobs) if (n := _device_pixels(b, job.max_pixels)) is not None]
        try:
            if job.budget is not None:
                for _, pixels in found:
                    job.budget.take(pixels)
        except (imaging.BudgetExceeded, imaging.DecodeAbandoned) as exc:
            results.append(exc)
            continue
        results.append(part)
        todo += [(j, i, job.blobs[i], n) for i, n in found]
    for lo, hi in _chunks([n for *_, n in todo], DECODE_CHUNK_PIXELS):
        chunk = todo[lo:hi]
        decoded = _decode_jpegs([blob for _, _, blob, _ in chunk], device)
        # Photos of one size are resampled together: a few kernels per size instead of per image.
        by_shape: dict[tuple[int, ...], list[tuple[int, int, torch.Tensor]]] = {}
        for (j, i, _, _), img in zip(chunk, decoded):
            if img is None:
                results[j][i] = False  # type: ignore[index]
            else:
                by_shape.setdefault(tuple(img.shape), []).append((j, i, img))
        for (_, height, width), group in by_shape.items():
            # Bound the float32 working set (64 camera photos must not take gigabytes).
            step = max(1, GROUP_PIXELS // (height * width))
            for g in range(0, len(group), step):
                some = group[g : g + step]
                for (j, i, _), pixels in zip(some, resize_crop([img for *_, img in some], pp)):
                    results[j][i] = pixels  # type: ignore[index]
    return results


def finish_on_cpu(
    blobs: Sequence[bytes],
    part: DevicePart,
    pp: Preprocessing,
    device: torch.device,
    max_pixels: int | None = None,
    budget: imaging.RequestBudget | None = None,
) -> list[torch.Tensor | imaging.ImageError]:
    """decode_jpegs_of's part for one request, completed: what nvJPEG did not take (or refused) is
    decoded on the CPU, which also produces the user-facing errors, and copied to `device`."""
    out: list[torch.Tensor | imaging.ImageError] = []
    for i, item in enumerate(part):
        if isinstance(item, torch.Tensor):
            out.append(item)
        else:  # None: not for nvJPEG; False: nvJPEG refused it (its pixels are already counted)
            out.append(_cpu_decode(blobs[i], pp, device, max_pixels, budget if item is None else None))
    return out


def _chunks(sizes: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """[lo, hi) index ranges whose sizes add up to at most `limit` (an oversized item goes alone)."""
    ranges: list[tuple[int, int]] = []
    lo, total = 0, 0
    for i, size in enumerate(sizes):
        if i > lo and total + size > limit:
            ranges.append((lo, i))
            lo, total = i, 0
        total += size
    if lo < len(sizes):
        ranges.append((lo, len(sizes)))
    return ranges


def _decode_jpegs(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Batched decode to [3, H, W] uint8 on `device`; None where an image failed."""
    if not blobs:
        return []
    # bytearray: torch.frombuffer wants a writable buffer; the copy is small next to the decode.
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except Exception as exc:  # RuntimeError from nvJPEG's checks; be broad: it is only a retry
        # One bad file fails the whole batch: find it by decoding one at a time.
        log.debug("batched JPEG decode failed (%s); decoding one by one", exc)
    single: list[torch.Tensor | None] = []
    for d in data:
        try:
            single.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except Exception:
            single.append(None)
    return single


def _cpu_decode(
    data: bytes,
    pp: Preprocessing,
    device: torch.device,
    max_pixels: int | None,
    budget: imaging.RequestBudget | None,
) -> torch.Tensor | imaging.ImageError:
    try:
        pixels = imaging.decode(data, pp, max_pixels, budget)
    except imaging.ImageError as exc:
        return exc
    return to_device(host_tensor(pixels), device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to `device` without waiting: a copy from pageable memory would wait for the whole CUDA
    stream -- behind the forward pass in flight -- while one from pinned memory is queued."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a CPU tensor, copied only when torch cannot share it (read-only, strided)."""
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, order="C")
    return torch.from_numpy(array)


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # Pillow's (and PyTorch's antialias) cubic
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


FILTERS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "bilinear": (_bilinear, 1.0),
    "bicubic": (_bicubic, 2.0),
}


@functools.lru_cache(maxsize=256)
def coefficients(in_size: int, in0: float, in1: float, out_size: int, interpolation: str) -> tuple[int, np.ndarray]:
    """Pillow's resampling weights for source span [in0, in1) -> out_size pixels, with antialiasing.

    Returns (first source index, float32 [out_size, span]): output = weights @ source[first:first + span].
    """
    kernel, support = FILTERS[interpolation]
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    centers = in0 + (np.arange(out_size) + 0.5) * scale
    lo = np.maximum(np.floor(centers - support + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.floor(centers + support + 0.5), in_size).astype(np.int64)
    first, last = int(lo.min()), int(hi.max())
    x = np.arange(first, last)
    w = kernel((x[None, :] - centers[:, None] + 0.5) / filterscale)
    w[(x[None, :] < lo[:, None]) | (x[None, :] >= hi[:, None])] = 0.0
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    return first, w.astype(np.float32)


_device_coefficients: dict[tuple, tuple[int, torch.Tensor]] = {}
_device_coefficients_lock = threading.Lock()  # decode threads share the cache
_DEVICE_CACHE_SIZE = 128


def _weights_on(device: torch.device, *key: object) -> tuple[int, torch.Tensor]:
    """coefficients() as a tensor on `device`, cached: photos come in a few common sizes."""
    full_key = (str(device), *key)
    hit = _device_coefficients.get(full_key)
    if hit is None:
        first, w = coefficients(*key)  # type: ignore[arg-type]
        weights = to_device(torch.from_numpy(w), device)
        if device.type == "cuda":
            # Other decode threads use the cached tensor on their own streams: the copy must be done.
            torch.cuda.current_stream(device).synchronize()
        hit = (first, weights)
        with _device_coefficients_lock:
            if len(_device_coefficients) >= _DEVICE_CACHE_SIZE:
                _device_coefficients.pop(next(iter(_device_coefficients)))
            _device_coefficients[full_key] = hit
    return hit


def resize_crop(images: Sequence[torch.Tensor], pp: Preprocessing) -> list[torch.Tensor]:
    """uint8 [3, H, W] images of one size -> uint8 [S, S, 3] each: imaging.crop_box resampled to
    input_size, as Pillow does.

    Returns channels-last views (no copy): the runner's stack into the batch makes them contiguous.
    """
    _, height, width = images[0].shape
    left, top, right, bottom = imaging.crop_box(width, height, pp)
    size = pp.input_size
    x0, wx = _weights_on(images[0].device, width, left, right, size, pp.interpolation)
    y0, wy = _weights_on(images[0].device, height, top, bottom, size, pp.interpolation)
    ys, xs = slice(y0, y0 + wy.shape[1]), slice(x0, x0 + wx.shape[1])
    src = torch.stack([img[:, ys, xs] for img in images]).float()  # [B, 3, span_y, span_x]
    # Horizontal pass first, stored as bytes in between, as Pillow's 8-bit path does.
    rows = torch.matmul(src, wx.T).round_().clamp_(0, 255)  # [B, 3, span_y, S]
    out = torch.matmul(wy, rows).round_().clamp_(0, 255)  # [B, 3, S, S]
    return list(out.to(torch.uint8).permute(0, 2, 3, 1).unbind(0))
