"""One request pipeline; /classify and v2 infer are adapters of their wire formats over it.

    read     (the adapter: body -> Images or Tensor, checked against the limits; no model held yet)
    pick     hold the model version only now, so a slow upload holds no version that may be retiring
    decode   per request, in the decode pool or on the runner's device, under the pixel budget and deadline
    batch    the model's DynamicBatcher: images of many requests in one forward pass on the runner thread
    encode   (the adapter: top-k JSON, or v2 tensors), class names from `class_names`

Each step maps its failures onto the HTTP error a client should see (400, 404, 413, 503, 504).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request

from saikyo.inference import imaging
from saikyo.models.repository import version_number
from saikyo.inference.batching import BatcherClosed, BatcherFailed, BatchFailed, DeadlineExceeded, DynamicBatcher, QueueFull
from saikyo.server import deadline as deadlines
from saikyo.server.errors import ApiError, ClientGone
from saikyo.runtime.base import device_decoder
from saikyo.server.served import ModelState, ServedModel, ServedModels


# ---- read: what an adapter hands the pipeline ----
@dataclass(frozen=True)
class Images:
    """Encoded images from one request, with the names its errors use ("image 0 ('cat.jpg')")."""

    blobs: list[bytes]
    names: list[str]


@dataclass(frozen=True)
class Tensor:
    """A preprocessed, normalised float32 batch [N, 3, H, W], named as the client named it."""

    name: str
    batch: np.ndarray


def too_many_images(limit: int, count: int | None = None) -> ApiError:
    got = f": {count}" if count is not None else ""
    return ApiError(413, f"too many images{got}; the limit is {limit} per request (setting max_images_per_request)")


def check_image_count(count: int, limit: int) -> None:
    if count > limit:
        raise too_many_images(limit, count)


def check_image_size(index: int, name: str, size: int, limit: int) -> None:
    if size > limit:
        raise ApiError(413, f"image {index} ({name!r}) is {size} bytes; the limit is {limit} (setting max_image_bytes)")


# ---- pick ----
def models_of(request: Request) -> ServedModels:
    return request.app.state.models


def known_model(models: ServedModels, name: str, version: str | None = None) -> ServedModel:
    """The model (and version: a loaded one, as "2"; None = the one serving) a request names, in whatever
    state it is; else 404."""
    model: ServedModel | None = None
    if version is None:
        model = models.find(name)
    elif (number := version_number(version)) is not None:
        model = models.find(name, number)
    if model is None or model.state in (ModelState.UNLOADING, ModelState.UNLOADED):
        if version is not None and (name in models.models or name in models.versions):
            loaded = [str(v) for v in models.loaded_versions(name)]
            raise ApiError(404, f"model {name!r} has no loaded version {version!r}; loaded: {loaded}")
        raise ApiError(404, f"unknown model {name!r}", {"models": list(models.models)})
    return model


def ready_model(models: ServedModels, name: str | None, version: str | None = None) -> ServedModel:
    """The model a request names (or the default), ready to serve; else 404 or 503."""
    name = name or models.settings.default_model
    model = known_model(models, name, version)
    if model.state is ModelState.LOADING:
        raise ApiError(503, f"model {name!r} is still loading", headers={"Retry-After": "2"})
    if model.state is ModelState.FAILED:
        raise ApiError(503, f"model {name!r} is not available: {model.error}", {"reason": model.error})
    return model


@contextlib.contextmanager
def held(models: ServedModels, name: str | None, version: str | None = None) -> Iterator[ServedModel]:
    """ready_model(), held for the request's inference: a version being replaced or unloaded closes
    only after the requests holding it have their results (served.py). Pick it once the body is read."""
    with ready_model(models, name, version).hold() as model:
        yield model


# ---- the sequence ----
@dataclass(frozen=True)
class Prediction:
    model: ServedModel  # the version that answered (released: its name and version stay readable)
    probs: np.ndarray  # [N, classes]


async def predict(
    request: Request,
    name: str | None,
    version: str | None,
    inputs: Images | Tensor,
    timer: Timer,
    deadline: float | None = None,
) -> Prediction:
    """pick -> decode -> batch for what an adapter has read; `deadline` (monotonic seconds) as run_batch."""
    models = models_of(request)
    with held(models, name, version) as model:
        if isinstance(inputs, Images):
            pixels = await decode_or_400(models, model, inputs, request)
            timer.mark("decode")
            probs = await run_batch(_batcher(model.image_batcher), pixels, deadline)
        else:
            _check_tensor_shape(model, inputs)
            probs = await run_batch(_batcher(model.tensor_batcher), list(inputs.batch), deadline)
        timer.mark("infer")
    return Prediction(model, probs)


def _batcher(batcher: DynamicBatcher | None) -> DynamicBatcher:
    if batcher is None:  # a READY model has both; a version that closed meanwhile has none
        raise ApiError(503, "model not available: it was unloaded", headers={"Retry-After": "1"})
    return batcher


def _check_tensor_shape(model: ServedModel, tensor: Tensor) -> None:
    assert model.runner is not None
    size = model.runner.preprocessing.input_size
    shape = list(tensor.batch.shape)
    if shape[1:] != [3, size, size]:
        raise ApiError(
            400, f"input {tensor.name!r} of model {model.name!r} must have shape [N, 3, {size}, {size}], not {shape}"
        )


# ---- encode ----
def class_names(model: ServedModel) -> Callable[[int], str] | None:
    """How the answers name class `i` for this model, or None when it has no names: its own labels
    (ImageNet's for a zoo model, the user's for an import, server/served.py). The one place both APIs
    take labels from."""
    return model.labels.__getitem__ if model.labels is not None else None


async def run_batch(
    batcher: DynamicBatcher, items: Sequence[np.ndarray], deadline: float | None = None
) -> np.ndarray:
    """Submit to the batcher, mapping its failures onto HTTP statuses.

    The request's deadline (X-Request-Timeout-Ms or the server default) applies too; with an explicit
    `deadline` (monotonic seconds, e.g. the v2 `timeout` parameter) the earlier of the two wins.
    """
    check_deadline("inference")
    request_deadline = deadlines.current.get()
    if request_deadline is not None:
        deadline = request_deadline.at if deadline is None else min(deadline, request_deadline.at)
    try:
        return await batcher.submit(items, deadline)
    except QueueFull as exc:
        raise ApiError(
            503,
            "server overloaded: the model's queue is full, retry later",
            {"queued_images": exc.pending, "limit": exc.limit},
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    except DeadlineExceeded:
        raise _deadline_error("inference") from None
    except BatchFailed:
        raise ApiError(500, "inference failed for the batch holding this request") from None
    except BatcherClosed:
        raise ApiError(503, "server is shutting down", headers={"Retry-After": "1"}) from None
    except BatcherFailed as exc:
        raise ApiError(503, f"model not available: {exc}", {"reason": str(exc)}) from None


async def decode(
    models: ServedModels, model: ServedModel, blobs: Sequence[bytes], budget: imaging.RequestBudget
) -> list[Any]:
    """Decode every blob into an item for `model.image_batcher`; a failure is returned in place (an
    ImageError) so the caller can name the file. The request's `budget` stops it as a whole.

    Items are uint8 HWC arrays, or -- for a runner that decodes on its device -- whatever its
    decode_images returns: one call per request, so that nvJPEG decodes the request's images as a batch.
    """
    assert model.runner is not None
    pp = model.runner.preprocessing
    limit = models.settings.max_image_pixels
    loop = asyncio.get_running_loop()
    decoder = device_decoder(model.runner)
    if decoder is not None:
        return await loop.run_in_executor(models.decode_pool, decoder.decode_images, blobs, limit, budget)

    def one(data: bytes) -> np.ndarray | imaging.ImageError:
        try:
            return imaging.decode(data, pp, limit, budget)
        except imaging.ImageError as exc:
            return exc

    futures = [loop.run_in_executor(models.decode_pool, one, b) for b in blobs]
    try:
        return list(await asyncio.gather(*futures))
    finally:
        for f in futures:  # after a failure, images still waiting for a thread are not decoded
            f.cancel()


async def decode_or_400(models: ServedModels, model: ServedModel, images: Images, request: Request) -> list[Any]:
    """decode(), with the first unusable image answered as a 400 that names every bad file, a request
    over its pixel budget as a 413, and one whose deadline passed meanwhile as a 504."""
    check_deadline("decoding")
    request_deadline = deadlines.current.get()
    budget = imaging.RequestBudget(models.settings.max_request_pixels, request_deadline.at if request_deadline else None)
    try:
        async with _watch_client(request, budget):
            decoded = await decode(models, model, images.blobs, budget)
    except imaging.BudgetExceeded as exc:
        raise ApiError(
            413,
            f"the request's images hold more than {exc.limit} pixels in all (setting max_request_pixels)",
            {"limit_pixels": exc.limit, "setting": "max_request_pixels"},
        ) from None
    except imaging.DecodeAbandoned:
        if budget.abandoned.is_set():
            raise ClientGone() from None
        raise _deadline_error("inference") from None
    bad = [
        {"index": i, "filename": images.names[i], "reason": str(r)}
        for i, r in enumerate(decoded)
        if isinstance(r, imaging.ImageError)
    ]
    if bad:
        first = bad[0]
        raise ApiError(400, f"image {first['index']} ({first['filename']!r}) is not usable: {first['reason']}", bad)
    return decoded


@contextlib.asynccontextmanager
async def _watch_client(request: Request, budget: imaging.RequestBudget) -> AsyncIterator[None]:
    """While the block runs, mark `budget` abandoned as soon as the client disconnects.

    The body has been read, so the next ASGI message is the disconnect (or nothing, until the answer).
    """

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                budget.abandoned.set()
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


def _deadline_error(phase: str) -> ApiError:
    d = deadlines.current.get()
    budget = f"{d.budget_ms:g} ms " if d is not None else ""
    return ApiError(
        504,
        f"deadline of {budget}exceeded before {phase} started",
        {"timeout_ms": d.budget_ms if d is not None else None, "header": deadlines.HEADER},
    )


def check_deadline(phase: str) -> None:
    """504 now if the request's deadline has passed: its remaining work is never done."""
    d = deadlines.current.get()
    if d is not None and d.expired():
        raise _deadline_error(phase)


class Timer:
    """Collects phase durations for the Server-Timing header (what the demo page shows)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = (now - self._last) * 1000
        self._last = now

    def header(self) -> dict[str, Any]:
        return {"Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in self.phases.items())}
