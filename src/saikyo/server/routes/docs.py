"""GET /docs served entirely from this server: FastAPI's default Swagger UI page loads its script and
style from a CDN, which a machine without internet (or a strict network policy) cannot reach. The assets
come from the `swagger-ui-py` package (Swagger UI 5, which renders OpenAPI 3.1)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from saikyo.server.path_groups import endpoint_group
from saikyo.server.errors import ERROR_SCHEMA, ApiError

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
ASSETS_PATH = "/docs/assets"

router = APIRouter(include_in_schema=False)


def swagger_ui_dir() -> Path:
    # find_spec, not import: the package's own modules (framework adapters) are not needed.
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is missing; install saikyo's dependencies")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API docs",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
    )


@router.get(ASSETS_PATH + "/{name}")
async def swagger_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, f"no docs asset {name!r}")
    return FileResponse(swagger_ui_dir() / name, media_type=media_type, headers={"Cache-Control": "max-age=86400"})


def install(app: FastAPI, public: Iterable[str] | None = None) -> None:
    """Serve /docs offline, and make the schema say what the server does. `public`: None when no API
    keys are configured, else the endpoint groups left open (see auth.py)."""
    app.include_router(router)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _drop_unused_validation_responses(schema)
            if public is not None:
                _declare_bearer_keys(schema, frozenset(public))
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_unused_validation_responses(schema: dict[str, Any]) -> None:
    """FastAPI documents 422 for every route with parameters; this server answers validation errors with
    400 (see errors.py), so the 422 entries and their schemas would be wrong."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    if "components" in schema and not components:
        schema["components"].pop("schemas", None)
        if not schema["components"]:
            del schema["components"]


BEARER = "bearerAuth"


def _declare_bearer_keys(schema: dict[str, Any], public: frozenset[str]) -> None:
    """With API keys on, every operation outside the open groups needs `Authorization: Bearer <key>`:
    say so, so that clients generated from the schema send it and /docs offers an Authorize button."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from SAIKYO_API_KEYS or the API keys file.",
    }
    refused = {
        "description": "missing, malformed or unknown API key (the WWW-Authenticate header says which)",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": {"application/json": {"schema": ERROR_SCHEMA}},
    }
    for path, operations in schema.get("paths", {}).items():
        if endpoint_group(path) in public:
            continue
        for operation in operations.values():
            if isinstance(operation, dict):
                operation["security"] = [{BEARER: []}]
                operation.setdefault("responses", {})["401"] = refused
