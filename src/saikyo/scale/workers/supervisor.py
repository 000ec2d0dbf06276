"""`saikyo serve --workers N`: N server processes on one port, and the supervisor that keeps them.

The supervisor binds the listening socket itself and starts each worker (scale/workers/worker.py: the whole
app, with its own runner and batchers) with multiprocessing's "spawn" context, handing it the socket,
as uvicorn's multiprocess manager does: a fresh interpreter per worker, inheriting none of the
supervisor's threads or CUDA state, and one accept queue that outlives every worker. A worker that dies
loses the connections it had accepted and nothing else. (With SO_REUSEPORT each worker would have a
queue of its own, lost with it, and connections would be spread by a hash: at random, not by load.)

- Cores are divided, not oversubscribed: a worker's inference (ONNX Runtime intra-op) and decode
  threads, where left at 0, are its share of the cores, cores // N and at least 1 (`Settings.sized_to`).
- Devices: on several GPUs the workers spread over them, each seeing one (CUDA_VISIBLE_DEVICES, set in
  the worker before anything loads torch); on one GPU they all share it (`assign_devices`).
- Faults: a worker that exits is replaced and counted (saikyo_workers_replaced_total on /metrics)
  after a back-off that doubles with each exit of its slot in a row, from FIRST_BACKOFF_S up to
  MAX_BACKOFF_S, whether it failed to start or crashed after it served (so a request that kills
  workers cannot cost a model load per request); a worker that served STABLE_S resets its slot's
  count. One that exits before its models are loaded failed to start, and once every slot has failed
  MAX_START_FAILURES times in a row the supervisor gives up and exits 1 (the workers' own errors are in
  the log above). A worker that exits because a model given at start cannot load (exit_on_error, at
  the first start) stops the server at once: retrying would fail the same way.
- Frozen workers: each worker beats on the board every tick; one that serves and has been silent for
  heartbeat_timeout_s (SIGSTOP, a deadlocked event loop) is killed, and then replaced as above.
- Signals: the first SIGTERM or SIGINT stops replacing, closes the supervisor's copy of the listening
  socket and forwards SIGTERM to every worker, which drains as one process does (server/shutdown.py);
  the supervisor exits 0 once every worker has exited 0. A second signal stops waiting: the workers
  are killed and the supervisor exits 1.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import dataclasses
import time
from collections.abc import Mapping, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from saikyo.server.shutdown import EXIT_MODEL_ERROR
from saikyo.scale.workers.worker import WorkerSpec, run_worker
from saikyo.scale.workers.board import WorkerBoard, WorkerState
from saikyo.server import memory
from saikyo.settings import Settings, available_cores

log = logging.getLogger(__name__)

# --workers auto: processes on the CPU, and per GPU.
AUTO_MAX_CPU_WORKERS = 8
AUTO_WORKERS_PER_GPU = 2
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
MAX_START_FAILURES = 3
STABLE_S = 60.0  # a worker that served this long starts its slot's back-off afresh
# After the drain's own limits, how long the supervisor waits for a worker before killing it.
STOP_GRACE_S = 30.0
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


# ---- how many, on what ----
def visible_gpus(environ: Mapping[str, str] | None = None, driver_dir: Path = NVIDIA_GPUS) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them, without importing torch:
    that variable when set, else one per device the NVIDIA driver lists."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        names = [d.strip() for d in listed.split(",") if d.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way of saying none.
        return names[: next((i for i, d in enumerate(names) if d.startswith("-")), len(names))]
    try:
        return [str(i) for i in range(sum(1 for _ in driver_dir.iterdir()))]
    except OSError:
        return []


def serves_on_gpu(settings: Settings, gpus: int) -> bool:
    """Whether the workers will run their models on GPUs: device cuda, or device auto with the torch
    backend (auto picks torch where CUDA is). Other backends with device auto count as CPU: ONNX
    Runtime's default build has no CUDA provider (with onnxruntime-gpu, say --device cuda)."""
    if settings.device == "cpu" or gpus == 0:
        return False
    return settings.device.startswith("cuda") or settings.backend in ("torch", "auto")


