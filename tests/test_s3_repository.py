"""s3:// model repositories against a real S3-compatible server (SeaweedFS on loopback, tests/support/s3server.py):
push, serve, the cache, digests, and start-up errors that name the location and never the credentials."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support.paths import CAT, CAT_CLASSES
from support.s3server import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server
from support.serverproc import free_port, running_server

from saikyo.models.cache import ModelCache
from saikyo.models.errors import CorruptDownload
from saikyo.models.repository import Entry, ModelRepository
from saikyo.models.s3 import DOWNLOAD_ATTEMPTS, S3Repository

pytestmark = pytest.mark.slow


def saikyo(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in env.items() if not k.startswith("SAIKYO_")}
    return subprocess.run([sys.executable, "-m", "saikyo", *args], capture_output=True, text=True, env=clean, timeout=timeout)


def with_tiny(s3: S3Server, prefix: str, cache: Path, tiny_repository: ModelRepository) -> tuple[S3Repository, Entry]:
    """A repository at s3://models/<prefix> where the tiny model is version 1."""
    repo = S3Repository(f"s3://{BUCKET}/{prefix}", s3.url, ModelCache(cache, 1 << 30))
    entry = tiny_repository.get("tiny")
    assert repo.publish("tiny", [entry.path], entry.meta) == 1
    return repo, entry


