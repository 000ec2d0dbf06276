"""Open Inference Protocol v2 (KServe / Triton HTTP) routes.

`/versions/{v}` reaches any loaded version of a model wherever the protocol allows the segment; without
it a request gets the version that serves (the latest loaded). Triton's model repository extension
(index, load, unload) is in routes/v2/repository.py. A model takes exactly one of two inputs:
- `images`  BYTES [-1]         encoded images (JPEG, PNG, WebP, BMP, GIF), decoded and preprocessed here,
                               as binary data or, in JSON, as base64 strings;
- `input`   FP32  [-1,3,H,W]   an already preprocessed, normalised tensor;
and has one output, `probabilities` FP32 [-1, classes]. Both inputs go through the model's
DynamicBatchers, shared with /classify.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import time
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response

from saikyo import __version__
from saikyo.server.errors import ApiError
from saikyo.server.routes.v2.repository import index_row
from saikyo.server.pipeline import (
    Images, Tensor, Timer, check_image_count, check_image_size, class_names, known_model, models_of, predict,
    ready_model,
)
from saikyo.server.routes.v2 import openapi as doc
from saikyo.server.routes.v2 import protocol as wire
from saikyo.server.served import ServedModel, ServedModels
from saikyo.settings import Settings

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

EXTENSIONS = ["classification", "binary_tensor_data"]
# Advertised when load and unload work, i.e. with model_control explicit or poll.
MODEL_REPOSITORY = "model_repository"
IMAGES = "images"
TENSOR = "input"
OUTPUT = "probabilities"
PLATFORMS = {"onnxruntime": "onnxruntime_onnx"}
# Compressing small bodies costs more than it saves.
COMPRESS_MIN_BYTES = 1024

ModelName = Annotated[str, Path(description="model name, as in GET /v2/repository/index")]
ModelVersion = Annotated[str, Path(description="a loaded version of the model, e.g. \"2\"")]


# ---- health and metadata ----
@router.get(
    "/health/live", summary="Liveness: 200 while the process serves HTTP", responses=doc.LIVE, response_class=Response
)
async def live() -> Response:
    return Response(status_code=200)


@router.get(
    "/health/ready",
    summary="Readiness: 200 once every model loaded and passed warm-up, else 400",
    responses=doc.READY,
    response_class=Response,
)
async def ready(request: Request) -> Response:
    models = models_of(request)
    if models.ready:
        others = request.app.state.workers_not_ready
        waiting = others() if others is not None else {}
        if not waiting:
            return Response(status_code=200)
        return JSONResponse({"error": "not ready: waiting for other workers", "detail": {"workers": waiting}}, status_code=400)
    # The v2 spec: a 4xx status means "false".
    states = {name: m.state.value for name, m in models.models.items()}
    if models.draining:
        return JSONResponse({"error": "not ready: shutting down", "detail": states}, status_code=400)
    return JSONResponse({"error": "not ready", "detail": states}, status_code=400)


@router.get("", summary="Server metadata: name, version, protocol extensions", responses=doc.SERVER_METADATA)
async def server_metadata(request: Request) -> JSONResponse:
    control = request.app.state.settings.model_control != "none"
    return JSONResponse({"name": "saikyo", "version": __version__, "extensions": EXTENSIONS + [MODEL_REPOSITORY] * control})


@router.get(
    "/models",
    summary="The models this server serves, with their state",
    description=(
        "What clients (and the demo page) may ask for: one row per served model, the version taking its "
        "requests. It needs a client key where keys are set; the repository index, which also lists what "
        "the server does not hold, is model control's (admin keys)."
    ),
    responses=doc.SERVED_MODELS,
)
async def served_models(request: Request) -> JSONResponse:
    models = models_of(request)
    return JSONResponse([index_row(m) for m in sorted(models.models.values(), key=lambda m: m.name)])


@router.get("/models/{model_name}", summary="Model metadata: inputs and outputs", responses=doc.MODEL_METADATA)
async def model_metadata(request: Request, model_name: ModelName) -> JSONResponse:
    models = models_of(request)
    return JSONResponse(metadata(ready_model(models, model_name), models))


@router.get(
    "/models/{model_name}/versions/{model_version}",
    summary="Model metadata, for one version",
    responses=doc.MODEL_METADATA,
)
async def model_version_metadata(request: Request, model_name: ModelName, model_version: ModelVersion) -> JSONResponse:
    models = models_of(request)
    return JSONResponse(metadata(ready_model(models, model_name, model_version), models))


def version_of(model: ServedModel) -> str:
    return str(model.version or 1)


def metadata(model: ServedModel, models: ServedModels) -> dict[str, Any]:
    runner = model.runner
    assert runner is not None
    size = runner.preprocessing.input_size
    backend = str(runner.meta.get("backend", "onnxruntime"))
    parameters = {
        key: runner.meta[key]
        for key in ("family", "weights", "backend", "device", "precision", "input_size", "intra_op_threads",
                    "gpu", "in_flight", "cuda_graphs", "cuda_mps", "tuning")  # fmt: skip
        if isinstance(runner.meta.get(key), (str, int))
    }
    # What one serving process runs with (under --workers: the worker that answers; they are alike).
    settings = models.settings
    workers = int(settings.workers) if settings.workers.isdigit() else settings.workers
    parameters.update(decode_threads=settings.resolved_decode_threads(), workers=workers)
    parameters["labels"] = _labels_said(model)
    return {
        "name": model.name,
        "versions": [str(v) for v in models.loaded_versions(model.name)] or [version_of(model)],
        "platform": PLATFORMS.get(backend, backend),
        "inputs": [
            {"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR, "datatype": "FP32", "shape": [-1, 3, size, size]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, runner.num_classes]}],
        "parameters": parameters,
        # Where each serving value came from: the version's own block or the server's setting.
        "serving": model.config.to_dict() if model.config is not None else {},
    }


def _labels_said(served: ServedModel) -> str:
    """What /classify?labels=true and the classification extension name classes with."""
    labels = served.labels
    if labels is None:
        return "none: this model has no labels, answers carry class indices only"
    own = served.meta.get("labels")
    return f"{own} ({len(labels)} classes)" if isinstance(own, str) else f"ImageNet ({len(labels)} classes)"


@router.get(
    "/models/{model_name}/ready",
    summary="Model readiness: 200 ready, 400 not (yet)",
    responses=doc.MODEL_READY,
    response_class=Response,
)
async def model_ready(request: Request, model_name: ModelName) -> Response:
    return _readiness(models_of(request), model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    summary="Model readiness, for one version",
    responses=doc.MODEL_READY,
    response_class=Response,
)
async def model_version_ready(request: Request, model_name: ModelName, model_version: ModelVersion) -> Response:
    return _readiness(models_of(request), model_name, model_version)


def _readiness(models: ServedModels, model_name: str, model_version: str | None) -> Response:
    model = known_model(models, model_name, model_version)
    if model.ready:
        return Response(status_code=200)
    reason = f": {model.error}" if model.error else ""
    return JSONResponse({"error": f"model {model_name!r} is not ready ({model.state.value}){reason}"}, status_code=400)


# ---- inference ----
@router.post(
    "/models/{model_name}/infer",
    summary="Inference: encoded images (BYTES) or a preprocessed tensor (FP32) -> class probabilities",
    description=doc.INFER_DESCRIPTION,
    openapi_extra=doc.INFER_BODY,
    responses=doc.INFER_RESPONSES,
)
async def infer(request: Request, model_name: ModelName) -> Response:
    return await _infer(request, model_name, None)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    summary="Inference, for one version",
    description=doc.INFER_DESCRIPTION,
    openapi_extra=doc.INFER_BODY,
    responses=doc.INFER_RESPONSES,
)
async def infer_version(request: Request, model_name: ModelName, model_version: ModelVersion) -> Response:
    return await _infer(request, model_name, model_version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    models = models_of(request)
    ready_model(models, name, version)  # an unknown or unready model is refused before its body is read
    settings = models.settings
    timer = Timer()
    body = await request.body()  # LimitsMiddleware has capped its size
    # Decompressing and parsing cost grows with the body: off the event loop, so probes and other
    # requests keep being answered meanwhile.
    parsed = await asyncio.to_thread(
        _read, body, request.headers.get("content-encoding"), request.headers.get(wire.HEADER_LENGTH), name, settings
    )
    del body
    deadline = time.monotonic() + parsed.timeout_us / 1e6 if parsed.timeout_us else None
    timer.mark("read")

    answer = await predict(request, name, version, parsed.inputs, timer, deadline)
    probs = answer.probs
    if not np.isfinite(probs).all():
        raise ApiError(400, "the input drives the network out of float range; send a normalised tensor")
    outputs = [_output(spec, answer.model, probs) for spec in parsed.outputs]
    accept = request.headers.get("accept-encoding", "")
    return await asyncio.to_thread(_respond, answer.model.name, version_of(answer.model), parsed.id, outputs, timer, accept)


@dataclass
class _Parsed:
    """A v2 request read and checked: its one input, as images or as an FP32 batch."""

    id: str | None
    outputs: list[wire.RequestedOutput]
    timeout_us: int | None
    inputs: Images | Tensor


def _read(body: bytes, encoding: str | None, header_length: str | None, name: str, settings: Settings) -> _Parsed:
    """Body -> a checked request (in a worker thread). Every malformed request is an ApiError naming the field.
    Only what needs no model is checked here: the model is picked once the body is read."""
    try:
        body = wire.decompress(body, encoding, settings.max_decompressed_bytes)
        req = wire.parse_request(body, header_length, settings.max_json_bytes)
        outputs, timeout_us = _requested_outputs(req), req.timeout_us
    except wire.TooLarge as exc:
        raise ApiError(413, str(exc)) from None
    except wire.ProtocolError as exc:
        raise ApiError(400, str(exc)) from None
    if len(req.inputs) != 1:
        names = [t.name for t in req.inputs]
        raise ApiError(400, f"supply exactly one input, {IMAGES!r} or {TENSOR!r}; got {names}")
    tensor = req.inputs[0]
    inputs: Images | Tensor
    if tensor.name == IMAGES:
        inputs = _images(tensor, settings.max_images_per_request, settings.max_image_bytes)
    elif tensor.name == TENSOR:
        inputs = Tensor(TENSOR, _fp32_batch(tensor, name, settings.max_images_per_request))
    else:
        raise ApiError(400, f"unknown input {tensor.name!r}; model {name!r} takes {IMAGES!r} (BYTES) or {TENSOR!r} (FP32)")
    return _Parsed(req.id, outputs, timeout_us, inputs)


def _respond(
    model: str, version: str, request_id: str | None, outputs: list[wire.OutputTensor], timer: Timer, accept: str
) -> Response:
    payload, headers = wire.encode_response(model, version, request_id, outputs)
    headers.update(timer.header())
    return _maybe_compressed(payload, headers, accept)


def _requested_outputs(req: wire.InferenceRequest) -> list[wire.RequestedOutput]:
    if req.outputs is None:
        return [wire.RequestedOutput(OUTPUT, req.binary_output, 0)]
    for out in req.outputs:
        if out.name != OUTPUT:
            raise wire.ProtocolError(f"unknown output {out.name!r}; the model's output is {OUTPUT!r}")
    return req.outputs


def _images(tensor: wire.InputTensor, max_images: int, max_image_bytes: int) -> Images:
    if tensor.datatype != "BYTES":
        raise ApiError(400, f"input {IMAGES!r} must have datatype BYTES, not {tensor.datatype!r}")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise ApiError(400, f"input {IMAGES!r} must have shape [N] or [N, 1] with N >= 1, not {shape}")
    check_image_count(shape[0], max_images)  # before decoding base64: it bounds the work
    try:
        blobs = wire.bytes_elements(tensor, _base64_image)
    except wire.ProtocolError as exc:
        raise ApiError(400, str(exc)) from None
    names = [f"{IMAGES}[{i}]" for i in range(len(blobs))]
    for i, blob in enumerate(blobs):
        check_image_size(i, names[i], len(blob), max_image_bytes)
    return Images(blobs, names)


def _base64_image(value: Any, i: int) -> bytes:
    """JSON can't carry raw bytes: an image in JSON data is base64 (a data: URL prefix is allowed)."""
    if not isinstance(value, str):
        raise wire.ProtocolError(f"{IMAGES}[{i}] must be a base64 string in JSON data")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise wire.ProtocolError(
            f"{IMAGES}[{i}] is not valid base64; in JSON, images are base64 strings "
            "(or send them as binary data with the Inference-Header-Content-Length header)"
        ) from None


