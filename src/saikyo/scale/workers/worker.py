"""One worker of `saikyo serve --workers N`: the whole app in a process of its own, accepting on the
listening socket that the supervisor (scale/workers/supervisor.py) shares with every worker.

What a worker adds to the single-process server:
- Accepting: a worker takes a connection only while it holds no more open connections than any other
  worker that serves, so eight keep-alive clients land four and four on two workers. Left to the kernel
  and the event loop, whichever worker wakes first accepts everything pending: measured here, all
  eight connections landed on one of two workers in a third of the runs (SO_REUSEPORT's hash instead
  splits them at random: 6/2 or worse one run in three). A worker still loading its models takes
  connections only while no worker serves (probes answer during start-up, as with one process), so a
  replacement for a dead worker takes none until its models are loaded.
- Its slot on the WorkerBoard: state, readiness, open connections, a heartbeat every tick (a worker
  silent for heartbeat_timeout_s is frozen: the others' readiness says so and the supervisor
  replaces it). /v2/health/ready is 200 only when every worker is ready and answering.
- Model control: a load or unload reaches every worker through the board (scale/workers/control.py); a
  worker applies what was decided before it takes connections.
- /metrics: its exposition published to the shared directory every PUBLISH_S, merged on scrape with
  the others' under a `worker` label (saikyo.scale.workers.shared_metrics), plus the supervisor's count of
  replaced workers.
- `X-Saikyo-Worker: <slot> pid=<pid>` on every response.
- Signals: the first SIGTERM or SIGINT drains, as one process does; later ones are ignored (a service
  manager, or Ctrl-C at a terminal, may signal every process besides the supervisor's forwarding). The
  supervisor's own second signal kills the workers.
- A worker whose supervisor is gone drains and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from saikyo.server.middlewares.response_header import ResponseHeader
from saikyo.scale.workers.shared_metrics import DirectoryBoard, SharedMetrics
from saikyo.server.shutdown import DrainingServer, mark_draining, uvicorn_config
from saikyo.scale.workers.board import WorkerBoard, WorkerState
from saikyo.scale.workers.control import WorkerControl
from saikyo.settings import Settings

log = logging.getLogger(__name__)

WORKER_HEADER = "x-saikyo-worker"
PUBLISH_S = 1.0
STALE_S = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor hands a worker it starts (pickled into the new process)."""

    slot: int
    settings: Settings  # already sized to the worker's share of the cores
    directory: Path  # shared with the supervisor and the other workers: the board, the metrics
    supervisor_pid: int
    cuda_visible_devices: str | None = None  # the GPU(s) this worker sees; None: the environment's


def run_worker(spec: WorkerSpec, sock: socket.socket) -> None:
    """The entry point of a worker process."""
    # Until uvicorn installs its handlers nothing has been accepted: a signal just ends the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_before_serving)
    if spec.cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices  # before anything loads torch
    settings = spec.settings
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker {spec.slot} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from saikyo.server import create_app

    board = WorkerBoard.open(spec.directory)
    app = create_app(settings)
    worker = Worker(spec, board, app, sock)
    server = WorkerServer(uvicorn_config(app, settings), worker)
    log.info(
        "pid %d, %d intra-op and %d decode threads%s",
        os.getpid(),
        settings.resolved_intra_op_threads(),
        settings.resolved_decode_threads(),
        f", CUDA_VISIBLE_DEVICES={spec.cuda_visible_devices}" if spec.cuda_visible_devices is not None else "",
    )
    try:
        server.run(sockets=[])  # uvicorn binds nothing: the worker accepts for itself
    finally:
        board.close()  # the supervisor marks the slot down when it sees the process end
        if server.orphaned:
            _remove_if_last(spec.directory)
    if server.force_exit:
        raise SystemExit(1)
    if server.exit_code:
        raise SystemExit(server.exit_code)


