"""The processes a server started, found and ended by PID (Linux /proc): what a shutdown that cannot
trust Ray's own clean-up falls back on.

A signal to the whole process group (systemd's KillMode=control-group, `timeout`, many supervisors)
reaches Ray's GCS and raylet along with the server; once they are gone Ray's own shutdown calls never
return, and their children would be re-parented away from us. So the server makes itself their
subreaper (orphans below it are re-parented to it, not to init), notes its descendants while it serves,
and at the end kills whichever of them are still alive -- each checked by its start time, so a reused PID
is never hit -- scanning again until none is left, for a process may start a child while we kill.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

Tracked = dict[int, int]  # pid -> start time in clock ticks since boot (/proc/<pid>/stat field 22)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live, non-zombie process; None otherwise."""
    try:
        text = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> Tracked:
    """Every live process below `root` (children, their children, ...)."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat
    found: Tracked = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def in_session(sid: int) -> Tracked:
    """Every live process of session `sid`: what a process started with start_new_session and all its
    descendants share, even those re-parented after their parent died."""
    found: Tracked = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found[int(entry.name)] = int(fields[19])
    return found


def kill_session(sid: int, seconds: float = 5.0) -> list[int]:
    """SIGKILL every process of session `sid`, scanning again until a scan finds none (or `seconds` pass)."""
    killed: list[int] = []
    deadline = time.monotonic() + seconds
    while True:
        round_killed = kill(in_session(sid))
        killed += round_killed
        if not round_killed or time.monotonic() > deadline:
            return killed
        time.sleep(0.1)


def alive(tracked: Tracked) -> Tracked:
    return {pid: started for pid, started in tracked.items() if (s := _stat(pid)) is not None and s[1] == started}


def kill(tracked: Tracked) -> list[int]:
    """SIGKILL each tracked process that is still the same process; returns the PIDs killed."""
    killed = []
    for pid in alive(tracked):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphans below this process are re-parented to it (Linux >= 3.4), so descendants() keeps
    finding the processes of a Ray whose raylet died first. False where the kernel has no such thing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def kill_all(root: int, tracked: Tracked, seconds: float = 5.0) -> list[int]:
    """Kill every tracked process and every descendant of `root`, scanning again until a scan finds
    none alive (or `seconds` pass); returns the PIDs killed."""
    killed: list[int] = []
    deadline = time.monotonic() + seconds
    while True:
        round_killed = kill({**tracked, **descendants(root)})
        killed += round_killed
        if not round_killed or time.monotonic() > deadline:
            return killed
        time.sleep(0.1)  # let a process that was forking finish, so that its child shows up
