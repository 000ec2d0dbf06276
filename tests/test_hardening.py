"""Hostile requests against a real server: each is refused with a JSON 4xx that names its field or limit,
none reaches the 500 handler, and none stalls the event loop for the other requests."""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator

import httpx
import pytest
from support.paths import CAT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.serverproc import ServerProcess, running_server
from support.stress import png_claiming, raw_exchange

MAX_REQUEST_PIXELS = 3_000_000
MAX_DECOMPRESSED = 1_000_000
MAX_JSON = 4 * 1024 * 1024
MAX_HEADER = 8 * 1024
# The module's server closes a connection that sent nothing this long after accept, by design: the fuzz
# test's clients connect and then send, and at 1 s a client starved between the two on a loaded machine
# (the full suite on 2 cores) was cut off now and then ("Server disconnected without sending a response").
HEADER_TIMEOUT_S = 3.0
_B64_CAT = base64.b64encode(CAT.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(tiny_repository, tmp_path_factory) -> Iterator[ServerProcess]:
    with running_server(
        tiny_repository.root, "tiny", tmp_path_factory.mktemp("logs"),
        "--max-request-pixels", str(MAX_REQUEST_PIXELS), "--max-image-pixels", "2000000",
        "--max-decompressed-bytes", str(MAX_DECOMPRESSED), "--max-json-bytes", str(MAX_JSON),
        "--max-header-bytes", str(MAX_HEADER), "--header-timeout-s", str(HEADER_TIMEOUT_S),
    ) as s:  # fmt: skip
        yield s
        # Nothing a client sent reached the 500 handler.
        assert "Traceback" not in s.log() and "unhandled error" not in s.log(), s.log_tail(60)


def infer(server: ServerProcess, body: bytes | str, headers: dict[str, str | bytes] | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}/v2/models/tiny/infer", content=body, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str)
    for needle in needles:
        assert needle in json.dumps(body), (needle, body)


def images_request(data: object, shape: list[int], **extra: object) -> str:
    return json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": shape, "data": data}], **extra})


# ---- item 1: parser failures other than JSONDecodeError ----
@pytest.mark.parametrize(
    ("body", "headers", "needle"),
    [
        ("[" * 100_000 + "]" * 100_000, {}, "nested too deeply"),
        ('{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [' + "9" * 5000 + "]}]}", {}, "usable JSON"),
        (images_request([_B64_CAT], [1], parameters={"timeout": int("9" * 400)}), {}, "timeout"),
        (images_request([_B64_CAT], [1]), {"Inference-Header-Content-Length": "²".encode("latin-1")}, "Inference-Header-Content-Length"),
        (images_request([_B64_CAT], [1]), {"Inference-Header-Content-Length": "9" * 400}, "Inference-Header-Content-Length"),
        (images_request([_B64_CAT], [10**40]), {}, "shape"),
        ('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": '
         + "[" * 50 + "1" + "]" * 50 + "}]}", {}, "input"),
    ],
    ids=["deep-nesting", "huge-integer", "huge-timeout", "superscript-length", "huge-length", "huge-shape", "deep-data"],
)
def test_malformed_v2_bodies_are_json_400s_naming_the_field(server, body, headers, needle) -> None:
    assert_error(infer(server, body, headers), 400, needle)


# ---- item 2: work proportional to attacker-chosen sizes ----
def test_a_gzip_bomb_is_refused_at_the_decompressed_cap(server) -> None:
    bomb = gzip.compress(b" " * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100_000
    r = infer(server, bomb, {"Content-Encoding": "gzip"})
    assert_error(r, 413, str(MAX_DECOMPRESSED))


def test_bytes_elements_beyond_the_declared_shape_are_not_walked(server) -> None:
    # 200 000 JSON elements for a shape of [1]: refused at the second one, as in the binary form.
    assert_error(infer(server, images_request(["x"] * 200_000, [1])), 400, "more than the 1 elements")
    raw = b"".join(len(b"ab").to_bytes(4, "little") + b"ab" for _ in range(100_000))
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()  # fmt: skip
    r = infer(server, header + raw, {"Inference-Header-Content-Length": str(len(header)),
                                      "Content-Type": "application/octet-stream"})  # fmt: skip
    assert_error(r, 400, "more than the 1 elements")


def test_a_json_part_over_its_cap_asks_for_binary_data(server) -> None:
    body = images_request(["A" * (MAX_JSON + 10)], [1])
    assert_error(infer(server, body), 413, "binary data", str(MAX_JSON))


def test_a_multipart_part_header_over_16_kib_is_a_400(server) -> None:
    boundary = "b0undary"
    name = "\\" * 3_000_000
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode() + CAT.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    started = time.monotonic()
    r = httpx.post(f"{server.url}/classify", content=body,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)  # fmt: skip
    assert_error(r, 400, "headers exceed 16384 bytes")
    assert time.monotonic() - started < 30


def test_liveness_answers_while_a_large_request_is_parsed(server) -> None:
    """A JSON body of numbers at the JSON cap is the most parsing one request can ask for; probes sent
    meanwhile are answered before it is, each well under the time it takes."""
    values = ",".join(["0.123456789"] * (MAX_JSON // 12 - 10))
    body = '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [' + values + "]}]}"
    assert len(body) <= MAX_JSON
    done: dict[str, float] = {}

    def heavy() -> None:
        started = time.monotonic()
        done["status"] = infer(server, body).status_code
        done["seconds"] = time.monotonic() - started
        done["at"] = time.monotonic()

    thread = threading.Thread(target=heavy)
    probes: list[tuple[float, float]] = []
    with httpx.Client(timeout=10) as client:
        client.get(f"{server.url}/v2/health/live")  # connection open before the heavy request starts
        thread.start()
        while thread.is_alive() and len(probes) < 200:
            started = time.monotonic()
            assert client.get(f"{server.url}/v2/health/live").status_code == 200
            probes.append((started, time.monotonic()))
        thread.join(60)
    assert done["status"] == 400  # 9.8e5 values for a [1, 3, 32, 32] tensor
    during = [end - start for start, end in probes if end < done["at"]]
    assert len(during) >= 3, (done, probes[:5])
    print(f"heavy request {done['seconds']:.3f} s; {len(during)} probes meanwhile, slowest {max(during) * 1000:.1f} ms")
    assert max(during) < 0.25, (max(during), done)


# ---- item 3: a per-request pixel budget ----
def test_a_request_over_its_pixel_budget_is_413_naming_the_setting(server) -> None:
    claims = [("images", (f"big{i}.png", png_claiming(1000, 1000), "image/png")) for i in range(4)]
    r = httpx.post(f"{server.url}/classify", files=claims, timeout=60)
    assert_error(r, 413, "max_request_pixels", str(MAX_REQUEST_PIXELS))
    # Under the budget, the same kind of request is judged image by image (here: corrupt data, a 400).
    r = httpx.post(f"{server.url}/classify", files=claims[:2], timeout=60)
    assert_error(r, 400, "big0.png")


# ---- item 5: a client that leaves mid-upload ----
def test_a_client_leaving_mid_upload_is_counted_not_a_server_error(server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"--b\r\n" + b"x" * 1000
            )
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        counts = [ln for ln in metrics.splitlines() if ln.startswith('saikyo_client_disconnects_total{route="/classify"}')]
        if counts and float(counts[0].split()[-1]) >= 3:
            break
        time.sleep(0.2)
    assert counts and float(counts[0].split()[-1]) >= 3, counts
    assert 'status="499"' in metrics and 'status="500"' not in metrics


# ---- item 7: request heads ----
def test_a_huge_header_is_refused_before_it_is_buffered(server) -> None:
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (50 * 1024 * 1024) + b"\r\n\r\n"
    status, headers, body, _ = raw_exchange(server.url, head[: 4 * MAX_HEADER], then_wait=10)
    assert status == 431 and headers["connection"] == "close"
    assert "max_header_bytes" in json.loads(body)["detail"]["setting"]
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    # A head that fits, followed by a body in the same packet, is served as usual.
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", json=json.loads(images_request([_B64_CAT], [1])))
    assert r.status_code == 200, r.text


def test_headers_that_never_end_time_out(server) -> None:
    status, _, body, seconds = raw_exchange(server.url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: a", then_wait=10)
    assert status == 408 and "header_timeout_s" in body.decode()
    assert HEADER_TIMEOUT_S * 0.9 <= seconds < 10


# ---- item 9: keys ----
@pytest.mark.parametrize("keys", ["", ",", " , "])
def test_an_api_key_setting_that_holds_no_key_refuses_to_start(keys, tiny_repository) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAIKYO_")}
    out = subprocess.run(
        [sys.executable, "-m", "saikyo", "serve", "--repository", str(tiny_repository.root), "--models", "tiny",
         "--port", "1"],
        env={**env, "SAIKYO_API_KEYS": keys}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "SAIKYO_API_KEYS" in out.stderr and "holds no key" in out.stderr, out.stderr


def test_keys_with_public_metrics_warn_at_start(tiny_repository, tmp_path) -> None:
    with running_server(tiny_repository.root, "tiny", tmp_path, env={"SAIKYO_API_KEYS": "k1"}) as s:
        assert "API keys are on, but docs and metrics stay(s) open" in s.log()
    with running_server(tiny_repository.root, "tiny", tmp_path, "--public-endpoints", "health",
                        env={"SAIKYO_API_KEYS": "k1"}) as s:  # fmt: skip
        assert "stay(s) open" not in s.log()


# ---- fuzzing v2 bodies: nesting, huge numbers, compression ----
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**60), 10**60) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
_tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["images", "input", "x"]), "datatype": st.sampled_from(["BYTES", "FP32", "INT8", 7]),
     "shape": st.lists(st.integers(-2, 10**25), max_size=5) | _json_values, "data": _json_values},
    optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "classification", "x"]), _json_values)},
)  # fmt: skip
_requests = st.fixed_dictionaries(
    {"inputs": st.lists(_tensors, max_size=3) | _json_values},
    optional={"outputs": _json_values, "parameters": st.dictionaries(st.sampled_from(["timeout", "binary_data_output"]), _json_values), "id": _json_values},
)  # fmt: skip


