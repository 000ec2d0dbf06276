"""The 2018 /classify contract against a real server on a loopback port."""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess

import httpx
import pytest
from support.paths import CAT, CAT_CLASSES, DATA, ROOT

PHOTOS = [DATA / "cat.jpg", DATA / "coffee.jpg", DATA / "astronaut.jpg"]


def post(url: str, *paths, params: dict | None = None) -> httpx.Response:
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return httpx.post(f"{url}/classify", files=files, params=params, timeout=60)


def assert_seed_shape(obj: dict, k: int = 5) -> None:
    assert len(obj) == k
    assert all(re.fullmatch(r"\d+", key) for key in obj)
    values = list(obj.values())
    assert values == sorted(values, reverse=True)
    assert all(0.0 <= v <= 1.0 for v in values)


def test_literal_2018_curl_returns_the_cats_top5(pretrained_server) -> None:
    cmd = f"curl -sS -X POST -F images=@tests/data/cat.jpg {pretrained_server.url}/classify"
    out = subprocess.run(cmd.split(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    body = json.loads(out)
    assert isinstance(body, list) and len(body) == 1
    assert_seed_shape(body[0])
    top = [int(k) for k in body[0]]
    assert top[0] in CAT_CLASSES
    assert sum(v for k, v in body[0].items() if int(k) in CAT_CLASSES) > 0.8


def test_several_images_come_back_in_request_order(pretrained_server) -> None:
    singles = [post(pretrained_server.url, p).json()[0] for p in PHOTOS]
    order = [PHOTOS[1], PHOTOS[0], PHOTOS[2], PHOTOS[0]]
    many = post(pretrained_server.url, *order).json()
    assert len(many) == 4
    for path, got in zip(order, many):
        want = singles[PHOTOS.index(path)]
        assert list(got) == list(want)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_labels_and_topk_options(pretrained_server) -> None:
    body = post(pretrained_server.url, CAT, params={"labels": "true", "topk": 3}).json()[0]
    assert len(body) == 3
    first = next(iter(body))
    index, label = first.split(":", 1)
    assert int(index) in CAT_CLASSES and label in {"tabby", "tiger cat", "Egyptian cat"}
    everything = post(pretrained_server.url, CAT, params={"topk": 1000}).json()[0]
    assert len(everything) == 1000
    assert sum(everything.values()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"files": [("photos", ("cat.jpg", b"\xff\xd8", "image/jpeg"))]}, 400, "no 'images' field"),
        ({"files": [("images", ("notes.txt", b"just some text", "text/plain"))]}, 400, "notes.txt"),
        ({"files": [("images", ("empty.jpg", b"", "image/jpeg"))]}, 400, "empty"),
        ({"files": [("images", ("cut.jpg", CAT.read_bytes()[:2000], "image/jpeg"))]}, 400, "cut.jpg"),
        ({"params": {"model": "alexnet"}, "files": [("images", ("c.jpg", b"x", "image/jpeg"))]}, 404, "unknown model"),
        ({"params": {"topk": 0}, "files": [("images", ("c.jpg", b"x", "image/jpeg"))]}, 400, "topk"),
        ({"params": {"topk": "many"}, "files": [("images", ("c.jpg", b"x", "image/jpeg"))]}, 400, "topk"),
        ({"content": b"images=cat", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415, "multipart"),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, ""),
    ],
)
def test_documented_errors_are_json_and_the_server_keeps_serving(tiny_server, kwargs, status, needle) -> None:
    r = httpx.post(f"{tiny_server.url}/classify", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str) and needle in json.dumps(body)
    ok = post(tiny_server.url, CAT)
    assert ok.status_code == 200 and len(ok.json()) == 1


def test_second_model_by_name_and_unknown_route(tiny_server) -> None:
    a = post(tiny_server.url, CAT).json()[0]
    b = post(tiny_server.url, CAT, params={"model": "tiny2"}).json()[0]
    assert a != b  # different networks, different answers
    r = httpx.get(f"{tiny_server.url}/no/such/route")
    assert r.status_code == 404 and r.json() == {"error": "not found"}


def test_many_concurrent_requests_share_batches(slow_repository, tmp_path_factory) -> None:
    """Every concurrent request gets its own image's answer; the server ran batches larger than one.

    The model takes milliseconds per image so that requests arrive while a batch runs, as under real load
    (a microsecond model would finish each batch before the next request lands)."""
    from support.serverproc import running_server

    singles = {}
    with running_server(
        slow_repository.root, "slow", tmp_path_factory.mktemp("logs"), "--log-level", "debug", "--max-batch-size", "16",
    ) as server:  # fmt: skip
        for p in PHOTOS:
            singles[p] = post(server.url, p).json()[0]
        jobs = [PHOTOS[i % 3] for i in range(48)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda p: (p, post(server.url, p, p)), jobs))
        log = server.log()
    for path, response in answers:
        assert response.status_code == 200
        for got in response.json():
            assert list(got) == list(singles[path])
            assert got == pytest.approx(singles[path], rel=1e-4, abs=1e-6)
    sizes = [int(s) for s in re.findall(r"ran batch of (\d+)", log)]
    assert sizes and max(sizes) > 2 and max(sizes) <= 16, sizes


def test_readiness_waits_for_models_and_liveness_does_not(tmp_path_factory, tiny_repository) -> None:
    from support.serverproc import running_server

    with running_server(tiny_repository.root, "tiny,resnet50", tmp_path_factory.mktemp("logs"),
                        "--no-exit-on-error", wait_ready=False) as server:  # fmt: skip
        import time

        deadline = time.monotonic() + 60
        while True:
            try:
                live = httpx.get(f"{server.url}/v2/health/live", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.proc.poll() is None, server.log()
                time.sleep(0.2)
        assert live.status_code == 200
        while True:  # resnet50 is not in the repository: its load fails, tiny's succeeds
            ready = httpx.get(f"{server.url}/v2/health/ready", timeout=2)
            states = ready.json().get("detail", {}) if ready.status_code == 400 else {}
            if states.get("resnet50") == "failed" and states.get("tiny") == "ready":
                break
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.2)
        assert ready.status_code == 400
        assert ready.json()["detail"]["resnet50"] == "failed"
        # The model that loaded keeps serving; the broken one says why.
        assert post(server.url, CAT).status_code == 200
        r = post(server.url, CAT, params={"model": "resnet50"})
        assert r.status_code == 503 and "saikyo models export resnet50" in json.dumps(r.json())
