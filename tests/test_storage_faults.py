"""Storage faults stay contained: a store that stops answering, a cache whose files changed under it,
several servers starting on one cache. Against real SeaweedFS (tests/s3server.py) and real servers."""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from support.paths import CAT
from support.s3server import BUCKET, S3Server
from support.serverproc import running_server
from test_s3_repository import with_tiny

from saikyo.models.cache import ModelCache
from saikyo.models.repository import ModelRepository


def classify(url: str, timeout: float) -> float:
    started = time.perf_counter()
    r = httpx.post(f"{url}/classify?model=tiny", files={"images": ("cat.jpg", CAT.read_bytes())}, timeout=timeout)
    assert r.status_code == 200, r.text
    return (time.perf_counter() - started) * 1000


@pytest.mark.slow
def test_a_store_that_stops_answering_stalls_neither_inference_nor_the_index(
    tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    repo, entry = with_tiny(s3_server, "silent", tmp_path / "seed-cache", tiny_repository)
    assert repo.publish("tiny", [entry.path], {**entry.meta, "note": "the one served"}) == 2
    proxy = s3_server.proxy
    assert proxy is not None
    uri = f"s3://{BUCKET}/silent"
    args = ("--s3-endpoint-url", s3_server.url, "--model-cache-dir", str(tmp_path / "cache"), "--model-control", "explicit")
    with running_server(uri, "tiny", tmp_path / "logs", *args, env=s3_server.env()) as server:  # type: ignore[arg-type]
        index = httpx.post(f"{server.url}/v2/repository/index", timeout=30)  # serves 2, lists 1 beside it
        assert {"name": "tiny", "version": "1"} in index.json() and "age" not in index.headers
        before = [classify(server.url, 30) for _ in range(20)]

        proxy.silent.set()
        try:
            # More index calls than asyncio's default pool has threads (at most 32): each used to park a
            # listing thread there for botocore's whole retry schedule, and /classify parses on that pool.
            with concurrent.futures.ThreadPoolExecutor(40) as pool:
                indexes = [pool.submit(httpx.post, f"{server.url}/v2/repository/index", timeout=60) for _ in range(40)]
                time.sleep(0.5)
                during = [classify(server.url, 10) for _ in range(20)]
                assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
                answered = [f.result() for f in indexes]
        finally:
            proxy.silent.clear()
        for r in answered:  # the last good listing, saying how old it is
            assert r.status_code == 200 and {"name": "tiny", "version": "1"} in r.json(), r.text
            assert int(r.headers["age"]) >= 0
        ratio = statistics.quantiles(during, n=100)[98] / statistics.quantiles(before, n=100)[98]
        p50 = statistics.median(during) / statistics.median(before)
        print(f"/classify while the store is silent / before: p50 {p50:.2f}, p99 {ratio:.2f}")


@pytest.mark.slow
@pytest.mark.parametrize("library_debug", [False, True], ids=["debug", "debug+s3-debug-log"])
def test_debug_logs_never_carry_the_s3_credentials(
    library_debug: bool, tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    from support.s3server import ACCESS_KEY, SECRET_KEY

    with_tiny(s3_server, f"logs-{library_debug}", tmp_path / "seed-cache", tiny_repository)
    args = ["--s3-endpoint-url", s3_server.url, "--model-cache-dir", str(tmp_path / "cache"), "--log-level", "debug"]
    if library_debug:
        args.append("--s3-debug-log")
    uri = f"s3://{BUCKET}/logs-{library_debug}"
    with running_server(uri, "tiny", tmp_path / "logs", *args, env=s3_server.env()) as server:  # type: ignore[arg-type]
        assert httpx.post(f"{server.url}/v2/repository/index", timeout=30).status_code in (200, 400)
        text = server.log()
    assert ACCESS_KEY not in text and SECRET_KEY not in text
    assert "POST /v2/repository/index" in text  # the access log: debug level is on
    botocore_lines = [line for line in text.splitlines() if " botocore." in line or " urllib3." in line]
    if library_debug:
        assert any("Credential=<redacted>" in line for line in botocore_lines), botocore_lines[-20:]
    else:
        assert not [line for line in botocore_lines if " DEBUG " in line or " INFO " in line], botocore_lines[:5]


@pytest.mark.slow
def test_a_cached_file_truncated_or_rewritten_is_downloaded_again_not_served(
    tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    repo, entry = with_tiny(s3_server, "tampered", tmp_path / "cache", tiny_repository)
    proxy = s3_server.proxy
    assert proxy is not None
    key = f"/{BUCKET}/tampered/tiny/1/model.onnx"
    original = entry.path.read_bytes()
    got = repo.get("tiny")
    cached = got.path
    got.release()
    assert proxy.count("GET", key) == 1

    # Same size, other bytes (a rewrite in place): its mtime changed, so its sha256 is read again.
    cached.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])
    got = repo.get("tiny")
    assert got.path.read_bytes() == original and proxy.count("GET", key) == 2
    got.release()
    got = repo.get("tiny")  # untouched since it was checked: used as it is
    assert proxy.count("GET", key) == 2
    got.release()

    # Truncated: a server starting on this cache downloads it again and serves the whole file.
    cached.write_bytes(original[: len(original) // 2])
    uri = f"s3://{BUCKET}/tampered"
    args = ("--s3-endpoint-url", s3_server.url, "--model-cache-dir", str(tmp_path / "cache"))
    with running_server(uri, "tiny", tmp_path / "logs", *args, env=s3_server.env()) as server:  # type: ignore[arg-type]
        classify(server.url, 30)
        assert "dropping it to download it again" in server.log()
    assert proxy.count("GET", key) == 3 and cached.read_bytes() == original


@pytest.mark.slow
def test_servers_starting_together_download_a_version_once(
    tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    with_tiny(s3_server, "together", tmp_path / "seed-cache", tiny_repository)
    proxy = s3_server.proxy
    assert proxy is not None
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, time
        from saikyo.models.cache import ModelCache
        from saikyo.models.s3 import S3Repository
        repo = S3Repository("s3://{BUCKET}/together", {s3_server.url!r}, ModelCache({str(tmp_path / "cache")!r}, 1 << 30))
        ref = repo.resolve("tiny")
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        print(repo.fetch(ref).path.stat().st_size, flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(4)]
    try:
        time.sleep(3)  # each has read meta.json and waits at the line
        go.touch()
        sizes = {p.communicate(timeout=120)[0].strip() for p in procs}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs) and len(sizes) == 1
    assert proxy.count("GET", f"/{BUCKET}/together/tiny/1/model.onnx") == 1


def test_staging_left_by_a_dead_download_is_removed_and_staging_counts_in_the_budget(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, max_bytes=1 << 30)
    dead = tmp_path / "staging" / "download-dead"
    dead.mkdir(parents=True)
    (dead / "model.onnx").write_bytes(b"x" * 5000)
    live_owner = ModelCache(tmp_path, max_bytes=1 << 30)  # another process's download in progress
    live = live_owner.staging()
    (live / "model.onnx").write_bytes(b"y" * 3000)
    assert cache.size_bytes() >= 8000  # downloads take the disk the budget is for
    cache.pin("some-version").release()  # first use: what died is removed, what is in progress stays
    assert not dead.exists() and (live / "model.onnx").is_file()
    assert 3000 <= cache.size_bytes() < 8000
    live_owner.discard(live)
    assert not live.exists()


def test_a_download_starting_while_another_process_cleans_up_keeps_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers starting together on one cache: one begins a download while another's first use removes the
    staging directories nobody holds. Here that cleanup runs at the worst instant, just before the
    download takes its staging lock; the download's directory must survive it."""
    import fcntl

    downloader = ModelCache(tmp_path, max_bytes=1 << 30)
    other = ModelCache(tmp_path, max_bytes=1 << 30)  # another process, using the cache for the first time

    class CleanupFirst:
        LOCK_EX, LOCK_SH, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_SH, fcntl.LOCK_NB
        ran = False

        def flock(self, fd: int, op: int) -> None:
            if op == fcntl.LOCK_EX and not self.ran:
                self.ran = True
                other.pin("another-version").release()
            fcntl.flock(fd, op)

    cleanup = CleanupFirst()
    monkeypatch.setattr("saikyo.models.cache.fcntl", cleanup)
    staging = downloader.staging()
    assert cleanup.ran
    (staging / "model.onnx").write_bytes(b"x" * 100)
    (staging / "meta.json").write_text("{}")
    assert (downloader.commit(staging, "the-version") / "model.onnx").is_file()
