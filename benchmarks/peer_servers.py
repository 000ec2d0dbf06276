"""The peers saikyo is measured against, started on a loopback port for one benchmark run.

A peer is "FRAMEWORK+ENGINE": flask, litserve, pytriton or bentoml (benchmarks/peers/FRAMEWORK_app.py) on
onnxruntime or openvino. Flask comes with saikyo's bench extra; the other three live in their own
environment, since their pins fight saikyo's and each other's less there:

    python -m venv .venv-peers && .venv-peers/bin/pip install -r benchmarks/peers/requirements.txt

Their Python is $SAIKYO_PEERS_PYTHON, else .venv-peers/bin/python, else this one. A peer is ready when its
framework's own readiness URL answers 200 (Flask has none: any answer at all); it is stopped with its
whole process group (LitServe, BentoML and Triton run worker processes of their own).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from saikyo.bench.localserver import ServerStartError, free_port

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "peers"
ENGINES = ("onnxruntime", "openvino")
# framework: (module it needs, readiness path or None for "any answer", the load generator's protocol)
FRAMEWORKS = {
    "flask": ("flask", None, "classify"),
    "litserve": ("litserve", "/health", "classify"),
    "pytriton": ("pytriton", "/v2/health/ready", "v2"),
    "bentoml": ("bentoml", "/readyz", "classify"),
}


def python() -> str:
    own = ROOT / ".venv-peers" / "bin" / "python"
    return os.environ.get("SAIKYO_PEERS_PYTHON") or (str(own) if own.exists() else sys.executable)


@functools.cache
def installed(framework: str, engine: str) -> bool:
    module = FRAMEWORKS[framework][0]
    probe = subprocess.run([python(), "-c", f"import {module}, {engine}"], capture_output=True)
    return probe.returncode == 0


def available(frameworks: list[str], say) -> list[str]:
    """FRAMEWORK+ENGINE for each asked framework and engine whose packages import in the peers' Python."""
    out = []
    for framework in frameworks:
        if framework not in FRAMEWORKS:
            raise SystemExit(f"unknown peer {framework!r}: one of {', '.join(FRAMEWORKS)}")
        for engine in ENGINES:
            if installed(framework, engine):
                out.append(f"{framework}+{engine}")
            else:
                say(f"no {framework}+{engine} peer: {python()} cannot import {FRAMEWORKS[framework][0]} and "
                    f"{engine} (pip install -r benchmarks/peers/requirements.txt)")  # fmt: skip
    return out


def protocol(peer: str) -> str:
    return FRAMEWORKS[peer.split("+")[0]][2]


@contextlib.contextmanager
def peer_server(model_dir: Path, peer: str, log_dir: Path, timeout: float = 300.0) -> Iterator[str]:
    """Start the peer on model_dir (its name in URLs: the directory's); yield its base URL once ready."""
    framework, engine = peer.split("+")
    _, ready_path, _ = FRAMEWORKS[framework]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_dir / f"peer-{framework}-{engine}-{port}.log", "wb") as log:
        proc = subprocess.Popen(
            [python(), str(APPS / f"{framework}_app.py"), str(model_dir), "--engine", engine, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url + (ready_path or "/"), any_answer=ready_path is None):
            if proc.poll() is not None:
                raise ServerStartError(f"{peer} exited with {proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"{peer} was not ready within {timeout:.0f}s; see {log.name}")
            time.sleep(0.25)
        yield url
    finally:
        _stop_group(proc)


def _ready(url: str, any_answer: bool) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200 or any_answer
    except urllib.error.HTTPError:
        return any_answer
    except (urllib.error.URLError, OSError):
        return False


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    # Its own session: the group is the peer and its workers only.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever outlived its parent's shutdown
    proc.wait(10)
