"""Triton's model repository extension: the index, and loading and unloading models without a restart.

`POST /v2/repository/index` lists every version the server holds (its state, and the reason a load
failed) and every version the repository has. All three routes need model_control explicit or poll
(settings.py) and, whenever keys are set, an admin key (middlewares/auth.py). A load answers once the
version serves (or failed to load, while the version before it goes on serving); an unload once the
model's requests have finished and its memory is freed (server/served.py). Under --workers both answer
once every worker has done the same (scale/workers/control.py), or fail naming the workers that did not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from saikyo.models.errors import ModelNotExported, RepositoryError, UnknownModel, VersionNotFound
from saikyo.models.repository import MAX_NAME_BYTES, MAX_VERSION_DIGITS, plain_name, version_number
from saikyo.server.errors import ApiError
from saikyo.server.pipeline import models_of
from saikyo.server.routes.v2 import openapi as doc
from saikyo.server.served import ModelState, ServedModel, ServedModels

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v2/repository", tags=["Model repository (Triton extension)"])

# Control bodies are a few bytes of JSON; anything larger is not one.
MAX_CONTROL_BODY_BYTES = 64 * 1024
# An unreachable repository must not hold the index up for botocore's whole retry schedule.
INDEX_LISTING_TIMEOUT_S = 5.0
_STATES = {ModelState.READY: "READY", ModelState.LOADING: "LOADING", ModelState.UNLOADING: "UNLOADING"}

ModelName = Annotated[str, Path(description="model name, as in the repository")]


async def _json_object(request: Request, what: str) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_CONTROL_BODY_BYTES:
        raise ApiError(413, f"{what} request body is over {MAX_CONTROL_BODY_BYTES} bytes")
    if not body.strip():
        return {}
    try:
        query = json.loads(body)
    except ValueError:  # not JSON, not UTF-8, or an integer past Python's 4,300 digits
        raise ApiError(400, f"{what} request body must be a JSON object") from None
    if not isinstance(query, dict):
        raise ApiError(400, f"{what} request body must be a JSON object")
    return query


def _parameters(query: dict[str, Any], allowed: set[str], what: str) -> dict[str, Any]:
    params = query.get("parameters", {})
    if not isinstance(params, dict):
        raise ApiError(400, f"{what}: 'parameters' must be a JSON object")
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ApiError(400, f"{what}: unsupported parameter(s) {unknown}; supported: {sorted(allowed)}")
    return params


@router.post(
    "/index",
    summary="Every version the server holds, with its state, and every version in the repository",
    description=(
        'Optional JSON body `{"ready": true}` lists only the versions ready for inference. Versions the '
        "repository has and the server does not hold appear without a state, as in Triton."
    ),
    openapi_extra=doc.REPOSITORY_INDEX_BODY,
    responses=doc.REPOSITORY_INDEX,
)
async def repository_index(request: Request) -> JSONResponse:
    _control_on(request)
    only_ready = (await _json_object(request, "repository index")).get("ready", False)
    if not isinstance(only_ready, bool):
        raise ApiError(400, "'ready' must be true or false")
    models = models_of(request)
    rows = [index_row(m) for m in models.held() if m.ready or not only_ready]
    headers = {}
    if not only_ready:
        not_held, age = await _not_held(models, {(r["name"], r["version"]) for r in rows})
        rows += not_held
        if age is not None:  # the store did not answer in time: its last good listing, this old
            headers["Age"] = str(int(age))
    return JSONResponse(sorted(rows, key=lambda r: (r["name"], int(r["version"] or 0))), headers=headers)


def index_row(model: ServedModel) -> dict[str, str]:
    """A version as the index (and the list of served models) shows it."""
    reason = model.error or ("unloaded" if model.state is ModelState.UNLOADED else "")
    version = str(model.version) if model.version is not None else ""
    return {"name": model.name, "version": version, "state": _STATES.get(model.state, "UNAVAILABLE"), "reason": reason}


async def _not_held(models: ServedModels, held: set[tuple[str, str]]) -> tuple[list[dict[str, str]], float | None]:
    """The repository's versions the server does not hold, listed afresh, and None; when the store does
    not answer in time, those of its last good listing and that listing's age in seconds. When it was
    never listed the index still answers, with what the server holds."""
    try:
        listing, age = await models.repository_io.listing(INDEX_LISTING_TIMEOUT_S)
    except (RepositoryError, asyncio.TimeoutError) as exc:
        log.warning("repository index: listing %s: %s", models.repository.location, exc or "timed out")
        return [], None
    if age is not None:
        log.warning("repository index: %s did not answer in time; its listing of %.0f s ago", models.repository.location, age)
    rows = [{"name": v.name, "version": str(v.number)} for v in listing if (v.name, str(v.number)) not in held]
    return rows, age


def _control_on(request: Request) -> ServedModels:
    models = models_of(request)
    if models.settings.model_control == "none":
        raise ApiError(
            400, "model control is off on this server: start it with --model-control explicit (or poll) to load and unload models"
        )
    return models


async def _every_worker(request: Request, name: str, model: ServedModel | None) -> None:
    """Under --workers: what this worker just did, done by every worker, or a 503 naming those that did not."""
    control = request.app.state.worker_control
    if control is None:
        return
    behind = await control.publish(name, model)
    if behind:
        what = f"loaded version {model.version} of" if model is not None else "unloaded"
        raise ApiError(
            503,
            f"this worker {what} {name!r}; not every worker has: {', '.join(sorted(behind))}",
            {"workers": behind},
            headers={"Retry-After": "5"},
        )


def _control(request: Request, name: str) -> ServedModels:
    models = _control_on(request)
    if not plain_name(name):
        shown = name if len(name) <= 80 else f"{name[:80]}..."
        raise ApiError(400, f"{shown!r} is not a model name", {"max_bytes": MAX_NAME_BYTES})
    return models


@router.post(
    "/models/{model_name}/load",
    summary="Load a model (its latest version, or parameters.version); answers once it serves",
    description=(
        'Optional JSON body `{"parameters": {"version": "2"}}` picks a version (default: the latest in the '
        "repository). The version serving now keeps answering until the new one has loaded and passed "
        "its warm-up; then requests go to the new one and the old one is unloaded. A version that fails "
        "to load is a 400 with the reason (also in the index), and the old one goes on serving."
    ),
    openapi_extra=doc.LOAD_BODY,
    responses=doc.LOAD,
)
async def load(request: Request, model_name: ModelName) -> JSONResponse:
    models = _control(request, model_name)
    params = _parameters(await _json_object(request, "load"), {"version"}, "load")
    version = params.get("version")
    if version is not None:
        number = None if isinstance(version, bool) else version_number(str(version))
        if number is None:
            shown = str(version) if len(str(version)) <= 40 else f"{str(version)[:40]}..."
            raise ApiError(400, f"load: 'version' must be a positive integer of at most {MAX_VERSION_DIGITS} digits, not {shown!r}")
        version = number
    try:
        model = await models.load(model_name, version)
    except VersionNotFound as exc:
        raise ApiError(404, f"model {model_name!r} has no version {exc.version} in the repository; versions: {exc.versions}") from None
    except ModelNotExported:
        raise ApiError(404, f"model {model_name!r} is not in the model repository") from None
    except RepositoryError as exc:
        raise ApiError(503, f"the model repository cannot be read: {models.redact(str(exc))}", headers={"Retry-After": "5"}) from None
    if not model.ready:
        serving = models.find(model_name)
        still = f"; version {serving.version} still serves" if serving is not None and serving.ready else ""
        raise ApiError(400, f"model {model_name!r} version {model.version} failed to load{still}", {"reason": model.error})
    await _every_worker(request, model_name, model)
    return JSONResponse({"name": model.name, "version": str(model.version), "state": "READY"})


@router.post(
    "/models/{model_name}/unload",
    summary="Unload a model: every version; answers once its requests have finished and its memory is freed",
    openapi_extra=doc.UNLOAD_BODY,
    responses=doc.UNLOAD,
)
async def unload(request: Request, model_name: ModelName) -> JSONResponse:
    models = _control(request, model_name)
    # Triton's unload_dependents is about ensembles, which saikyo has not: accepted, nothing to do.
    _parameters(await _json_object(request, "unload"), {"unload_dependents"}, "unload")
    try:
        model = await models.unload(model_name)
    except UnknownModel:
        raise ApiError(404, f"model {model_name!r} is not loaded", {"models": list(models.models)}) from None
    await _every_worker(request, model_name, None)
    return JSONResponse({"name": model.name, "version": index_row(model)["version"], "state": "UNAVAILABLE", "reason": "unloaded"})