def _exit_before_serving(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _remove_if_last(directory: Path) -> None:
    """Without a supervisor to remove the shared directory, the last worker out does (each removed its
    own metrics when it stopped; whoever finds none left is last, or as good as)."""
    if not any(directory.glob(f"*{DirectoryBoard.SUFFIX}")):
        shutil.rmtree(directory, ignore_errors=True)


class Worker:
    """A worker's side of the shared state: its slot, its metrics, its acceptor."""

    def __init__(self, spec: WorkerSpec, board: WorkerBoard, app: FastAPI, sock: socket.socket) -> None:
        self.spec = spec
        self.slot = spec.slot
        self.board = board
        self.app = app
        self.sock = sock
        self.metrics = SharedMetrics(
            DirectoryBoard(spec.directory), str(spec.slot), app.state.metrics, "worker", PUBLISH_S, STALE_S,
            unlabelled=lambda: server_exposition(board),
        )  # fmt: skip
        app.state.metrics_view = self.metrics.view
        app.state.workers_not_ready = self.others_not_ready
        self.control: WorkerControl | None = None
        if spec.settings.model_control != "none":
            self.control = WorkerControl(board, spec.directory, spec.slot, spec.settings.control_timeout_s)
        app.state.worker_control = self.control
        app.add_middleware(ResponseHeader, name=WORKER_HEADER, value=f"{spec.slot} pid={os.getpid()}")
        self.acceptor: BalancedAcceptor | None = None
        self._loaded: asyncio.Task[None] | None = None

    def others_not_ready(self) -> dict[str, str]:
        """The other workers that are not ready or not answering (this one's own readiness is the
        caller's to check)."""
        silent = self.spec.settings.heartbeat_timeout_s
        return {slot: what for slot, what in self.board.not_ready(silent).items() if slot != str(self.slot)}

    def start(self, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self.acceptor = BalancedAcceptor(self.sock, self.board, self.slot, protocol_factory)
        self.acceptor.start()
        self.metrics.start()
        self._loaded = asyncio.get_running_loop().create_task(self._serve_when_loaded())

    async def _serve_when_loaded(self) -> None:
        models = self.app.state.models
        if self.control is not None:
            self.control.models = models
            models.poll_decides = self.control.may_poll
            models.on_polled = lambda name, model: self.control.publish(name, model, wait=False)  # type: ignore[union-attr]
        await models.wait_loaded()
        if models.startup_error is not None:
            return  # exit_on_error: the worker exits (server/shutdown.py), never having served
        if self.control is not None:
            await self.control.catch_up()  # a replacement comes up with what was decided meanwhile
        if self.board.state(self.slot) is WorkerState.STARTING:
            self.board.set_state(self.slot, WorkerState.SERVING)
            log.info("models loaded: taking connections")

    def tick(self) -> None:
        """Every 0.1 s: this worker's heartbeat and readiness on the board, and model control."""
        self.board.beat(self.slot)
        if self.board.state(self.slot) is WorkerState.SERVING:
            self.board.set_ready(self.slot, self.app.state.models.ready)
            if self.control is not None:
                self.control.poke()

    def drain(self) -> None:
        """On the first signal (runs in the signal handler: flags only)."""
        mark_draining(self.app)
        self.board.set_ready(self.slot, False)

    def stop_accepting(self) -> None:
        self.board.set_state(self.slot, WorkerState.DRAINING)
        if self.acceptor is not None:
            self.acceptor.stop()
        else:
            self.sock.close()
        if self._loaded is not None:
            self._loaded.cancel()

    async def stop(self) -> None:
        await self.metrics.stop()


class WorkerServer(DrainingServer):
    """The draining uvicorn server, accepting through the worker's BalancedAcceptor."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(
            config,
            on_drain=worker.drain,
            delay_s=worker.spec.settings.shutdown_delay_s,
            force_signals=frozenset(),
        )
        self.worker = worker
        self.orphaned = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.worker.start(counted_protocols(self, self.worker.board, self.worker.slot))

    async def on_tick(self, counter: int) -> bool:
        if not self.orphaned and os.getppid() != self.worker.spec.supervisor_pid:
            self.orphaned = True
            log.warning("the supervisor is gone: draining")
            self.handle_exit(signal.SIGTERM, None)
        self.worker.tick()
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.worker.stop_accepting()
        try:
            await super().shutdown(sockets=sockets)
        finally:
            await self.worker.stop()


def counted_protocols(server: uvicorn.Server, board: WorkerBoard, slot: int) -> Callable[[], asyncio.Protocol]:
    """uvicorn's HTTP protocol, built as its Server.startup builds it, taking the connection off the
    worker's count on the board when the connection ends."""
    config = server.config
    base: Any = config.http_protocol_class

    class Counted(base):  # type: ignore[misc, valid-type]
        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                board.add_connections(slot, -1)

    return lambda: Counted(config=config, server_state=server.server_state, app_state=server.lifespan.state)


class BalancedAcceptor:
    """Accepts from the shared listening socket when it is this worker's turn: it serves and holds no
    more connections than any other worker that serves (see the module's docstring)."""

    PAUSE_S = 0.002  # not our turn: look again this much later
    MAX_WAIT_S = 0.05  # a connection the worker whose turn it is has left waiting this long: take it

    def __init__(
        self, sock: socket.socket, board: WorkerBoard, slot: int, protocol_factory: Callable[[], asyncio.Protocol]
    ) -> None:
        self.sock = sock
        self.board = board
        self.slot = slot
        self.protocol_factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        self._paused: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0
        self._last_look = 0.0
        self._connecting: set[asyncio.Task[None]] = set()
        sock.setblocking(False)

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def stop(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        else:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()  # the supervisor and the other workers keep the listener open

    def _on_readable(self) -> None:
        while self._my_turn():
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it
            except OSError as exc:  # out of file descriptors, for one: leave it to the others a while
                log.warning("could not accept a connection: %s", exc)
                break
            self.board.add_connections(self.slot, 1)
            task = self._loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        self._pause()

    def _pause(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self._paused = self._loop.call_later(self.PAUSE_S, self._resume)

    def _resume(self) -> None:
        self._paused = None
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def _my_turn(self) -> bool:
        board, workers = self.board, range(self.board.workers)
        serving = [w for w in workers if board.state(w) is WorkerState.SERVING]
        takers = serving or [w for w in workers if board.state(w) is WorkerState.STARTING]
        if self.slot not in takers:
            return False
        if board.connections(self.slot) <= min(board.connections(w) for w in takers):
            return True
        # Not ours unless the worker whose turn it is leaves it waiting (its event loop may be stuck).
        now = time.monotonic()
        if now - self._last_look > 4 * self.PAUSE_S:  # a new wait, not the same one looked at again
            self._waiting_since = now
        self._last_look = now
        if now - self._waiting_since < self.MAX_WAIT_S:
            return False
        log.debug("taking a connection out of turn: left waiting %.0f ms", 1000 * (now - self._waiting_since))
        return True

    async def _connect(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._loop.connect_accepted_socket(self.protocol_factory, conn)
        except Exception as exc:  # the client already hung up, for one
            log.debug("connection dropped while being set up: %s", exc)
            self.board.add_connections(self.slot, -1)
            conn.close()


class _BoardCollector(Collector):
    def __init__(self, board: WorkerBoard) -> None:
        self.board = board

    def collect(self) -> Iterable[Metric]:
        replaced = CounterMetricFamily(
            "saikyo_workers_replaced", "Worker processes the supervisor started in place of one that exited"
        )
        replaced.add_metric([], self.board.replaced)
        states = GaugeMetricFamily("saikyo_workers", "Worker processes by state", labels=["state"])
        counts = {state: 0 for state in WorkerState}
        for slot in range(self.board.workers):
            counts[self.board.state(slot)] += 1
        for state, count in counts.items():
            states.add_metric([state.name.lower()], count)
        return [replaced, states]

    def describe(self) -> Iterable[Metric]:
        return []


def server_exposition(board: WorkerBoard) -> bytes:
    """The families that are one value for the whole server, read from the board at scrape time."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_BoardCollector(board))
    return generate_latest(registry)
