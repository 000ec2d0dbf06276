"""The real server as a subprocess on a free loopback port, for tests: the cost lab's own launcher."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from saikyo.bench.localserver import LocalServer, free_port, local_server, stop, wait_until_ready

ServerProcess = LocalServer

__all__ = ["ServerProcess", "free_port", "running_server", "stop", "wait_until_ready"]


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
