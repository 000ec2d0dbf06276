"""Model control without a restart (Triton's model repository extension) against real servers: a new
version takes over under load without one failed request, a failed load leaves the old version serving
and says why in the index, unload gives the memory back, poll follows the repository and survives a
failing version, control takes an admin key, a server with no model is not ready, names that do not
exist leave nothing behind, and a model given at start that cannot load stops the server."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.paths import CAT
from PIL import Image
from support.s3server import BUCKET, S3Server
from support.serverproc import ServerProcess, free_port, running_server, wait_for
from support.stress import rss_mib
from support.tinymodel import add_model, add_tiny_model, heavy_classifier, tiny_classifier

from saikyo.models.cache import ModelCache
from saikyo.models.repository import ModelRepository
from saikyo.models.s3 import S3Repository
from saikyo.settings import Settings

_CAT = CAT.read_bytes()
BROKEN = b"\x08\x07 this is not an ONNX file"
HEAVY_MB = 160


def infer(url: str, model: str = "tiny", version: str | None = None, **kw: object) -> httpx.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(_CAT).decode()]}]}
    return httpx.post(url + path, json=doc, timeout=60, **kw)  # type: ignore[arg-type]


def _gradient_png(side: int) -> bytes:
    ramp = np.add.outer(np.arange(side), np.arange(side)).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.stack([ramp, ramp.T, ramp // 2], -1)).save(out, "PNG")
    return out.getvalue()


def index(url: str, **kw: object) -> list[dict[str, str]]:
    r = httpx.post(f"{url}/v2/repository/index", timeout=30, **kw)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return r.json()


def row(rows: list[dict[str, str]], name: str, version: str) -> dict[str, str] | None:
    return next((r for r in rows if r["name"] == name and r["version"] == version), None)


def load(url: str, model: str, version: int | None = None, **kw: object) -> httpx.Response:
    body = {"parameters": {"version": str(version)}} if version else None
    return httpx.post(f"{url}/v2/repository/models/{model}/load", json=body, timeout=300, **kw)  # type: ignore[arg-type]


def publish(repo: ModelRepository, name: str, model: object, **meta: object) -> int:
    """Publish a generated model (or broken bytes) as the next version of `name`."""
    scratch = ModelRepository(repo.root.parent / f"scratch-{name}-{time.monotonic_ns()}")
    entry = add_model(scratch, name, model, family="Tiny")  # type: ignore[arg-type]
    return repo.publish(name, [entry.path], {**entry.meta, **meta})


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    r = ModelRepository(tmp_path / "repository")
    add_tiny_model(r, "tiny", seed=0)
    return r


@pytest.fixture
def explicit(repo: ModelRepository, tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(repo.root, "tiny", tmp_path / "logs", "--model-control", "explicit", "--max-batch-size", "4") as s:
        yield s


def test_a_new_version_takes_over_under_load_without_a_failed_request(explicit: ServerProcess, repo: ModelRepository) -> None:
    assert "model_repository" in httpx.get(f"{explicit.url}/v2", timeout=10).json()["extensions"]
    # Version 2 is heavier, so that it loads and warms up for a while as requests keep coming.
    publish(repo, "tiny", heavy_classifier(40, seed=1))
    big = _gradient_png(3000)
    statuses: Counter[int | str] = Counter()
    versions: dict[int, list[str]] = {n: [] for n in range(6)}  # per client, in its order
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    if n % 2:  # large images: the request spends a while decoding between picking and batching
                        images = [("images", (f"big{i}.png", big)) for i in range(4)]
                        r = http.post(f"{explicit.url}/classify?model=tiny", files=images)
                    else:
                        r = infer(explicit.url)
                        if r.status_code == 200:
                            versions[n].append(r.json()["model_version"])
                    statuses[r.status_code] += 1
                except httpx.HTTPError as exc:  # counted: a dropped connection is a failed request too
                    statuses[type(exc).__name__] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        answer = load(explicit.url, "tiny")
        deadline = time.monotonic() + 60
        recording = [versions[n] for n in versions if n % 2 == 0]
        while time.monotonic() < deadline and not all(v and v[-1] == "2" for v in recording):
            time.sleep(0.05)  # until every client has had an answer from the new version
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert answer.status_code == 200 and answer.json() == {"name": "tiny", "version": "2", "state": "READY"}
    assert set(statuses) == {200}, statuses  # not one request failed while the version switched
    for answered in recording:
        # Each client saw version 1, then version 2 from its first answer by it on: never back.
        assert answered[0] == "1" and answered[-1] == "2" and "1" not in answered[answered.index("2"):], answered
    rows = index(explicit.url)
    assert row(rows, "tiny", "2") == {"name": "tiny", "version": "2", "state": "READY", "reason": ""}
    assert row(rows, "tiny", "1") == {"name": "tiny", "version": "1"}  # in the repository, not loaded
    assert httpx.get(f"{explicit.url}/v2/models/tiny", timeout=10).json()["versions"] == ["2"]
    assert infer(explicit.url, version="2").status_code == 200
    gone = infer(explicit.url, version="1")
    assert gone.status_code == 404 and "loaded: ['2']" in gone.json()["error"]


def test_a_slow_upload_holds_no_version_until_its_body_is_read(explicit: ServerProcess, repo: ModelRepository) -> None:
    """The model is picked once the body is read: an upload still arriving while its version is replaced
    does not keep that version loaded, and is answered by the version that serves when it is complete."""
    publish(repo, "tiny", tiny_classifier(seed=1))
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(_CAT).decode()]}]}
    body = json.dumps(doc).encode()
    host, port = explicit.url.removeprefix("http://").split(":")
    head = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=120) as upload:
        upload.sendall(head + body[: len(body) // 2])
        assert infer(explicit.url).json()["model_version"] == "1"
        # Version 2 takes over and version 1 is unloaded while the upload is half sent: nothing holds it.
        assert load(explicit.url, "tiny").json() == {"name": "tiny", "version": "2", "state": "READY"}
        assert row(index(explicit.url), "tiny", "1") == {"name": "tiny", "version": "1"}
        upload.sendall(body[len(body) // 2 :])
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
            chunk = upload.recv(65536)
            assert chunk, data
            data += chunk
    status_line, _, _ = data.partition(b"\r\n")
    answer = json.loads(data.partition(b"\r\n\r\n")[2])
    assert b" 200 " in status_line, data
    assert answer["model_version"] == "2"


def _content_length(response: bytes) -> int:
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    return next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)


def test_a_failed_load_keeps_the_old_version_serving_and_the_index_says_why(
    explicit: ServerProcess, repo: ModelRepository
) -> None:
    publish(repo, "tiny", BROKEN)
    answer = load(explicit.url, "tiny")
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["error"] == "model 'tiny' version 2 failed to load; version 1 still serves"
    assert "unreadable" in body["detail"]["reason"] and str(repo.root) not in answer.text
    rows = index(explicit.url)
    assert row(rows, "tiny", "1")["state"] == "READY"  # type: ignore[index]
    failed = row(rows, "tiny", "2")
    assert failed is not None and failed["state"] == "UNAVAILABLE" and failed["reason"] == body["detail"]["reason"]
    assert infer(explicit.url).json()["model_version"] == "1"
    assert infer(explicit.url, version="2").status_code == 503
    assert httpx.get(f"{explicit.url}/v2/health/ready", timeout=10).status_code == 200
    # A good version after the failure loads and replaces both rows.
    publish(repo, "tiny", tiny_classifier(seed=2))
    assert load(explicit.url, "tiny").json()["version"] == "3"
    rows = index(explicit.url)
    assert row(rows, "tiny", "2") == {"name": "tiny", "version": "2"} and row(rows, "tiny", "3")["state"] == "READY"  # type: ignore[index]


def test_unload_and_version_switches_give_the_memory_back(explicit: ServerProcess, repo: ModelRepository) -> None:
    add_model(repo, "heavy", heavy_classifier(HEAVY_MB, seed=0))
    publish(repo, "heavy", heavy_classifier(HEAVY_MB, seed=1))
    pid = explicit.proc.pid
    before = rss_mib(pid)
    assert load(explicit.url, "heavy", version=1).status_code == 200
    loaded = rss_mib(pid)
    assert loaded - before > 0.8 * HEAVY_MB, (before, loaded)  # the weights are resident
    assert infer(explicit.url, "heavy").json()["model_version"] == "1"
    assert load(explicit.url, "heavy").json()["version"] == "2"  # version 1 unloaded once 2 took over
    switched = rss_mib(pid)
    # The old version's memory went back as the new one came in: one model's worth, not two.
    assert switched - loaded < 0.5 * (loaded - before), (before, loaded, switched)
    answer = httpx.post(f"{explicit.url}/v2/repository/models/heavy/unload", timeout=120)
    assert answer.status_code == 200 and answer.json()["reason"] == "unloaded"
    after = rss_mib(pid)
    assert loaded - after > 0.8 * HEAVY_MB, (before, loaded, switched, after)
    assert infer(explicit.url, "heavy").status_code == 404
    assert explicit.log().count("model heavy version 1 unloaded") == 1
    assert row(index(explicit.url), "heavy", "2") == {"name": "heavy", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert infer(explicit.url).status_code == 200  # the other model never noticed


def test_the_stock_triton_client_loads_and_unloads(explicit: ServerProcess, repo: ModelRepository) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(explicit.url.removeprefix("http://"))
    publish(repo, "tiny", tiny_classifier(seed=4))
    client.load_model("tiny")
    assert client.is_model_ready("tiny", "2") and not client.is_model_ready("tiny", "1")
    assert {"name": "tiny", "version": "2", "state": "READY", "reason": ""} in client.get_model_repository_index()
    client.unload_model("tiny")
    assert not client.is_model_ready("tiny")
    with pytest.raises(InferenceServerException, match="not in the model repository"):
        client.load_model("nothing")


def test_control_requests_that_cannot_be_done_are_named_4xx(explicit: ServerProcess, tiny_server: ServerProcess) -> None:
    url = explicit.url
    cases = [
        (load(url, "nothing"), 404, "not in the model repository"),
        (load(url, "tiny", version=9), 404, "no version 9"),
        (httpx.post(f"{url}/v2/repository/models/tiny/load", json={"parameters": {"version": "two"}}), 400, "positive integer"),
        (httpx.post(f"{url}/v2/repository/models/tiny/load", json={"parameters": {"config": "{}"}}), 400, "unsupported parameter"),
        (httpx.post(f"{url}/v2/repository/models/tiny/load", content=b"[1]"), 400, "JSON object"),
        (httpx.post(f"{url}/v2/repository/models/tiny/load", content=b"{" * 70_000), 413, "over"),
        (httpx.post(f"{url}/v2/repository/models/..%2f..%2fetc/load"), 404, ""),
        (httpx.post(f"{url}/v2/repository/models/nothing/unload"), 404, "not loaded"),
        # A server without model control says how to turn it on.
        (load(tiny_server.url, "tiny"), 400, "--model-control explicit"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (response.request.url, response.text)
        if message:
            assert message in response.json()["error"], response.text
    assert "model_repository" not in httpx.get(f"{tiny_server.url}/v2", timeout=10).json()["extensions"]
    assert infer(url).status_code == 200


def test_control_takes_an_admin_key_and_never_a_client_key(repo: ModelRepository, tmp_path: Path) -> None:
    client, admin = "client-key-5d1e9a", "admin-key-77c01f"
    paths = ("/v2/repository/models/tiny/load", "/v2/repository/models/tiny/unload", "/v2/repository/index")
    # Client keys only: model control is refused to everyone, the key holders included.
    with running_server(
        repo.root, "tiny", tmp_path / "logs", "--model-control", "explicit", env={"SAIKYO_API_KEYS": client},
    ) as server:  # fmt: skip
        for path in paths:
            r = httpx.post(server.url + path, headers={"Authorization": f"Bearer {client}"}, timeout=30)
            assert r.status_code == 403 and "SAIKYO_ADMIN_KEYS" in r.json()["error"] and client not in r.text, path
        assert infer(server.url, headers={"Authorization": f"Bearer {client}"}).status_code == 200
        assert "no admin key is set: client keys cannot load or unload models" in server.log()
    # Admin keys: control takes one; a client key is 403, none 401; the admin key also infers.
    with running_server(
        repo.root, "tiny", tmp_path / "logs2", "--model-control", "explicit",
        env={"SAIKYO_API_KEYS": client, "SAIKYO_ADMIN_KEYS": admin},
    ) as server:  # fmt: skip
        for path in paths:
            assert httpx.post(server.url + path, timeout=30).status_code == 401, path
            r = httpx.post(server.url + path, headers={"Authorization": f"Bearer {client}"}, timeout=30)
            assert r.status_code == 403 and "admin key" in r.json()["error"], path
        as_admin = {"Authorization": f"Bearer {admin}"}
        assert httpx.post(f"{server.url}/v2/repository/index", headers=as_admin, timeout=30).status_code == 200
        assert load(server.url, "tiny", headers=as_admin).status_code == 200
        assert infer(server.url, headers=as_admin).status_code == 200
        assert httpx.post(f"{server.url}/v2/repository/models/tiny/unload", headers=as_admin, timeout=60).status_code == 200
        assert admin not in server.log() and client not in server.log()
    # No key at all: control is open, and the start says so.
    with running_server(repo.root, "tiny", tmp_path / "logs3", "--model-control", "explicit") as server:
        assert "anyone who reaches this port can load and unload models" in server.log()


def test_the_index_is_not_served_without_model_control(tiny_server: ServerProcess) -> None:
    r = httpx.post(f"{tiny_server.url}/v2/repository/index", timeout=30)
    assert r.status_code == 400 and "--model-control explicit" in r.json()["error"], r.text


def test_anonymous_404s_do_not_list_the_models(repo: ModelRepository, tmp_path: Path) -> None:
    key = "client-key-0b33e1"
    with running_server(repo.root, "tiny", tmp_path / "logs", env={"SAIKYO_API_KEYS": key}) as server:
        anonymous = httpx.get(f"{server.url}/v2/models/nothing/ready", timeout=10)
        assert anonymous.status_code == 404 and "tiny" not in anonymous.text, anonymous.text
        # A caller with a key is told what there is.
        known = httpx.get(f"{server.url}/v2/models/nothing/ready", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert known.status_code == 404 and known.json()["detail"] == {"models": ["tiny"]}, known.text


def test_a_server_whose_models_are_all_unloaded_is_not_ready(explicit: ServerProcess) -> None:
    url = explicit.url
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    assert httpx.post(f"{url}/v2/repository/models/tiny/unload", timeout=60).status_code == 200
    assert infer(url).status_code == 404
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 400
    assert load(url, "tiny").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200


def test_names_that_do_not_exist_get_no_state(explicit: ServerProcess) -> None:
    """Unloading names the server never held, each 40 kB long, leaves its memory where it was (each
    name used to stay behind: about 40 MB for these 1,000)."""
    url, pid = explicit.url, explicit.proc.pid
    with httpx.Client(timeout=30) as client:
        for i in range(50):  # settle the allocator on this kind of request first
            client.post(f"{url}/v2/repository/models/warm{i:03d}{'w' * 40_000}/unload")
        before = rss_mib(pid)
        for i in range(1000):
            r = client.post(f"{url}/v2/repository/models/{i:04d}{'n' * 40_000}/unload")
            assert r.status_code == 400  # over 255 bytes: not a name, refused before any state
            assert client.post(f"{url}/v2/repository/models/{i:04d}{'n' * 200}/unload").status_code == 404
            assert client.post(f"{url}/v2/repository/models/{i:04d}{'n' * 200}/load").status_code == 404
    grown = rss_mib(pid) - before
    assert grown < 10, f"{grown:.1f} MiB more after 1,000 unknown names"
    assert infer(url).status_code == 200


def test_a_model_given_at_start_that_cannot_load_stops_the_server(repo: ModelRepository, tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "saikyo", "serve", "--port", str(free_port()), "--backend", "onnxruntime", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    for extra in ((), ("--workers", "2")):
        nowhere = serve("--repository", str(tmp_path / "nonexistent"), *extra)
        assert nowhere.returncode == 3, nowhere.stderr[-2000:]
        assert "is not exported in the repository" in nowhere.stderr and "--no-exit-on-error" in nowhere.stderr
    # A zoo model that was never exported, beside one that was.
    missing = serve("--repository", str(repo.root), "--models", "tiny,resnet50")
    assert missing.returncode == 3 and "resnet50" in missing.stderr, missing.stderr[-2000:]
    # --no-exit-on-error serves the rest.
    with running_server(repo.root, "tiny,resnet50", tmp_path / "logs", "--no-exit-on-error", wait_ready=False) as server:
        deadline = time.monotonic() + 60
        while "model resnet50 failed to load" not in server.log():
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        assert infer(server.url).status_code == 200
        assert server.proc.poll() is None


def test_ray_refuses_explicit_control_and_replicas_refuse_load_and_unload() -> None:
    from starlette.testclient import TestClient

    from saikyo.scale.ray import ReplicaMiddleware, deployment_options
    from saikyo.server import create_app

    with pytest.raises(ValueError, match="use poll"):
        deployment_options(Settings(model_control="explicit"))
    deployment_options(Settings(model_control="poll"))
    # A replica answers for itself only: a load would change one of them.
    app = create_app(Settings(model_control="poll", models=("nothing",)))
    client = TestClient(ReplicaMiddleware(app, metrics=None))  # type: ignore[arg-type]
    for action in ("load", "unload"):
        r = client.post(f"/v2/repository/models/tiny/{action}")
        assert r.status_code == 400 and "model-control poll" in r.json()["error"]


# ---- poll, against S3 ----
@pytest.mark.slow  # S3
def test_poll_follows_new_versions_and_survives_a_failing_one(
    tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    bucket = S3Repository(f"s3://{BUCKET}/poll", s3_server.url, ModelCache(tmp_path / "pusher-cache", 1 << 30))
    first = tiny_repository.get("tiny")
    bucket.publish("tiny", [first.path], first.meta)

    def push(model: object) -> int:
        entry = add_model(ModelRepository(tmp_path / f"scratch-{time.monotonic_ns()}"), "tiny", model)  # type: ignore[arg-type]
        return bucket.publish("tiny", [entry.path], entry.meta)

    args = ("--model-control", "poll", "--repository-poll-s", "0.3", "--s3-endpoint-url", s3_server.url,
            "--model-cache-dir", str(tmp_path / "cache"))  # fmt: skip
    with running_server(f"s3://{BUCKET}/poll", "tiny", tmp_path / "logs", *args, env=s3_server.env()) as server:  # type: ignore[arg-type]
        assert infer(server.url).json()["model_version"] == "1"
        # The same files and meta.json again: another version with the same digest is still new.
        assert bucket.publish("tiny", [first.path], first.meta) == 2
        wait_for("version 2 serves", lambda: infer(server.url).json()["model_version"] == "2", server)
        assert push(tiny_classifier(seed=5)) == 3
        wait_for("version 3 serves", lambda: infer(server.url).json()["model_version"] == "3", server)
        assert push(BROKEN) == 4
        wait_for("version 4 is reported failed", lambda: (row(index(server.url), "tiny", "4") or {}).get("state") == "UNAVAILABLE", server)
        assert infer(server.url).json()["model_version"] == "3"
        time.sleep(10 * 0.3)  # ten more polls: a failed version is not tried again
        assert server.log().count("model tiny version 4 failed to load") == 1
        assert push(tiny_classifier(seed=6)) == 5
        wait_for("version 5 serves after the failure", lambda: infer(server.url).json()["model_version"] == "5", server)
        assert server.log().count("model tiny version 3 unloaded") == 1  # replaced once, closed once
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200


def test_the_index_checks_its_body_and_filters_on_ready(explicit: ServerProcess) -> None:
    response = httpx.post(f"{explicit.url}/v2/repository/index", json={"ready": "yes"}, timeout=10)
    assert response.status_code == 400 and "ready" in response.json()["error"]
    ready_only = httpx.post(f"{explicit.url}/v2/repository/index", json={"ready": True}, timeout=10).json()
    assert ready_only and all(m["state"] == "READY" for m in ready_only)
