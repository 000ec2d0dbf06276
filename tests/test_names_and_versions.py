"""Odd model names and version strings from clients, and odd repository locations from the command line:
a clear 4xx (or exit 2), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from support.serverproc import ServerProcess, free_port, running_server

from saikyo.models.repository import ModelRepository

# str.isdigit() is True for each of these; int() refuses the first two and Python's 4,300-digit limit the last.
ODD_VERSIONS = ["²", "١٢", "9" * 4300, "0", "01", "-1", "1.0", " 1"]


@pytest.fixture(scope="module")
def server(tiny_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tiny_repository.root, "tiny", tmp_path_factory.mktemp("logs"), "--model-control", "explicit") as s:
        yield s
        assert "Traceback" not in s.log() and "unhandled error" not in s.log(), s.log_tail(60)


@pytest.mark.parametrize("version", ODD_VERSIONS, ids=lambda v: f"{v[:8]!r}x{len(v)}")
def test_odd_version_strings_in_a_path_are_404(server: ServerProcess, version: str) -> None:
    for method, route in (("GET", ""), ("GET", "/ready"), ("POST", "/infer")):
        r = httpx.request(method, f"{server.url}/v2/models/tiny/versions/{quote(version)}{route}", json={}, timeout=30)
        assert r.status_code == 404, (route, r.text)
        assert "no loaded version" in r.json()["error"]


# As JSON: strings, and numbers (one past Python's 4,300-digit limit on parsing integers).
ODD_JSON_VERSIONS = [f'"{v}"' for v in ODD_VERSIONS] + ["1" * 5000, "2.0", "true", "-3"]


@pytest.mark.parametrize("version", ODD_JSON_VERSIONS, ids=lambda v: f"{v[:8]!r}x{len(v)}")
def test_odd_versions_to_load_are_400(server: ServerProcess, version: str) -> None:
    body = ('{"parameters": {"version": %s}}' % version).encode()
    r = httpx.post(f"{server.url}/v2/repository/models/tiny/load", content=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "error" in r.json() and len(r.text) < 2000


@pytest.mark.parametrize("action", ["load", "unload"])
def test_names_over_255_bytes_are_400_on_control_and_404_on_inference(server: ServerProcess, action: str) -> None:
    name = "m" * 256
    r = httpx.post(f"{server.url}/v2/repository/models/{name}/{action}", timeout=30)
    assert r.status_code == 400 and "is not a model name" in r.json()["error"], r.text
    assert len(r.text) < 1000  # the name is not echoed whole
    r = httpx.post(f"{server.url}/v2/models/{'é' * 200}/infer", json={}, timeout=30)  # 400 bytes of UTF-8
    assert r.status_code == 404, r.text
    # 255 bytes is a name like any other: not in the repository.
    r = httpx.post(f"{server.url}/v2/repository/models/{'m' * 255}/load", timeout=30)
    assert r.status_code == 404 and "not in the model repository" in r.json()["error"], r.text


@pytest.mark.parametrize("endpoint", ["localhost:9000", "127.0.0.1:9000", "ftp://127.0.0.1:9000", "http://"])
def test_an_s3_endpoint_without_a_scheme_exits_2_naming_the_fix(endpoint: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "saikyo", "serve", "--repository", "s3://models/x", "--s3-endpoint-url", endpoint,
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text
    assert "s3_endpoint_url" in text and "http://" in text and "Traceback" not in text