def _fp32_batch(tensor: wire.InputTensor, name: str, max_images: int) -> np.ndarray:
    """The FP32 input as an array [N, 3, H, W]; H and W are checked against the model the pipeline picks."""
    if tensor.datatype != "FP32":
        raise ApiError(400, f"input {TENSOR!r} must have datatype FP32, not {tensor.datatype!r}")
    shape = list(tensor.shape)
    if len(shape) != 4 or shape[1] != 3 or shape[0] < 1:
        raise ApiError(400, f"input {TENSOR!r} of model {name!r} must have shape [N, 3, H, W], not {shape}")
    check_image_count(shape[0], max_images)
    try:
        batch = wire.fp32_array(tensor)
    except wire.ProtocolError as exc:
        raise ApiError(400, str(exc)) from None
    if not np.isfinite(batch).all():
        raise ApiError(400, f"input {TENSOR!r} holds NaN or infinite values")
    return batch


def _output(spec: wire.RequestedOutput, model: ServedModel, probs: np.ndarray) -> wire.OutputTensor:
    n, classes = probs.shape
    if spec.classification:
        k = min(spec.classification, classes)
        label = class_names(model)
        strings = wire.classification_strings(probs, k, label)
        return wire.OutputTensor(spec.name, "BYTES", (n, k), strings=strings, binary=spec.binary)
    return wire.OutputTensor(spec.name, "FP32", (n, classes), array=probs, binary=spec.binary)


def _maybe_compressed(payload: bytes, headers: dict[str, str], accept: str) -> Response:
    """Honour Accept-Encoding gzip / deflate (tritonclient's response_compression_algorithm)."""
    wanted = _accepted_codings(accept)
    if len(payload) >= COMPRESS_MIN_BYTES:
        if "gzip" in wanted:
            payload = gzip.compress(payload, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        elif "deflate" in wanted:
            payload = zlib.compress(payload, 5)
            headers["Content-Encoding"] = "deflate"
    headers["Vary"] = "Accept-Encoding"
    media = headers.pop("Content-Type")
    return Response(payload, media_type=media, headers=headers)


def _accepted_codings(accept: str) -> set[str]:
    codings: set[str] = set()
    for part in accept.lower().split(","):
        coding, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if coding and q > 0:
            codings.add(coding)
    return codings
