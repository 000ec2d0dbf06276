"""Model control across the workers of `saikyo serve --workers N`: one decision, applied by every worker.

A load or unload is done by the worker that received it, which then records the outcome as the
server's desired state: a small JSON file in the shared directory, {name: {version, digest} or null
for unloaded}, written whole under a lock with the next generation number, which goes on the
WorkerBoard. Every worker looks at the board's generation on each tick; when it is newer than what the
worker applied, the worker reads the file and brings its own models to it, then records the generation
it applied (or failed to apply) in its slot. The call answers once every serving worker has applied
its generation, or fails naming those that did not within `control_timeout_s`.

A worker that starts later (a replacement) applies the desired state before it takes connections, so
it comes up with the current set and versions. In poll mode one worker decides for all: whichever holds
the poll lock (the first to ask; the kernel hands the lock on when that worker dies) looks at the
repository and publishes what it loaded; the others follow the board.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

from saikyo.models.errors import ModelNotExported, RepositoryError, UnknownModel
from saikyo.server.served import ServedModel, ServedModels
from saikyo.scale.workers.board import WorkerBoard, WorkerState

log = logging.getLogger(__name__)

DESIRED = "control.json"
LOCK = "control.lock"
POLL_LOCK = "poll.lock"
WAIT_STEP_S = 0.05

Desired = dict[str, dict[str, Any] | None]  # name -> {"version": n, "digest": sha256}, or None: unloaded


class WorkerControl:
    def __init__(self, board: WorkerBoard, directory: Path, slot: int, timeout_s: float) -> None:
        self.board = board
        self.directory = directory
        self.slot = slot
        self.timeout_s = timeout_s
        self.models: ServedModels | None = None  # set once the app's lifespan has created them
        self._syncing: asyncio.Task[None] | None = None
        self._poll_lock: int | None = None

    # ---- the desired state ----
    def desired(self) -> tuple[int, Desired]:
        try:
            doc = json.loads((self.directory / DESIRED).read_text())
        except FileNotFoundError:
            return 0, {}
        return int(doc["generation"]), doc["models"]

    def _record(self, name: str, want: dict[str, Any] | None) -> int:
        """Write the desired state with `name` changed; returns its generation (the board's is set too)."""
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            generation, models = self.desired()
            models[name] = want
            generation += 1
            staging = self.directory / f"{DESIRED}.{os.getpid()}"
            staging.write_text(json.dumps({"generation": generation, "models": models}))
            os.replace(staging, self.directory / DESIRED)  # readers see the old file or the new, whole
            self.board.set_generation(generation)
            return generation
        finally:
            os.close(fd)  # releases the lock

    async def publish(self, name: str, model: ServedModel | None, wait: bool = True) -> dict[str, str]:
        """Record that `name` now serves `model` (None: unloaded) for every worker; with `wait`, wait for
        every serving worker to apply it. Returns the workers that did not, {slot: why}."""
        want = None if model is None else {"version": model.version, "digest": model.digest}
        generation = await asyncio.to_thread(self._record, name, want)
        self.poke()
        return await self.wait_applied(generation) if wait else {}

    async def wait_applied(self, generation: int) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            behind: dict[str, str] = {}
            for slot in range(self.board.workers):
                if self.board.state(slot) is not WorkerState.SERVING or self.board.applied(slot) >= generation:
                    continue  # down, or starting: it applies the desired state before it serves
                failed = self.board.failed(slot) >= generation
                behind[str(slot)] = "failed to apply it (its log says why)" if failed else "has not applied it yet"
            if not behind or all(why.startswith("failed") for why in behind.values()):
                return behind
            if loop.time() >= deadline:
                return {s: why if why.startswith("failed") else f"did not apply it within {self.timeout_s:g} s"
                        for s, why in behind.items()}  # fmt: skip
            await asyncio.sleep(WAIT_STEP_S)

    # ---- applying it ----
    @property
    def behind(self) -> bool:
        seen = max(self.board.applied(self.slot), self.board.failed(self.slot))
        return self.board.generation > seen

    def poke(self) -> None:
        """On every tick: start applying a newer generation unless already at it."""
        if self.models is not None and self.behind and (self._syncing is None or self._syncing.done()):
            self._syncing = asyncio.get_running_loop().create_task(self.sync(), name="apply-model-control")

    async def sync(self) -> None:
        """Bring this worker's models to the desired state and say so on the board."""
        assert self.models is not None
        generation, desired = await asyncio.to_thread(self.desired)
        ok = True
        for name, want in desired.items():
            try:
                ok &= await self._apply(self.models, name, want)
            except Exception:  # one model's trouble must not stop the others, nor the worker
                log.exception("model control: applying %s", name)
                ok = False
        self.board.set_applied(self.slot, generation, ok)
        if not ok:
            log.error("model control: generation %d applied only in part on this worker", generation)

    @staticmethod
    async def _apply(models: ServedModels, name: str, want: dict[str, Any] | None) -> bool:
        if want is None:
            if name in models.models or name in models.versions:
                try:
                    await models.unload(name)
                except UnknownModel:
                    pass
            return True
        current = models.models.get(name)
        if current is not None and current.ready and (current.version, current.digest) == (want["version"], want["digest"]):
            return True
        try:
            model = await models.load(name, want["version"])
        except (ModelNotExported, RepositoryError) as exc:
            log.error("model control: %s version %s: %s", name, want["version"], exc)
            return False
        return model.ready

    async def catch_up(self) -> None:
        """Before a worker takes connections: apply whatever was decided before it started."""
        while self.models is not None and self.behind:
            self.poke()
            if self._syncing is not None:
                await self._syncing

    # ---- poll mode ----
    def may_poll(self) -> bool:
        """Whether this worker decides for all in poll mode: it holds the poll lock (kept until it exits)."""
        if self._poll_lock is None:
            fd = os.open(self.directory / POLL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._poll_lock = fd
            log.info("model control: this worker polls the repository for every worker")
        return True
