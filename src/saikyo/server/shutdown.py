"""Graceful shutdown: SIGTERM (or SIGINT) drains the server instead of dropping what it accepted.

1. At once: readiness turns false (`/v2/health/ready` answers 400), so load balancers stop routing here.
2. For shutdown_delay_s (default 0) the server keeps accepting and serving, covering the time a load
   balancer takes to notice; then the listener closes: new connections are refused.
3. Requests in flight finish (up to drain_timeout_s); idle keep-alive connections close.
4. The models are closed and the process exits 0. A second signal stops waiting (exit 1).

uvicorn does steps 3-4 itself; on top of it this adds step 1-2 and the exit status: since 0.29 uvicorn
re-raises the signal after a graceful shutdown, which would end the process with 143 instead of 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from saikyo.server.http_protocol import bounded_protocol
from saikyo.settings import Settings

log = logging.getLogger(__name__)

# The exit status of a server (or worker) that stopped because a model given at start cannot load.
EXIT_MODEL_ERROR = 3


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        on_drain: Callable[[], None],
        delay_s: float = 0.0,
        force_signals: frozenset[int] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._delay_s = delay_s
        # Which signals, arriving while draining, stop the wait; None: any (one process, step 4).
        # A worker under --workers takes none: its supervisor kills it instead (scale/workers/worker.py).
        self._force_signals = force_signals
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of the event loop: set flags, schedule, return.
        # Unlike uvicorn's, it does not record the signal, so the process is not re-killed afterwards.
        if self._draining:
            if self._force_signals is not None and sig not in self._force_signals:
                log.info("%s while draining: still draining", signal.Signals(sig).name)
                return
            log.warning("second %s: exiting without waiting for requests in flight", signal.Signals(sig).name)
            self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        self._on_drain()
        if self._delay_s > 0 and self._loop is not None:
            log.info(
                "%s: not ready; still serving for %.1f s, then draining", signal.Signals(sig).name, self._delay_s
            )
            self._loop.call_soon_threadsafe(self._loop.call_later, self._delay_s, self._stop_accepting)
        else:
            log.info("%s: not ready; draining requests in flight", signal.Signals(sig).name)
            self.should_exit = True

    def _stop_accepting(self) -> None:
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        models = getattr(self.config.app.state, "models", None)  # absent until the lifespan has started
        if models is not None and models.startup_error is not None and not self.should_exit:
            # exit_on_error: a model given at start cannot load (the reason is logged above).
            log.error("a model given at start cannot load (%s): exiting; --no-exit-on-error serves the rest",
                      models.startup_error)  # fmt: skip
            self.exit_code = EXIT_MODEL_ERROR
            self.should_exit = True
        return await super().on_tick(counter)


def mark_draining(app: FastAPI) -> None:
    models = getattr(app.state, "models", None)  # absent until the lifespan has started
    if models is not None:
        models.draining = True


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=settings.drain_timeout_s if settings.drain_timeout_s > 0 else None,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        http=bounded_protocol(settings),
    )


def serve(app: FastAPI, settings: Settings, sock: socket.socket | None = None) -> None:
    """Run `app` until a signal, then drain; raises SystemExit(1) if a second signal cut the drain short.
    `sock`: the listening socket, bound by the caller (so that a port in use is an error before startup)."""
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, on_drain=lambda: mark_draining(app), delay_s=settings.shutdown_delay_s)
    server.run(sockets=[sock] if sock is not None else None)
    if server.force_exit:
        raise SystemExit(1)
    if server.exit_code:
        raise SystemExit(server.exit_code)
