"""What the processes of one `saikyo serve --workers N` tell each other, in shared memory.

A small file in the server's shared directory, mapped by the supervisor and by every worker: for each
worker slot its state, whether it is ready, its open connections and its process id; and how many
workers the supervisor has replaced. Each slot has one writer at a time (its worker; the supervisor
once that worker has exited) and readers accept a value a moment old, so aligned 8-byte words need no
lock.
"""

from __future__ import annotations

import enum
import mmap
from pathlib import Path


class WorkerState(enum.IntEnum):
    DOWN = 0  # no process, or it has exited
    STARTING = 1  # the process runs; its models are loading
    SERVING = 2  # its models loaded (ready or failed): it takes connections
    DRAINING = 3  # it stopped taking connections after a signal


_HEADER = 2  # workers, replaced
_SLOT = 4  # state, ready, connections, pid
_STATE, _READY, _CONNECTIONS, _PID = range(_SLOT)


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
        """A new process takes the slot: starting, no connections."""
        self._words[self._at(slot, _CONNECTIONS)] = 0
        self._words[self._at(slot, _PID)] = pid
        self.set_state(slot, WorkerState.STARTING)

    # ---- the whole server ----
    @property
    def replaced(self) -> int:
        return self._words[1]

    def count_replaced(self) -> None:
        self._words[1] += 1

    def not_ready(self) -> dict[str, str]:
        """Every slot that is not ready, and what it is doing instead."""
        out: dict[str, str] = {}
        for slot in range(self.workers):
            if not self.ready(slot):
                state = self.state(slot)
                # Serving but not ready: a model failed to load, as `detail` of its own readiness says.
                out[str(slot)] = "not ready" if state is WorkerState.SERVING else state.name.lower()
        return out