@pytest.mark.slow  # fuzz
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=_requests, nesting=st.integers(0, 3000), compress=st.sampled_from([None, "gzip", "deflate"]))
def test_fuzzed_v2_bodies_are_never_a_server_error(server, request, nesting, compress) -> None:
    body = ("[" * nesting + json.dumps(request) + "]" * nesting).encode()
    headers: dict[str, str | bytes] = {}
    if compress == "gzip":
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    elif compress == "deflate":
        body, headers["Content-Encoding"] = zlib.compress(body), "deflate"
    r = infer(server, body, headers)
    assert r.status_code < 500, r.text
    assert r.status_code == 200 or isinstance(r.json()["error"], str)


# ---- item 8: a memory budget for request bodies ----
def test_the_memory_budget_comes_from_the_setting_the_cgroup_or_the_machine(tmp_path) -> None:
    from saikyo.server import memory
    from saikyo.settings import Settings

    s = Settings()
    assert memory.body_budget(Settings(memory_budget_bytes=12345)) == (12345, "memory_budget_bytes")
    budget, source = memory.body_budget(s, limit=2 * 2**30, physical=64 * 2**30)
    assert budget == 2**30 and "cgroup" in source
    budget, source = memory.body_budget(s, limit=2**63, physical=8 * 2**30)  # cgroup v1 "no limit"
    assert budget == 4 * 2**30 and "machine" in source
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("max\n")
    assert memory.cgroup_limit((v2, v1)) is None
    v2.write_text("2147483648\n")
    assert memory.cgroup_limit((v2, v1)) == 2**31
    assert memory.cgroup_limit((tmp_path / "absent", v1)) is None
    assert memory.request_cost(1000, False, s.max_decompressed_bytes) == 2000
    assert memory.request_cost(1000, True, s.max_decompressed_bytes) == 2000 + s.max_decompressed_bytes


