"""Optional API keys against a real server: Bearer keys from the environment and a file, the open
endpoint groups, 401s that explain themselves without echoing keys, and unusable settings refused."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from support.paths import CAT
from support.serverproc import ServerProcess, free_port, running_server

ENV_KEYS = ("env-key-one-7f3a9c", "env-key-two-0b8e21")
FILE_KEY = "file-key-3c9d5e7a41"
_CAT = CAT.read_bytes()


@pytest.fixture(scope="module")
def keyed(tiny_repository, tmp_path_factory) -> Iterator[ServerProcess]:
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text(f"# saikyo keys\n\n  {FILE_KEY}  \n")
    with running_server(
        tiny_repository.root, "tiny", tmp_path_factory.mktemp("logs"),
        "--api-keys-file", str(keys_file), "--public-endpoints", "health",
        env={"SAIKYO_API_KEYS": ",".join(ENV_KEYS)},
    ) as server:  # fmt: skip
        yield server


def classify(url: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/classify", files=[("images", ("cat.jpg", _CAT, "image/jpeg"))], headers=headers, timeout=30)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("key", [*ENV_KEYS, FILE_KEY])
def test_every_configured_key_is_accepted(keyed, key) -> None:
    r = classify(keyed.url, bearer(key))
    assert r.status_code == 200 and len(r.json()) == 1


@pytest.mark.parametrize(
    ("headers", "needle", "code"),
    [
        ({}, "missing API key", None),
        ({"Authorization": f"Basic {ENV_KEYS[0]}"}, "expected 'Bearer <key>'", "invalid_request"),
        ({"Authorization": "Bearer"}, "expected 'Bearer <key>'", "invalid_request"),
        (bearer(ENV_KEYS[0] + "x"), "invalid API key", "invalid_token"),
        (bearer(ENV_KEYS[0][:-1]), "invalid API key", "invalid_token"),
        (bearer(f"{ENV_KEYS[0]},{ENV_KEYS[1]}"), "invalid API key", "invalid_token"),
        (bearer("ünïcode-key"), "invalid API key", "invalid_token"),
    ],
)
def test_refusals_are_401_json_with_a_challenge_and_no_keys(keyed, headers, needle, code) -> None:
    headers = {k: v.encode("utf-8") for k, v in headers.items()}  # bytes: httpx sends them as they are
    r = classify(keyed.url, headers)
    assert r.status_code == 401
    assert needle in r.json()["error"]
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="saikyo"')
    assert (f'error="{code}"' in challenge) if code else ("error=" not in challenge)
    for key in (*ENV_KEYS, FILE_KEY):
        assert key not in r.text and key[:-1] not in r.text


def test_open_and_closed_endpoint_groups(keyed) -> None:
    url = keyed.url
    # health is public here; metrics, docs and the demo page are not.
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/tiny/ready").status_code == 200
    for path in ("/metrics", "/docs", "/openapi.json", "/", "/v2", "/v2/models/tiny"):
        assert httpx.get(f"{url}{path}").status_code == 401, path
        assert httpx.get(f"{url}{path}", headers=bearer(FILE_KEY)).status_code == 200, path
    assert httpx.post(f"{url}/v2/models/tiny/infer", json={"inputs": []}).status_code == 401


def test_the_schema_declares_the_bearer_scheme_on_closed_operations_only(keyed) -> None:
    schema = httpx.get(f"{keyed.url}/openapi.json", headers=bearer(FILE_KEY)).json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An API key from SAIKYO_API_KEYS or the API keys file."
    }  # fmt: skip
    paths = schema["paths"]
    for path, method in [("/classify", "post"), ("/v2/models/{model_name}/infer", "post"), ("/v2", "get")]:
        operation = paths[path][method]
        assert operation["security"] == [{"bearerAuth": []}], path
        assert "401" in operation["responses"], path
    # health is public on this server: no key asked for, no 401 documented.
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/ready"):
        assert "security" not in paths[path]["get"] and "401" not in paths[path]["get"]["responses"], path


def test_without_keys_the_schema_asks_for_none(tiny_server) -> None:
    schema = httpx.get(f"{tiny_server.url}/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert all("security" not in op for ops in schema["paths"].values() for op in ops.values())


def test_keys_are_checked_before_the_body_is_read(keyed) -> None:
    # An unauthenticated upload over every limit is refused for the key, and the connection is closed
    # instead of reading the body to discard it.
    r = httpx.post(f"{keyed.url}/classify", content=b"\0" * (2 << 20), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 401 and r.headers["connection"] == "close"


def test_the_log_holds_no_keys(keyed) -> None:
    classify(keyed.url, bearer("wrong-key-abcdef"))
    classify(keyed.url, bearer(ENV_KEYS[1]))
    log = keyed.log()
    for key in (*ENV_KEYS, FILE_KEY, "wrong-key-abcdef"):
        assert key not in log


def test_default_groups_leave_docs_metrics_and_demo_open(tiny_repository, tmp_path_factory) -> None:
    with running_server(
        tiny_repository.root, "tiny", tmp_path_factory.mktemp("logs"), env={"SAIKYO_API_KEYS": ENV_KEYS[0]}
    ) as server:
        for path in ("/metrics", "/docs", "/openapi.json", "/", "/v2/health/ready"):
            assert httpx.get(f"{server.url}{path}").status_code == 200, path
        assert classify(server.url).status_code == 401
        assert classify(server.url, bearer(ENV_KEYS[0])).status_code == 200


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--api-keys-file", "/nonexistent/keys"], {}, "cannot read the API keys file"),
        ([], {"SAIKYO_API_KEYS": "good-key,bad key with spaces"}, "API key #2"),
        ([], {"SAIKYO_API_KEYS": "k1-aaaaaaaa", "SAIKYO_PUBLIC_ENDPOINTS": "health,admin"}, "admin"),
    ],
)
def test_unusable_key_settings_stop_the_server_at_start(tiny_repository, args, env, needle) -> None:
    cmd = [sys.executable, "-m", "saikyo", "serve", "--port", str(free_port()),
           "--repository", str(tiny_repository.root), "--models", "tiny", *args]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert "bad key with spaces" not in out.stderr
