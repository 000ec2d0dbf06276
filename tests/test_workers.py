"""`saikyo serve --workers N` on loopback: every worker answers, connections are balanced, one /metrics
and one readiness cover them all, limits apply per worker, a killed worker is replaced under load,
SIGTERM drains every worker and the supervisor exits 0, a worker that cannot start is not retried
forever. Plus the pure parts: worker counts, thread shares, GPU assignment."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.paths import CAT
from prometheus_client.parser import text_string_to_metric_families
from support.serverproc import ServerProcess, free_port, running_server, wait_until_ready
from support.tinymodel import add_model, add_tiny_model, tiny_classifier

from saikyo.models.repository import ModelRepository
from saikyo.scale.workers.board import WorkerBoard, WorkerState
from saikyo.scale.workers.supervisor import (
    assign_devices,
    auto_workers,
    serves_on_gpu,
    visible_gpus,
    worker_count,
    worker_specs,
)
from saikyo.settings import Settings, available_cores

_CAT = CAT.read_bytes()
WORKER_HEADER = "x-saikyo-worker"


# ---- the pure parts ----
@pytest.mark.parametrize("gpus", [1, 2, 8])
@pytest.mark.parametrize("workers", [1, 2, 3, 8, 16])
def test_workers_spread_over_the_gpus_one_device_each(gpus: int, workers: int) -> None:
    names = [str(i) for i in range(gpus)]
    devices = assign_devices(workers, names)
    assert len(devices) == workers and all(d in names for d in devices)  # one device each
    per_gpu = Counter(devices)
    # As even as can be: every GPU is used once there are enough workers, and none gets two more.
    assert len(per_gpu) == min(gpus, workers)
    assert max(per_gpu.values()) - min(per_gpu.values()) <= 1
    if gpus == 1:
        assert set(devices) == {"0"}  # one GPU: all share it


def test_no_gpu_leaves_the_device_environment_alone() -> None:
    assert assign_devices(3, []) == [None, None, None]


def test_visible_gpus_from_the_environment_or_the_driver(tmp_path: Path) -> None:
    driver = tmp_path / "gpus"
    driver.mkdir()
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (driver / bus).mkdir()
    assert visible_gpus({}, driver) == ["0", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 1"}, driver) == ["3", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, driver) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}, driver) == ["2"]  # CUDA stops at an invalid one
    assert visible_gpus({}, tmp_path / "no-driver") == []


def test_auto_picks_from_the_cores_and_the_backend() -> None:
    assert [auto_workers(c, 0, on_gpu=False) for c in (1, 2, 4, 16, 64)] == [1, 2, 4, 8, 8]
    assert auto_workers(16, 1, on_gpu=True) == 2
    assert auto_workers(96, 8, on_gpu=True) == 16
    assert auto_workers(2, 1, on_gpu=True) == 1  # two cores per worker at least
    assert not serves_on_gpu(Settings(device="cpu", backend="torch"), gpus=1)
    assert not serves_on_gpu(Settings(backend="onnxruntime"), gpus=1)  # its default build has no CUDA provider
    assert serves_on_gpu(Settings(), gpus=1)  # backend auto picks torch where CUDA is
    assert not serves_on_gpu(Settings(backend="openvino"), gpus=1)  # a CPU backend
    assert serves_on_gpu(Settings(backend="torch"), gpus=1) and serves_on_gpu(Settings(device="cuda"), gpus=2)
    assert not serves_on_gpu(Settings(backend="torch"), gpus=0)
    assert worker_count(Settings(workers="auto"), cores=4, gpus=[]) == 4
    assert worker_count(Settings(workers="auto", backend="torch"), cores=16, gpus=["0", "1"]) == 4
    assert worker_count(Settings(workers="3"), cores=1, gpus=[]) == 3


def test_each_worker_gets_its_share_of_the_cores(tmp_path: Path) -> None:
    specs = worker_specs(Settings(), 4, tmp_path, cores=16, gpus=[])
    assert [s.slot for s in specs] == [0, 1, 2, 3]
    for s in specs:
        assert s.settings.resolved_intra_op_threads() == 4 and s.settings.resolved_decode_threads() == 4
        assert s.cuda_visible_devices is None and s.directory == tmp_path
    # Never below one thread; what the user set is kept.
    (one,) = {s.settings.resolved_intra_op_threads() for s in worker_specs(Settings(), 3, tmp_path, cores=2, gpus=[])}
    assert one == 1
    pinned = worker_specs(Settings(intra_op_threads=6), 2, tmp_path, cores=16, gpus=[])[0].settings
    assert (pinned.resolved_intra_op_threads(), pinned.resolved_decode_threads()) == (6, 8)
    on_gpus = worker_specs(Settings(backend="torch"), 4, tmp_path, cores=16, gpus=["0", "1"])
    assert [s.cuda_visible_devices for s in on_gpus] == ["0", "1", "0", "1"]
    on_cpu = worker_specs(Settings(device="cpu", backend="torch"), 2, tmp_path, cores=16, gpus=["0", "1"])
    assert [s.cuda_visible_devices for s in on_cpu] == [None, None]


def test_the_board_says_which_workers_are_not_ready(tmp_path: Path) -> None:
    board = WorkerBoard.create(tmp_path, 3)
    other = WorkerBoard.open(tmp_path)  # another process's view of the same memory
    try:
        assert other.workers == 3 and other.not_ready() == {"0": "down", "1": "down", "2": "down"}
        for slot in range(3):
            board.start(slot, pid=1000 + slot)
        board.set_state(0, WorkerState.SERVING)
        board.set_ready(0, True)
        board.set_state(1, WorkerState.SERVING)  # a model failed: serving, not ready
        board.add_connections(0, 2)
        board.count_replaced()
        assert other.not_ready() == {"1": "not ready", "2": "starting"}
        assert (other.connections(0), other.pid(2), other.replaced) == (2, 1002, 1)
        board.set_state(0, WorkerState.DRAINING)
        assert other.not_ready()["0"] == "draining"
    finally:
        other.close()
        board.close()


@pytest.mark.parametrize("value", ["0", "two", "-1", ""])
def test_a_bad_worker_count_says_which_setting(value: str) -> None:
    with pytest.raises(ValueError, match="'workers'"):
        Settings.from_env({"SAIKYO_WORKERS": value})


def test_workers_with_the_ray_engine_is_a_usage_error(tiny_repository: ModelRepository) -> None:
    from typer.testing import CliRunner

    from saikyo.cli import app

    args = ["serve", "--engine", "ray", "--workers", "2", "--repository", str(tiny_repository.root), "--models", "tiny"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--replicas" in result.output


def test_a_port_in_use_fails_at_once_with_the_address(tiny_repository: ModelRepository) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "saikyo", "serve", "--workers", "2", "--port", str(port),
             "--repository", str(tiny_repository.root), "--models", "tiny"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


# ---- a real server with two workers ----
@pytest.fixture(scope="module")
def two_workers(slow_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(slow_repository.root, "tiny", tmp_path_factory.mktemp("logs"), "--workers", "2") as server:
        yield server


def worker_of(response: httpx.Response | http.client.HTTPResponse) -> tuple[str, int]:
    slot, pid = (response.headers if isinstance(response, httpx.Response) else dict(response.getheaders()))[
        WORKER_HEADER
    ].split()
    return slot, int(pid.removeprefix("pid="))


def worker_pids(url: str) -> dict[str, int]:
    """{slot: pid} of every worker, from connections held open one after another (each goes to the
    worker holding fewer)."""
    host, port = url.removeprefix("http://").split(":")
    conns, pids = [], {}
    try:
        while len(pids) < 2 and len(conns) < 8:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", "/v2/health/live")
            response = conn.getresponse()
            response.read()
            conns.append(conn)
            pids.update([worker_of(response)])
    finally:
        for conn in conns:
            conn.close()
    return pids


def classify(url: str, images: int = 1, model: str = "tiny", timeout: float = 60) -> httpx.Response:
    files = [("images", (f"cat{i}.jpg", _CAT, "image/jpeg")) for i in range(images)]
    return httpx.post(f"{url}/classify", params={"model": model}, files=files, timeout=timeout)


def samples(text: str, name: str) -> dict[frozenset, float]:
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_both_workers_answer_and_connections_are_balanced(two_workers: ServerProcess) -> None:
    host, port = two_workers.url.removeprefix("http://").split(":")
    # Eight keep-alive connections, opened one after another: each goes to the worker holding fewer.
    conns, seen = [], []
    try:
        for _ in range(8):
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", "/v2/health/live")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            conns.append(conn)
            seen.append(worker_of(response))
    finally:
        for conn in conns:
            conn.close()
    per_worker = Counter(slot for slot, _ in seen)
    pids = {pid for _, pid in seen}
    assert set(per_worker) == {"0", "1"} and len(pids) == 2, seen
    assert two_workers.proc.pid not in pids  # workers are processes of their own, not the supervisor
    assert min(per_worker.values()) >= 3, per_worker  # left to the kernel, often 8 and 0


def test_one_scrape_counts_the_requests_of_both_workers(two_workers: ServerProcess) -> None:
    url = two_workers.url
    before = Counter()
    for key, value in samples(httpx.get(f"{url}/metrics").text, "saikyo_http_requests_total").items():
        labels = dict(key)
        if labels["route"] == "/classify" and labels["status"] == "200":
            before[labels["worker"]] += value
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: classify(url), range(24)))
    assert {r.status_code for r in responses} == {200}
    answered = Counter(worker_of(r)[0] for r in responses)
    assert set(answered) == {"0", "1"}, answered
    # Workers publish every second: soon one scrape, whichever worker answers it, has both counts.
    deadline = time.monotonic() + 20
    while True:
        scrape = httpx.get(f"{url}/metrics")
        counted = Counter()
        for key, value in samples(scrape.text, "saikyo_http_requests_total").items():
            labels = dict(key)
            if labels["route"] == "/classify" and labels["status"] == "200" and labels["model"] == "tiny":
                counted[labels["worker"]] += value
        if counted == before + answered:
            break
        assert time.monotonic() < deadline, (counted, before, answered)
        time.sleep(0.3)
    workers = {dict(k)["state"]: v for k, v in samples(scrape.text, "saikyo_workers").items()}
    assert workers["serving"] == 2 and workers["starting"] == 0
    assert samples(scrape.text, "saikyo_workers_replaced_total") == {frozenset(): 0.0}  # one value, no label
    # Per-process families carry the worker label.
    assert {dict(k)["worker"] for k in samples(scrape.text, "process_cpu_seconds_total")} == {"0", "1"}


def test_each_worker_runs_its_share_of_the_threads(two_workers: ServerProcess) -> None:
    share = max(1, available_cores() // 2)
    for _ in range(4):  # both workers, whichever answers
        meta = httpx.get(f"{two_workers.url}/v2/models/tiny").json()["parameters"]
        assert (meta["intra_op_threads"], meta["decode_threads"], meta["workers"]) == (share, share, 2)
    log = two_workers.log()
    assert f"with 2 workers, each with {share} intra-op and {share} decode threads" in log
    for slot in (0, 1):
        assert f"worker {slot} saikyo.scale.workers.worker: pid " in log
        assert f"{share} intra-op and {share} decode threads" in log


def test_the_limits_are_per_worker(slow_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="images"; filename="c.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + _CAT + b"\r\n--b--\r\n"
    )

    def hold(url: str) -> http.client.HTTPConnection:
        """A request whose body is still arriving: in flight until finish()."""
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/classify")
        conn.putheader("Content-Type", "multipart/form-data; boundary=b")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body[:100])
        return conn

    def finish(conn: http.client.HTTPConnection) -> tuple[int, str]:
        conn.send(body[100:])
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status, worker_of(response)[0]

    with running_server(
        slow_repository.root, "tiny", tmp_path_factory.mktemp("logs"), "--workers", "2", "--max-concurrent-requests", "1"
    ) as server:  # fmt: skip
        # Two held requests, one on each worker (a connection goes to the worker holding fewer; right
        # after start-up a readiness probe's connection may still count, hence another try).
        for _ in range(3):
            held = [hold(server.url) for _ in range(2)]
            # Once both are admitted, a third request finds each worker at its limit.
            deadline = time.monotonic() + 5
            while (third := classify(server.url)).status_code == 200 and time.monotonic() < deadline:
                pass
            answers = sorted(finish(conn) for conn in held)
            if third.status_code == 503:
                break
        assert third.status_code == 503, third.text
        assert third.json()["detail"] == {"in_flight": 1, "limit": 1}
        assert answers == [(200, "0"), (200, "1")]  # one process with the same limit would take one


def test_a_killed_worker_is_replaced_while_the_load_goes_on(
    slow_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_server(slow_repository.root, "tiny", tmp_path_factory.mktemp("logs"), "--workers", "2") as server:
        url = server.url
        victim = worker_pids(url)["1"]
        outcomes: list[str] = []

        def client() -> None:
            for _ in range(30):  # a new connection per request: only requests in flight can be cut off
                try:
                    outcomes.append(str(classify(url, timeout=30).status_code))
                except httpx.TransportError as exc:
                    outcomes.append(type(exc).__name__)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(client) for _ in range(8)]
            deadline = time.monotonic() + 60
            while len(outcomes) < 40:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(victim, signal.SIGKILL)
            for f in clients:
                f.result()
        counts = Counter(outcomes)
        failed = {k: v for k, v in counts.items() if k != "200"}
        # At worst the requests in flight on the killed worker fail, as connection errors (no HTTP
        # status): 8 clients, so at most 8. Every other request is answered.
        assert sum(failed.values()) <= 8 and not any(k.isdigit() for k in failed), counts
        assert len(outcomes) == 8 * 30
        # The replacement loads, then serves, and readiness (which was false without it) returns.
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        replacement = worker_pids(url)
        assert set(replacement) == {"0", "1"} and replacement["1"] != victim
        deadline = time.monotonic() + 20
        while samples(httpx.get(f"{url}/metrics").text, "saikyo_workers_replaced_total") != {frozenset(): 1.0}:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert f"worker 1 (pid {victim}) exited with signal SIGKILL after it served (1 in a row)" in server.log()
        print(f"\nkill -9 of worker 1 under load: {dict(counts)}")


def test_readiness_waits_for_every_worker(slow_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> None:
    with running_server(slow_repository.root, "tiny", tmp_path_factory.mktemp("logs"), "--workers", "2") as server:
        url = server.url
        os.kill(worker_pids(url)["0"], signal.SIGKILL)
        # Worker 1 is ready itself, and says not ready until worker 0's replacement is.
        deadline = time.monotonic() + 60
        while True:
            r = httpx.get(f"{url}/v2/health/ready")
            if r.status_code == 400:
                break
            assert time.monotonic() < deadline
        assert worker_of(r)[0] == "1"
        assert r.json()["detail"]["workers"]["0"] in ("down", "starting")
        while httpx.get(f"{url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)


def _admitted(url: str, model: str) -> float:
    """Images queued, running or done for `model`, summed over every worker."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        value
        for name in ("saikyo_images_total", "saikyo_queue_images", "saikyo_running_images")
        for key, value in samples(text, name).items()
        if dict(key).get("model") == model
    )


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    slow_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_server(
        slow_repository.root, "slow", tmp_path_factory.mktemp("logs"), "--workers", "2", "--max-batch-size", "4",
        "--max-queue-images", "512",
    ) as server:  # fmt: skip
        host, port = server.url.removeprefix("http://").split(":")
        body = b"".join(
            b'--b\r\nContent-Disposition: form-data; name="images"; filename="c.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + _CAT + b"\r\n"
            for _ in range(32)
        ) + b"--b--\r\n"
        conns = []
        for _ in range(12):
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            conn.request("POST", "/classify?model=slow", body, {"Content-Type": "multipart/form-data; boundary=b"})
            conns.append(conn)
        deadline = time.monotonic() + 60
        while _admitted(server.url, "slow") < 12 * 32:  # every request accepted, by one worker or the other
            assert time.monotonic() < deadline
            time.sleep(0.1)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        answered, finished = Counter(), []
        for conn in conns:
            response = conn.getresponse()
            payload = json.loads(response.read())
            finished.append(time.monotonic())
            assert response.status == 200 and len(payload) == 32, payload
            answered[worker_of(response)[0]] += 1
            conn.close()
        assert server.proc.wait(60) == 0, server.log_tail()
        assert set(answered) == {"0", "1"}, answered
        assert max(finished) > signalled + 0.2  # the work really was in flight at the signal
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/v2/health/live", timeout=2)
        log = server.log()
        assert "SIGTERM: draining every worker" in log and "Traceback" not in log
        print(f"\ndrain: 12 requests x 32 images in flight at SIGTERM over 2 workers {dict(answered)}; all 200, "
              f"last {max(finished) - signalled:.2f} s after the signal; exit status 0")  # fmt: skip


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except OSError:
        return False