def test_bodies_over_the_memory_budget_wait_their_turn_with_a_503(tiny_repository, tmp_path) -> None:
    """Budget 300 kB; a held upload of 100 kB costs 200 kB (body + parsed parts): a second one is refused
    at once with Retry-After, a third goes through once the first is done."""
    with running_server(tiny_repository.root, "tiny", tmp_path, "--memory-budget-bytes", "300000",
                        "--max-body-bytes", "200000") as s:  # fmt: skip
        assert "request bodies may hold up to 0 MiB at once (memory_budget_bytes)" in s.log()
        host, port = s.url.removeprefix("http://").split(":")
        held = socket.create_connection((host, int(port)), timeout=10)
        held.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\n")  # fmt: skip
        time.sleep(0.5)
        files = [("images", ("blob.bin", b"\x00" * 60000, "image/jpeg"))]  # costs about 120 kB
        r = httpx.post(f"{s.url}/classify", files=files, timeout=30)
        assert_error(r, 503, "memory_budget_bytes")
        assert r.headers["retry-after"] == "1"
        assert httpx.get(f"{s.url}/v2/health/live").status_code == 200  # probes cost nothing
        held.close()
        deadline = time.monotonic() + 10
        while (r := httpx.post(f"{s.url}/classify", files=files, timeout=30)).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
        assert r.status_code == 400 and "blob.bin" in r.text  # admitted: not an image, named
