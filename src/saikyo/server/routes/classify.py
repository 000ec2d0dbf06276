"""POST /classify: the 2018 contract, byte-compatible, plus model/topk/labels options."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from saikyo.inference.predictions import top_k
from saikyo.server.errors import ApiError, error_response
from saikyo.server.pipeline import (
    Images, Timer, check_image_count, check_image_size, class_names, models_of, predict, ready_model, too_many_images,
)
from saikyo.server.routes import multipart
from saikyo.settings import Settings

router = APIRouter()

FIELD = "images"
MAX_TEXT_FIELDS = 100  # other form fields tolerated beside the images

CLASSIFY_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {
                        FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more encoded images (JPEG, PNG, WebP, BMP, GIF)",
                        }
                    },
                },
                "encoding": {FIELD: {"contentType": "image/*, application/octet-stream"}},
            }
        },
    },
    "responses": {
        "200": {
            "description": "one object per image, in request order: class key -> probability, highest first",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "array",
                        "items": {"type": "object", "additionalProperties": {"type": "number"}},
                    },
                    "example": [{"282": 0.39, "285": 0.36, "281": 0.17, "287": 0.014, "904": 0.001}],
                }
            },
        },
        "400": error_response("no images field, or a file that is not a usable image"),
        "404": error_response("unknown model"),
        "413": error_response("body, image or image count over its limit"),
        "415": error_response("body is not multipart/form-data"),
        "503": error_response("overloaded or model not ready; see Retry-After"),
        "504": error_response("deadline passed before inference started"),
    },
}


def predictions_json(probs: np.ndarray, k: int, label: Callable[[int], str] | None) -> list[dict[str, float]]:
    """The 2018 shape: per image, the top k class keys ("282", or "282:tiger cat" with a label) -> probability."""
    idx, vals = top_k(probs, k)
    out: list[dict[str, float]] = []
    for row_i, row_v in zip(idx.tolist(), vals.tolist()):
        if label is not None:
            out.append({f"{i}:{label(i)}": v for i, v in zip(row_i, row_v)})
        else:
            out.append({str(i): v for i, v in zip(row_i, row_v)})
    return out


@router.post(
    "/classify",
    summary="Classify one or more images (the 2018 API)",
    description=(
        "Multipart upload, field `images`, one or more files. Returns one object per image in request "
        "order mapping the top-k class indices (strings) to probabilities, highest first. "
        "With `labels=true` keys read `\"<index>:<label>\"`, e.g. `\"282:tiger cat\"`, with the model's own "
        "labels (ImageNet's for the zoo); a model without labels keeps plain indices (GET /v2/models/{m} says so)."
    ),
    openapi_extra=CLASSIFY_OPENAPI,
    response_class=JSONResponse,
    responses={200: {"model": None}},
)
async def classify(
    request: Request,
    model: Annotated[str | None, Query(description="model name; default: the server's first model")] = None,
    topk: Annotated[int, Query(ge=1, le=1000, description="how many classes per image")] = 5,
    labels: Annotated[bool, Query(description="keys become `\"<index>:<label>\"`")] = False,
) -> JSONResponse:
    models = models_of(request)
    ready_model(models, model)  # an unknown or unready model is refused before its body is read
    timer = Timer()
    images = await _read(request, models.settings)
    timer.mark("read")
    answer = await predict(request, model, None, images, timer)
    probs = answer.probs
    label = class_names(answer.model) if labels else None
    return JSONResponse(predictions_json(probs, min(topk, probs.shape[1]), label), headers=timer.header())


async def _read(request: Request, settings: Settings) -> Images:
    """The multipart body -> the uploaded images, each checked against the limits."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, f"expected a multipart/form-data body with the field {FIELD!r}, got {content_type or 'none'!r}")
    max_images = settings.max_images_per_request
    try:
        boundary = multipart.boundary_of(content_type)
        # LimitsMiddleware caps the body's size (Content-Length and while streaming) before this reads it.
        body = await request.body()
        # Parsing cost grows with the body: off the event loop, so probes and other requests go on meanwhile.
        parts = await asyncio.to_thread(multipart.parse, body, boundary, max_images + MAX_TEXT_FIELDS)
        del body
    except multipart.TooManyParts as exc:
        if sum(p.name == FIELD for p in exc.parsed) > max_images:
            raise too_many_images(max_images) from None
        raise ApiError(400, f"too many text fields in the form: at most {MAX_TEXT_FIELDS}") from None
    except multipart.MultipartError as exc:
        raise ApiError(400, str(exc)) from None
    if sum(p.filename is None for p in parts) > MAX_TEXT_FIELDS:
        raise ApiError(400, f"too many text fields in the form: at most {MAX_TEXT_FIELDS}")
    uploads = [p for p in parts if p.name == FIELD]
    if not uploads:
        raise ApiError(400, f"no {FIELD!r} field in the form", {"fields": sorted({p.name for p in parts})})
    check_image_count(len(uploads), max_images)
    images = Images([], [])
    for i, up in enumerate(uploads):
        if up.filename is None:
            raise ApiError(400, f"form field {FIELD!r} item {i} is text, not a file upload")
        name = up.filename or f"image {i}"
        check_image_size(i, name, len(up.data), settings.max_image_bytes)
        images.blobs.append(up.data)
        images.names.append(name)
    return images
