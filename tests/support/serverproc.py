"""The real server as a subprocess on a free loopback port, for tests: the cost lab's own launcher."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from saikyo.bench.localserver import LocalServer, free_port, local_server, stop, wait_until_ready

ServerProcess = LocalServer

__all__ = ["ServerProcess", "free_port", "running_server", "stop", "wait_for", "wait_until_ready"]


@contextlib.contextmanager
def running_server(
    repository: Path,
    models: str,
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 180.0,
) -> Iterator[ServerProcess]:
    """The suite's servers run ONNX Runtime unless a test names a backend: the default, auto, depends on
    the machine's CPU (OpenVINO where it computes bf16 natively), and the fault models fail the way ONNX
    Runtime fails. tests/test_openvino.py starts servers on OpenVINO and one with the default."""
    if "--backend" not in args:
        args = ("--backend", "onnxruntime", *args)
    with local_server(repository, models, log_dir, args, env=env, timeout=timeout, wait_ready=wait_ready) as server:
        yield server


def wait_for(what: str, check: Callable[[], object], server: ServerProcess, timeout: float = 60.0) -> None:
    """Poll `check` until it is true; else fail saying `what` did not happen, with the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout:.0f} s:\n{server.log_tail()}")
