"""`saikyo serve` as a subprocess on a free loopback port: started, waited for, stopped (only it)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@contextlib.contextmanager
def local_server(
    repository: Path,
    models: str,
    log_dir: Path,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    wait_ready: bool = True,
) -> Iterator[LocalServer]:
    """Serve `models` from `repository` on 127.0.0.1:<free port>; ready (every model warmed up) on entry
    unless `wait_ready` is false (for tests that watch it start)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    cmd = [
        sys.executable, "-m", "saikyo", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--repository", str(repository), "--models", models, *args,
    ]  # fmt: skip
    # The server runs with the flags given and nothing else: SAIKYO_* settings in this environment
    # (batching, API keys, ...) would change what is measured without the record saying so.
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SAIKYO_")}
    with open(log_path, "wb") as log:
        # Its own session: a Ctrl-C at the terminal reaches us, and we stop the server in order.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**base_env, **(env or {})}, start_new_session=True
        )
    server = LocalServer(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        if wait_ready:
            wait_until_ready(server, timeout)
        yield server
    finally:
        stop(proc)


def wait_until_ready(server: LocalServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerStartError(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 400 while models load
        time.sleep(0.2)
    raise ServerStartError(f"server not ready after {timeout:.0f}s:\n{server.log_tail()}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