def test_push_then_serve_from_s3_classifies_the_cat_and_a_restart_hits_the_cache(
    pretrained_repository: ModelRepository, s3_server: S3Server, tmp_path: Path
) -> None:
    uri = f"s3://{BUCKET}/cat"
    env = s3_server.env()
    pushed = saikyo("models", "push", "efficientnet_lite0", "--to", uri, "--repository", str(pretrained_repository.root),
                    "--s3-endpoint-url", s3_server.url, env=env)  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    assert f"published efficientnet_lite0 version 1 to {uri}" in pushed.stdout
    listed = saikyo("models", "list", "--repository", uri, "--s3-endpoint-url", s3_server.url, "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    row = {r["name"]: r for r in json.loads(listed.stdout)}["efficientnet_lite0"]
    assert row["versions"] == [1] and row["weights"] == "imagenet-pretrained"

    proxy = s3_server.proxy
    assert proxy is not None
    model_key = f"/{BUCKET}/cat/efficientnet_lite0/1/model.onnx"
    # --model-control: the index (read below) is served only with model control.
    args = ("--s3-endpoint-url", s3_server.url, "--model-cache-dir", str(tmp_path / "cache"), "--model-control", "explicit")
    for start in (1, 2):  # the second start finds the version in the cache
        with running_server(uri, "efficientnet_lite0", tmp_path / "logs", *args, env=env) as server:  # type: ignore[arg-type]
            r = httpx.post(f"{server.url}/classify", files={"images": ("cat.jpg", CAT.read_bytes())}, timeout=60)
            assert r.status_code == 200, r.text
            assert int(max(r.json()[0], key=r.json()[0].get)) in CAT_CLASSES
            index = httpx.post(f"{server.url}/v2/repository/index", timeout=10).json()
            assert {"name": "efficientnet_lite0", "version": "1", "state": "READY", "reason": ""} in index
            # The download's progress in the server's log: one line per file with its size, first start only.
            started = "downloading efficientnet_lite0 version 1 model.onnx: "
            assert (started in server.log()) == (start == 1), server.log_tail(20)
        assert proxy.count("GET", model_key) == 1, (start, proxy.requests)  # downloaded once, by the first start
    assert proxy.count("GET", "/efficientnet_lite0/1/meta.json") >= 2  # each start reads meta.json


def test_a_corrupted_object_is_refused_and_a_corrupted_transfer_retried(
    tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    repo, entry = with_tiny(s3_server, "corrupt", tmp_path / "cache", tiny_repository)
    # Same files, another meta.json: another digest (identical versions would share one cache entry).
    assert repo.publish("tiny", [entry.path], {**entry.meta, "note": "the second"}) == 2
    proxy = s3_server.proxy
    assert proxy is not None

    # In transit: the first download of version 1 arrives with a flipped byte, the second is whole.
    key = f"/{BUCKET}/corrupt/tiny/1/model.onnx"
    proxy.corrupt_next.append(key)
    got = repo.get("tiny", 1)
    assert got.path.read_bytes() == entry.path.read_bytes() and proxy.count("GET", key) == 2
    got.release()

    # At rest: version 2's object is replaced by other bytes; its meta.json still says what it should be.
    s3_server.client().put_object(Bucket=BUCKET, Key="corrupt/tiny/2/model.onnx", Body=b"not the model")
    with pytest.raises(CorruptDownload, match=r"tiny version 2 model.onnx .* did not match the sha256"):
        repo.get("tiny", 2)
    assert proxy.count("GET", "/corrupt/tiny/2/model.onnx") == DOWNLOAD_ATTEMPTS
    assert repo.cache.lookup(repo.resolve("tiny", 2).digest) is None  # nothing of it is cached


def test_a_served_model_whose_object_is_corrupt_is_never_served(
    tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    with_tiny(s3_server, "corrupt-serve", tmp_path / "cache", tiny_repository)
    s3_server.client().put_object(Bucket=BUCKET, Key="corrupt-serve/tiny/1/model.onnx", Body=b"\x08\x01 garbage")
    args = ("--s3-endpoint-url", s3_server.url, "--model-cache-dir", str(tmp_path / "cache2"), "--no-exit-on-error")
    uri = f"s3://{BUCKET}/corrupt-serve"
    with running_server(uri, "tiny", tmp_path / "logs", *args, env=s3_server.env(), wait_ready=False) as server:  # type: ignore[arg-type]
        from support.stress import wait_settled

        assert wait_settled(server.url) == {"tiny": "failed"}
        r = httpx.post(f"{server.url}/classify", files={"images": ("cat.jpg", CAT.read_bytes())}, timeout=30)
        assert r.status_code == 503 and "sha256" in r.json()["detail"]["reason"]


@pytest.mark.parametrize("case", ["missing bucket", "wrong secret", "no credentials", "unreachable endpoint"])
def test_start_up_errors_name_the_location_and_never_the_credentials(
    case: str, s3_server: S3Server, tmp_path: Path
) -> None:
    uri, endpoint, env = f"s3://{BUCKET}/anything", s3_server.url, s3_server.env()
    if case == "missing bucket":
        uri = "s3://no-such-bucket/models"
    elif case == "wrong secret":
        env = s3_server.env(secret_key="not-the-secret-either")
    elif case == "no credentials":
        env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    else:
        endpoint = f"http://127.0.0.1:{free_port()}"
    out = saikyo("serve", "--repository", uri, "--s3-endpoint-url", endpoint, "--models", "tiny", "--port",
                 str(free_port()), "--model-cache-dir", str(tmp_path), env=env)  # fmt: skip
    text = " ".join((out.stdout + out.stderr).split())  # as one line: the console wraps at 80 columns
    assert out.returncode == 2, text
    assert uri in text and "Traceback" not in text
    expected = {"missing bucket": "does not exist", "wrong secret": "refused the AWS credentials",
                "no credentials": "no AWS credentials", "unreachable endpoint": "cannot reach the S3 endpoint"}  # fmt: skip
    assert expected[case] in text
    for secret in (SECRET_KEY, ACCESS_KEY, "not-the-secret-either"):
        assert secret not in text


def test_push_refuses_a_version_that_exists_and_the_cli_lists_versions(
    tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path
) -> None:
    uri, env = f"s3://{BUCKET}/cli", s3_server.env()
    common = ("--repository", str(tiny_repository.root), "--s3-endpoint-url", s3_server.url)
    first = saikyo("models", "push", "tiny", "--to", uri, *common, env=env)
    assert first.returncode == 0
    # Not a terminal: the transfer's progress is one plain line per file, with its size.
    size = (tiny_repository.root / "tiny" / "model.onnx").stat().st_size
    assert f"uploading tiny version 1 model.onnx: {size / 1e6:.1f} MB" in first.stderr.splitlines()
    assert saikyo("models", "push", "tiny", "--to", uri, "--version", "3", *common, env=env).returncode == 0
    again = saikyo("models", "push", "tiny", "--to", uri, "--version", "3", *common, env=env)
    assert again.returncode == 1 and "version 3 already exists" in " ".join(again.stderr.split())
    listed = saikyo("models", "list", "--repository", uri, "--s3-endpoint-url", s3_server.url, "--json", env=env)
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["tiny"]["versions"] == [1, 3] and rows["tiny"]["description"] == "not a zoo model"
    assert not rows["resnet50"]["exported"]


def test_a_sweep_reads_its_models_from_s3(
    tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    from saikyo.bench import records
    from saikyo.bench.cost import resolve_pricing
    from saikyo.bench.sweep import SweepConfig, run_sweep

    repo, _ = with_tiny(s3_server, "sweep", tmp_path / "pusher-cache", tiny_repository)
    out = tmp_path / "sweep.jsonl"
    cfg = SweepConfig(
        models=["tiny"], repository=repo.location, out=out, pricing=resolve_pricing("c7i.large"),
        images_per_request=[1], precisions=["fp32", "int8"], requests=2, warmup=1, server_timeout=120,
        log_dir=tmp_path / "logs", s3_endpoint_url=s3_server.url, model_cache_dir=tmp_path / "cache",
    )  # fmt: skip
    said: list[str] = []
    summary = run_sweep(cfg, say=said.append)
    assert (summary.ran, summary.missing_model, summary.failed) == (1, 1, 0), said
    assert any("tiny-int8" in m and f"saikyo models push tiny-int8 --to {repo.location}" in m for m in said)
    (record,) = records.read(out)
    assert (record["model"], record["family"], record["errors"]) == ("tiny", "Tiny", 0)