def test_workers_whose_supervisor_dies_drain_and_exit(
    slow_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_server(slow_repository.root, "tiny", tmp_path_factory.mktemp("logs"), "--workers", "2") as server:
        pids = worker_pids(server.url)
        assert all(_running(pid) for pid in pids.values())
        server.proc.kill()
        server.proc.wait(10)
        deadline = time.monotonic() + 60
        while any(_running(pid) for pid in pids.values()):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        assert server.log().count("the supervisor is gone: draining") == 2


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_workers_that_cannot_start_make_the_supervisor_give_up(
    slow_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every worker dies before its models load (killed on sight here, as an out-of-memory kill would):
    the supervisor retries with a back-off, then exits 1 saying so, instead of restarting forever."""
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs /proc/<pid>/task/<pid>/children to find the workers")
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    with open(logs / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saikyo", "serve", "--workers", "2", "--port", str(port),
             "--repository", str(slow_repository.root), "--models", "tiny"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None:
            assert time.monotonic() < deadline, (logs / "server.log").read_text()
            for child in set(_children(proc.pid)) - killed:
                if _is_worker(child):  # not multiprocessing's resource tracker, the other child
                    os.kill(child, signal.SIGKILL)
                    killed.add(child)
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = (logs / "server.log").read_text()
    assert proc.returncode == 1, text
    assert "no worker could start" in text and "3 times in a row" in text
    assert len(killed) == 6  # two slots, three tries each
    assert "retrying in 0.5 s" in text and "retrying in 1.0 s" in text


# ---- model control across workers, frozen and crashing workers ----
def _one_connection_per_worker(url: str) -> dict[str, http.client.HTTPConnection]:
    """A kept-alive connection to each of the two workers (each new connection goes to the worker
    holding fewer; the extra ones are closed)."""
    host, port = url.removeprefix("http://").split(":")
    held: dict[str, http.client.HTTPConnection] = {}
    extra = []
    try:
        while len(held) < 2 and len(extra) < 8:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("GET", "/v2/health/live")
            response = conn.getresponse()
            response.read()
            slot = worker_of(response)[0]
            (extra.append(conn) if slot in held else held.__setitem__(slot, conn))
    finally:
        for conn in extra:
            conn.close()
    assert set(held) == {"0", "1"}, held
    return held


def _infer_on(conn: http.client.HTTPConnection, model: str) -> tuple[int, dict]:
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(_CAT).decode()]}]}
    conn.request("POST", f"/v2/models/{model}/infer", json.dumps(doc), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def _every_worker_answers(url: str, model: str) -> dict[str, tuple[int, str | None]]:
    """{slot: (status, model_version)} of one request to `model` on each worker."""
    conns = _one_connection_per_worker(url)
    try:
        out = {}
        for slot, conn in conns.items():
            status, body = _infer_on(conn, model)
            out[slot] = (status, body.get("model_version"))
        return out
    finally:
        for conn in conns.values():
            conn.close()


@pytest.fixture
def versioned(tmp_path: Path) -> ModelRepository:
    """tiny with versions 1 and 2, and another model beside it."""
    repo = ModelRepository(tmp_path / "repository")
    add_tiny_model(repo, "tiny", seed=0)
    scratch = ModelRepository(tmp_path / "scratch")
    second = add_model(scratch, "tiny", tiny_classifier(seed=3), family="Tiny")
    assert repo.publish("tiny", [second.path], second.meta) == 2
    add_tiny_model(repo, "other", seed=1)
    return repo


@pytest.mark.slow
def test_load_and_unload_reach_every_worker_and_a_replacement(versioned: ModelRepository, tmp_path: Path) -> None:
    with running_server(versioned.root, "tiny,other", tmp_path / "logs", "--workers", "2", "--model-control", "explicit") as server:
        url = server.url
        assert _every_worker_answers(url, "tiny") == {"0": (200, "2"), "1": (200, "2")}
        r = httpx.post(f"{url}/v2/repository/models/tiny/unload", timeout=120)
        assert r.status_code == 200, r.text
        assert _every_worker_answers(url, "tiny") == {"0": (404, None), "1": (404, None)}
        r = httpx.post(f"{url}/v2/repository/models/tiny/load", json={"parameters": {"version": "1"}}, timeout=120)
        assert r.status_code == 200 and r.json()["version"] == "1", r.text
        assert _every_worker_answers(url, "tiny") == {"0": (200, "1"), "1": (200, "1")}
        assert httpx.post(f"{url}/v2/repository/models/other/unload", timeout=120).status_code == 200
        # A replacement comes up with what was decided, not with what the server was started with.
        victim = worker_pids(url)["1"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while worker_pids(url).get("1") in (None, victim) or httpx.get(f"{url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        assert _every_worker_answers(url, "tiny") == {"0": (200, "1"), "1": (200, "1")}
        assert _every_worker_answers(url, "other") == {"0": (404, None), "1": (404, None)}


@pytest.mark.slow
def test_poll_decides_once_for_every_worker_and_unloaded_stays_unloaded(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repository")
    add_tiny_model(repo, "tiny", seed=0)
    add_tiny_model(repo, "other", seed=1)
    args = ("--workers", "2", "--model-control", "poll", "--repository-poll-s", "0.3")
    with running_server(repo.root, "tiny,other", tmp_path / "logs", *args) as server:
        url = server.url
        second = add_model(ModelRepository(tmp_path / "scratch"), "tiny", tiny_classifier(seed=3), family="Tiny")
        assert repo.publish("tiny", [second.path], second.meta) == 2
        deadline = time.monotonic() + 60
        while _every_worker_answers(url, "tiny") != {"0": (200, "2"), "1": (200, "2")}:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.3)
        assert server.log().count("poll: tiny version 2") == 1  # one worker looked and loaded, for both
        assert httpx.post(f"{url}/v2/repository/models/other/unload", timeout=120).status_code == 200
        time.sleep(10 * 0.3)  # ten polls: an unloaded model is not loaded again
        assert _every_worker_answers(url, "other") == {"0": (404, None), "1": (404, None)}
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200  # tiny serves on both


@pytest.mark.slow
def test_a_frozen_worker_is_noticed_killed_and_replaced(slow_repository: ModelRepository, tmp_path: Path) -> None:
    args = ("--workers", "2", "--heartbeat-timeout-s", "2")
    with running_server(slow_repository.root, "tiny", tmp_path / "logs", *args) as server:
        url = server.url
        frozen = worker_pids(url)["1"]
        os.kill(frozen, signal.SIGSTOP)
        try:
            # Meanwhile worker 0 says the server is not ready, naming worker 1.
            deadline = time.monotonic() + 30
            while (r := httpx.get(f"{url}/v2/health/ready", timeout=10)).status_code == 200:
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.1)
            # "not ready": a loaded machine's poll may first see the replacement, up and still loading.
            assert r.json()["detail"]["workers"]["1"] in ("not answering", "down", "starting", "not ready"), r.text
            deadline = time.monotonic() + 120
            while _running(frozen) or worker_pids(url).get("1") in (None, frozen):
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.2)
        finally:
            if _running(frozen):
                os.kill(frozen, signal.SIGKILL)
        wait_until_ready(server, timeout=120)
        assert f"worker 1 (pid {frozen}) has not answered for" in server.log()
        deadline = time.monotonic() + 20
        while samples(httpx.get(f"{url}/metrics").text, "saikyo_workers_replaced_total") != {frozenset(): 1.0}:
            assert time.monotonic() < deadline
            time.sleep(0.2)


@pytest.mark.slow
def test_a_worker_that_crashes_after_serving_is_replaced_with_a_backoff(slow_repository: ModelRepository, tmp_path: Path) -> None:
    with running_server(slow_repository.root, "tiny", tmp_path / "logs", "--workers", "2") as server:
        victims = []
        for _ in range(2):
            victim = worker_pids(server.url)["1"]
            victims.append(victim)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while worker_pids(server.url).get("1") in (None, victim):
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.2)
        log = server.log()
        assert f"worker 1 (pid {victims[0]}) exited with signal SIGKILL after it served (1 in a row); replacing it in 0.5 s" in log
        assert f"worker 1 (pid {victims[1]}) exited with signal SIGKILL after it served (2 in a row); replacing it in 1.0 s" in log


@pytest.mark.slow
def test_a_control_call_names_the_workers_that_did_not_apply_it(versioned: ModelRepository, tmp_path: Path) -> None:
    args = ("--workers", "2", "--model-control", "explicit", "--control-timeout-s", "2", "--heartbeat-timeout-s", "120")
    with running_server(versioned.root, "tiny,other", tmp_path / "logs", *args) as server:
        stuck = worker_pids(server.url)["1"]
        os.kill(stuck, signal.SIGSTOP)
        try:
            r = httpx.post(f"{server.url}/v2/repository/models/other/unload", timeout=60)
        finally:
            os.kill(stuck, signal.SIGCONT)
        assert worker_of(r)[0] == "0"
        assert r.status_code == 503 and r.json()["detail"] == {"workers": {"1": "did not apply it within 2 s"}}, r.text
        # Once it runs again it catches up.
        deadline = time.monotonic() + 60
        while _every_worker_answers(server.url, "other") != {"0": (404, None), "1": (404, None)}:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
