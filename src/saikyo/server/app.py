"""The app factory: one FastAPI app per Settings, used by `saikyo serve` and by the Ray deployment."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI

from saikyo import __version__
from saikyo.server import metrics
from saikyo.server.routes import classify
from saikyo.server.routes import demo
from saikyo.server.routes import docs
from saikyo.server.routes.v2 import repository as v2_repository
from saikyo.server.routes.v2 import routes as v2
from saikyo.server.middlewares.auth import ApiKeyMiddleware, load_admin_keys, load_keys
from saikyo.server.errors import install_handlers
from saikyo.server import memory
from saikyo.server.middlewares.limits import LimitsMiddleware
from saikyo.server.log_setup import configure_library_logging
from saikyo.server.served import ServedModels
from saikyo.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, models: ServedModels | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Process-wide, so set by the process that serves (plain or a Ray replica), not at import.
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        configure_library_logging(settings)
        served = models or ServedModels(settings, on_batch=app.state.metrics.observe_batch)
        app.state.models = served
        app.state.metrics.served = served
        served.start_loading()
        try:
            yield
        finally:
            await served.close()

    app = FastAPI(
        title="saikyo",
        version=__version__,
        description="Image classification inference: the 2018 /classify API and Open Inference Protocol v2.",
        lifespan=lifespan,
        docs_url=None,  # docs.install serves /docs without a CDN
        redoc_url=None,
    )
    app.state.metrics = metrics.Metrics()
    # Under Ray or --workers: the view over every process (saikyo.scale.workers.shared_metrics).
    app.state.metrics_view = None
    # Under --workers: the other workers that are not ready, {slot: what it does} (scale/workers/worker.py).
    app.state.workers_not_ready = None
    # Under --workers with model control: the decisions every worker applies (scale/workers/control.py).
    app.state.worker_control = None
    app.state.settings = settings
    install_handlers(app)
    app.include_router(classify.router)
    app.include_router(v2.router)
    app.include_router(v2_repository.router)
    app.include_router(metrics.router)
    # load_keys raises AuthConfigError on unusable settings.
    keys = load_keys(settings)
    admin_keys = load_admin_keys(settings)
    if settings.model_control != "none" and not admin_keys:
        log.warning(
            "model control is on (%s) and no admin key is set: %s", settings.model_control,
            "client keys cannot load or unload models; set SAIKYO_ADMIN_KEYS" if keys
            else "anyone who reaches this port can load and unload models; set SAIKYO_ADMIN_KEYS",
        )  # fmt: skip
    open_groups = sorted({"metrics", "docs"} & set(settings.public_endpoints))
    if keys and open_groups:
        log.warning(
            "API keys are on, but %s stay(s) open to anyone who reaches this port (public_endpoints=%s)",
            " and ".join(open_groups), ",".join(settings.public_endpoints),
        )  # fmt: skip
    docs.install(app, public=settings.public_endpoints if keys else None)
    demo.install(app)
    # The last added runs first: keys are checked before admission control and body limits, so an
    # unauthenticated flood takes no request slot.
    app.add_middleware(
        LimitsMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        max_concurrent_requests=settings.max_concurrent_requests,
        request_timeout_ms=settings.request_timeout_ms,
        max_decompressed_bytes=settings.max_decompressed_bytes,
        memory_budget=memory.body_budget(settings),
    )
    if keys or admin_keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys, public=settings.public_endpoints, admin_keys=admin_keys)
    # Outermost: every request is counted, including those refused by the middlewares above.
    app.add_middleware(metrics.MetricsMiddleware, metrics=app.state.metrics)
    return app
