"""What the processes of one `saikyo serve --workers N` tell each other, in shared memory.

A small file in the server's shared directory, mapped by the supervisor and by every worker: for each
worker slot its state, whether it is ready, its open connections, its process id, its heartbeat and
the model-control generation it applied (or failed to); and how many workers the supervisor has
replaced and the latest model-control generation (scale/workers/control.py). Each slot has one writer at a time (its worker; the supervisor
once that worker has exited) and readers accept a value a moment old, so aligned 8-byte words need no
lock.
"""

from __future__ import annotations

import enum
import mmap
import time
from pathlib import Path


class WorkerState(enum.IntEnum):
    DOWN = 0  # no process, or it has exited
    STARTING = 1  # the process runs; its models are loading
    SERVING = 2  # its models loaded (ready or failed): it takes connections
    DRAINING = 3  # it stopped taking connections after a signal


_HEADER = 3  # workers, replaced, control generation
_SLOT = 7  # state, ready, connections, pid, heartbeat, applied generation, failed generation
_STATE, _READY, _CONNECTIONS, _PID, _BEAT, _APPLIED, _FAILED = range(_SLOT)


def _now_ms() -> int:
    # CLOCK_MONOTONIC is one clock for every process on the host.
    return int(time.monotonic() * 1000)


class WorkerBoard:
    FILE = "workers.board"

    def __init__(self, path: Path) -> None:
        self._file = open(path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), 0)
        self._words = memoryview(self._map).cast("q")
        self.workers = self._words[0]

    @classmethod
    def create(cls, directory: Path, workers: int) -> "WorkerBoard":
        path = directory / cls.FILE
        path.write_bytes(bytes(8 * (_HEADER + _SLOT * workers)))
        board = cls(path)
        board._words[0] = board.workers = workers
        return board

    @classmethod
    def open(cls, directory: Path) -> "WorkerBoard":
        return cls(directory / cls.FILE)

    def close(self) -> None:
        self._words.release()
        self._map.close()
        self._file.close()

    def _at(self, slot: int, field: int) -> int:
        if not 0 <= slot < self.workers:
            raise IndexError(f"no worker slot {slot} of {self.workers}")
        return _HEADER + _SLOT * slot + field

    # ---- one slot ----
    def state(self, slot: int) -> WorkerState:
        return WorkerState(self._words[self._at(slot, _STATE)])

    def set_state(self, slot: int, state: WorkerState) -> None:
        self._words[self._at(slot, _STATE)] = state
        if state is not WorkerState.SERVING:
            self.set_ready(slot, False)

    def ready(self, slot: int) -> bool:
        return bool(self._words[self._at(slot, _READY)])

    def set_ready(self, slot: int, ready: bool) -> None:
        self._words[self._at(slot, _READY)] = int(ready)

    def connections(self, slot: int) -> int:
        return self._words[self._at(slot, _CONNECTIONS)]

    def add_connections(self, slot: int, delta: int) -> None:
        self._words[self._at(slot, _CONNECTIONS)] += delta

    def pid(self, slot: int) -> int:
        return self._words[self._at(slot, _PID)]

    def start(self, slot: int, pid: int) -> None:
        """A new process takes the slot: starting, no connections, nothing applied."""
        for field in (_CONNECTIONS, _APPLIED, _FAILED):
            self._words[self._at(slot, field)] = 0
        self._words[self._at(slot, _PID)] = pid
        self.beat(slot)
        self.set_state(slot, WorkerState.STARTING)

    def beat(self, slot: int) -> None:
        """The worker's event loop is turning (written every tick)."""
        self._words[self._at(slot, _BEAT)] = _now_ms()

    def silent_for(self, slot: int) -> float:
        """Seconds since the slot's last heartbeat."""
        return (_now_ms() - self._words[self._at(slot, _BEAT)]) / 1000

    def applied(self, slot: int) -> int:
        return self._words[self._at(slot, _APPLIED)]

    def failed(self, slot: int) -> int:
        return self._words[self._at(slot, _FAILED)]

    def set_applied(self, slot: int, generation: int, ok: bool) -> None:
        self._words[self._at(slot, _APPLIED if ok else _FAILED)] = generation

    # ---- the whole server ----
    @property
    def replaced(self) -> int:
        return self._words[1]

    def count_replaced(self) -> None:
        self._words[1] += 1

    @property
    def generation(self) -> int:
        """The latest model-control decision's number (0: none yet)."""
        return self._words[2]

    def set_generation(self, generation: int) -> None:
        self._words[2] = generation

    def not_ready(self, silent_after_s: float | None = None) -> dict[str, str]:
        """Every slot that is not ready, and what it is doing instead: a serving worker silent for
        `silent_after_s` is frozen, whatever its ready flag says."""
        out: dict[str, str] = {}
        for slot in range(self.workers):
            frozen = silent_after_s is not None and self.state(slot) is WorkerState.SERVING
            if frozen and self.silent_for(slot) > silent_after_s:  # type: ignore[operator]
                out[str(slot)] = "not answering"
            elif not self.ready(slot):
                state = self.state(slot)
                # Serving but not ready: a model failed to load, as `detail` of its own readiness says.
                out[str(slot)] = "not ready" if state is WorkerState.SERVING else state.name.lower()
        return out
