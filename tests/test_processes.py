"""saikyo.scale.processes: what a Ray server's shutdown falls back on when a signal to the whole
process group has ended Ray's raylet first and left its children orphaned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from saikyo.scale import processes

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

# A child that orphans a grandchild (the shell exits at once, its `sleep` lives on), as a raylet that
# dies leaves its workers. Run in a process of its own so that pytest itself never becomes a subreaper.
ORPHANING = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from saikyo.scale import processes

    subreaper = sys.argv[1] == "1" and processes.become_subreaper()
    subprocess.run(["sh", "-c", "sleep 120 >/dev/null 2>&1 </dev/null & echo $! > " + sys.argv[2]], check=True)
    orphan = int(open(sys.argv[2]).read())
    time.sleep(0.2)
    found = orphan in processes.descendants(os.getpid())
    killed = processes.kill_all(os.getpid(), {}) if found else []
    print(json.dumps({"subreaper": subreaper, "orphan": orphan, "found": found, "killed": killed}))
    """
)


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.mark.parametrize("subreaper", [True, False], ids=["subreaper", "plain"])
def test_orphans_stay_descendants_only_of_a_subreaper(tmp_path: Path, subreaper: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", ORPHANING, "1" if subreaper else "0", str(tmp_path / "pid")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    orphan = result["orphan"]
    try:
        assert result["subreaper"] is subreaper
        assert result["found"] is subreaper  # a plain parent loses sight of it: it went to init
        if subreaper:
            assert result["killed"] == [orphan]
            deadline = time.monotonic() + 10
            while _alive(orphan) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(orphan)
        else:
            assert _alive(orphan)
    finally:
        if _alive(orphan):
            os.kill(orphan, 9)



def test_kill_session_ends_every_process_of_a_session_and_nothing_else() -> None:
    """What stops a node of a loopback Ray cluster (saikyo.bench.raycluster): its whole session."""
    proc = subprocess.Popen(["sh", "-c", "sleep 120 & sleep 120 & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(processes.in_session(proc.pid)) < 3:
        assert time.monotonic() < deadline, processes.in_session(proc.pid)
        time.sleep(0.05)
    members = processes.in_session(proc.pid)
    assert proc.pid in members and os.getpid() not in members
    assert set(processes.kill_session(proc.pid)) == set(members)
    proc.wait(10)
    assert processes.in_session(proc.pid) == {}
