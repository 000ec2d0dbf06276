"""The demo page at `/`: plain HTML, CSS and JavaScript from static/, nothing from a CDN.

The page lists models with POST /v2/repository/index (and their provenance with GET /v2/models/{m}),
and classifies each picked image with one POST /classify?labels=true.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(str(resources.files("saikyo.server").joinpath("static")))

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