def auto_workers(cores: int, gpus: int, on_gpu: bool) -> int:
    """`--workers auto`.

    CPU: one worker per core, at most AUTO_MAX_CPU_WORKERS. Separate processes with one inference
    thread each keep every core busy, where one ONNX Runtime run over several threads idles at each
    operator's barrier while the other threads decode (2 cores, resnet50: 24.0 images/s from two
    one-thread processes against 21.6 from one two-thread process); past 8, memory (a copy of every
    model per worker) grows faster than what one more worker adds, and two threads per worker still
    scale well.
    GPU: AUTO_WORKERS_PER_GPU per GPU, but at least two cores each: on an H200 the Python server, not
    the GPU, was the limit, and two processes per GPU double the CPU side while batches stay large.
    """
    if on_gpu:
        return max(1, min(AUTO_WORKERS_PER_GPU * gpus, cores // 2))
    return max(1, min(cores, AUTO_MAX_CPU_WORKERS))


def worker_count(settings: Settings, cores: int | None = None, gpus: Sequence[str] | None = None) -> int:
    if settings.workers != "auto":
        return int(settings.workers)
    cores = available_cores() if cores is None else cores
    gpus = visible_gpus() if gpus is None else gpus
    return auto_workers(cores, len(gpus), serves_on_gpu(settings, len(gpus)))


def assign_devices(workers: int, gpus: Sequence[str]) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each worker: round robin over `gpus`, so each GPU serves workers // GPUs
    workers or one more, and each worker sees one device; None for every worker when there is no GPU."""
    if not gpus:
        return [None] * workers
    return [gpus[i % len(gpus)] for i in range(workers)]


def worker_specs(
    settings: Settings, workers: int, directory: Path, cores: int | None = None, gpus: Sequence[str] | None = None
) -> list[WorkerSpec]:
    """What each worker runs with: its share of the cores and, when serving on GPUs, its device."""
    cores = available_cores() if cores is None else cores
    gpus = visible_gpus() if gpus is None else gpus
    sized = settings.sized_to(max(1, cores // workers))
    if settings.memory_budget_bytes == 0 and workers > 1:
        # The derived budget is the machine's (or cgroup's): every worker would see all of it.
        sized = sized.with_overrides(memory_budget_bytes=max(1, memory.body_budget(settings)[0] // workers))
    devices = assign_devices(workers, gpus if serves_on_gpu(settings, len(gpus)) else [])
    return [WorkerSpec(slot, sized, directory, os.getpid(), devices[slot]) for slot in range(workers)]


def listen(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on; OSError says which address could not be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)  # uvicorn's default backlog
    sock.set_inheritable(True)
    return sock


def serve_workers(settings: Settings, workers: int) -> int:
    """Serve on `workers` processes until a signal; the exit status: 0 when every worker drained cleanly."""
    sock = listen(settings.host, settings.port)
    directory = Path(tempfile.mkdtemp(prefix="saikyo-workers-"))
    board = WorkerBoard.create(directory, workers)
    try:
        specs = worker_specs(settings, workers, directory)
        first = specs[0].settings
        log.info(
            "serving on http://%s:%d with %d workers, each with %d intra-op and %d decode threads%s",
            settings.host, settings.port, workers, first.resolved_intra_op_threads(), first.resolved_decode_threads(),
            "; CUDA_VISIBLE_DEVICES " + ", ".join(f"{s.slot}: {s.cuda_visible_devices}" for s in specs)
            if specs[0].cuda_visible_devices is not None else "",
        )  # fmt: skip
        return Supervisor(specs, sock, board).run()
    finally:
        sock.close()
        board.close()
        shutil.rmtree(directory, ignore_errors=True)


class Supervisor:
    def __init__(self, specs: Sequence[WorkerSpec], sock: socket.socket, board: WorkerBoard) -> None:
        self.specs = list(specs)
        self.sock = sock
        self.board = board
        self._context = multiprocessing.get_context("spawn")
        self.processes: list[BaseProcess | None] = [None] * len(specs)
        self.failed_starts = [0] * len(specs)  # in a row, per slot
        self.exits = [0] * len(specs)  # in a row, per slot, whatever the cause: the back-off
        self.started_at = [0.0] * len(specs)
        self.heartbeat_s = self.specs[0].settings.heartbeat_timeout_s if self.specs else 0.0
        self.start_at: list[float | None] = [None] * len(specs)  # when to (re)start a slot that is down
        self.exit_codes: dict[int, int | None] = {}  # of the workers that exited after the stop
        self.stopping_since: float | None = None
        self.forced = False
        self.gave_up = False
        self.model_error = False  # a model given at start cannot load: the server's exit status says so
        self._signals: list[int] = []

    # ---- the loop ----
    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        previous_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in range(len(self.specs)):
                self._start(slot)
            while self.stopping_since is None or any(self.processes):
                self._wait(wake_r)
                self._handle_signals()
                self._reap()
                if self.stopping_since is None:
                    self._kill_silent()
                    self._restart_due()
                else:
                    self._kill_overdue()
        finally:
            if self.stopping_since is None and any(self.processes):  # only on an error of our own
                log.error("the supervisor is stopping on an error: draining every worker")
                self._stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_fd)
            wake_r.close()
            wake_w.close()
        unclean = {slot: code for slot, code in self.exit_codes.items() if code != 0}
        if unclean:
            log.warning("workers that did not exit cleanly (slot: exit code): %s", unclean)
        if self.model_error:
            return EXIT_MODEL_ERROR
        return 1 if self.forced or self.gave_up or unclean else 0

    def _wait(self, wake: socket.socket) -> None:
        now = time.monotonic()
        due = [at for at in self.start_at if at is not None]
        timeout = max(0.0, min(due) - now) if due and self.stopping_since is None else 1.0
        sentinels = [p.sentinel for p in self.processes if p is not None]
        ready = multiprocessing.connection.wait([*sentinels, wake], min(timeout, 1.0))
        if wake in ready:
            wake.recv(4096)  # the signal numbers; the handler queued them already

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if self.stopping_since is None:
                log.info("%s: draining every worker", signal.Signals(sig).name)
                self._stop()
            elif not self.forced:
                log.warning("second %s: killing the workers without waiting for requests in flight", signal.Signals(sig).name)
                self.forced = True
                self._signal_all(signal.SIGKILL)

    # ---- starting, replacing, stopping ----
    def _start(self, slot: int) -> None:
        if self.processes[slot] is None and self.start_at[slot] is not None:
            self.board.count_replaced()
        if self.start_at[slot] is not None and self.specs[slot].settings.exit_on_error:
            # exit_on_error is for what the server was started with: a replacement serves what it can.
            settings = self.specs[slot].settings.with_overrides(exit_on_error=False)
            self.specs[slot] = dataclasses.replace(self.specs[slot], settings=settings)
        self.start_at[slot] = None
        self.started_at[slot] = time.monotonic()
        self.board.start(slot, 0)
        process = self._context.Process(
            target=run_worker, args=(self.specs[slot], self.sock), name=f"saikyo-worker-{slot}", daemon=False
        )
        process.start()
        self.board.start(slot, process.pid or 0)
        self.processes[slot] = process

    def _reap(self) -> None:
        for slot, process in enumerate(self.processes):
            if process is None or process.exitcode is None:
                continue
            process.join()
            code = process.exitcode
            served = self.board.state(slot) is not WorkerState.STARTING
            self.board.set_state(slot, WorkerState.DOWN)
            self.processes[slot] = None
            if self.stopping_since is not None:
                # Stopped by our SIGTERM before it could handle one: it had accepted nothing.
                self.exit_codes[slot] = 0 if not served and code == -signal.SIGTERM else code
                continue
            if code == EXIT_MODEL_ERROR:  # (a draining worker counts as served: check this first)
                log.error("worker %d: a model given at start cannot load (its error is above); stopping the "
                          "server (--no-exit-on-error serves the models that load)", slot)  # fmt: skip
                self.gave_up = self.model_error = True
                self._stop()
                return
            if time.monotonic() - self.started_at[slot] >= STABLE_S:
                self.exits[slot] = 0
            self.exits[slot] += 1
            delay = min(FIRST_BACKOFF_S * 2 ** (self.exits[slot] - 1), MAX_BACKOFF_S)
            if served:
                self.failed_starts[slot] = 0
                log.warning("worker %d (pid %s) exited with %s after it served (%d in a row); replacing it in %.1f s",
                            slot, process.pid, _status(code), self.exits[slot], delay)  # fmt: skip
                self.start_at[slot] = time.monotonic() + delay
                continue
            self.failed_starts[slot] += 1
            if all(n >= MAX_START_FAILURES for n in self.failed_starts):
                log.error(
                    "no worker could start: every one of the %d exited before its models were loaded, "
                    "%d times in a row (the last with %s); their errors are above",
                    len(self.specs), MAX_START_FAILURES, _status(code),
                )  # fmt: skip
                self.gave_up = True
                self._stop()
                return
            log.error(
                "worker %d (pid %s) exited with %s before its models were loaded (%d in a row); retrying in %.1f s",
                slot, process.pid, _status(code), self.failed_starts[slot], delay,
            )  # fmt: skip
            self.start_at[slot] = time.monotonic() + delay

    def _kill_silent(self) -> None:
        """Kill a serving worker whose event loop stopped beating (the reaper then replaces it)."""
        for slot, process in enumerate(self.processes):
            if process is None or process.exitcode is not None or self.board.state(slot) is not WorkerState.SERVING:
                continue
            silent = self.board.silent_for(slot)
            if silent > self.heartbeat_s:
                log.error("worker %d (pid %s) has not answered for %.1f s (heartbeat_timeout_s %g): "
                          "killing it", slot, process.pid, silent, self.heartbeat_s)  # fmt: skip
                self.board.set_state(slot, WorkerState.DOWN)  # nobody counts on it meanwhile
                process.kill()

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, at in enumerate(self.start_at):
            if at is not None and at <= now and self.processes[slot] is None:
                self._start(slot)

    def _stop(self) -> None:
        self.stopping_since = time.monotonic()
        self.start_at = [None] * len(self.specs)
        # Once the workers close theirs too, the port refuses new connections.
        self.sock.close()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for process in self.processes:
            if process is not None and process.pid is not None and process.exitcode is None:
                os.kill(process.pid, sig)

    def _kill_overdue(self) -> None:
        assert self.stopping_since is not None
        s = self.specs[0].settings
        if time.monotonic() - self.stopping_since < s.shutdown_delay_s + s.drain_timeout_s + STOP_GRACE_S:
            return
        for slot, process in enumerate(self.processes):
            if process is not None and process.exitcode is None:
                log.error("worker %d (pid %s) is still running after the drain: killing it", slot, process.pid)
                process.kill()


def _status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"
