"""The model repository's layout and versions (a local directory) and the download cache, without a server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.tinymodel import add_tiny_model

from saikyo.models.cache import ModelCache
from saikyo.models.catalog import list_models
from saikyo.models.errors import ModelNotExported, RepositoryError, VersionNotFound
from saikyo.models.location import open_repository
from saikyo.models.provenance import sha256_file
from saikyo.models.repository import ModelRepository
from saikyo.settings import Settings


def test_an_export_is_version_1_and_pushes_add_numbered_versions(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    v1 = add_tiny_model(repo, "tiny", seed=0)
    assert (v1.version, v1.path) == (1, repo.root / "tiny" / "model.onnx")
    # Every file's digest is in meta.json, which is written last.
    assert v1.meta["files"]["model.onnx"]["sha256"] == sha256_file(v1.path)
    assert repo.publish("tiny", [v1.path], v1.meta) == 2
    assert repo.publish("tiny", [v1.path], v1.meta, version=5) == 5
    assert repo.versions("tiny") == [1, 2, 5] and repo.next_version("tiny") == 6
    assert repo.get("tiny").version == 5 and repo.get("tiny").path == repo.root / "tiny" / "5" / "model.onnx"
    with pytest.raises(RepositoryError, match="already exists"):
        repo.publish("tiny", [v1.path], v1.meta, version=2)
    with pytest.raises(VersionNotFound, match=r"no version 3 .*versions: \[1, 2, 5\]"):
        repo.resolve("tiny", 3)
    with pytest.raises(ModelNotExported, match="saikyo models import nothing"):
        repo.resolve("nothing")
    with pytest.raises(ModelNotExported, match=f"saikyo models export resnet50 .*--repository {repo.root}"):
        repo.resolve("resnet50")


def test_re_exporting_replaces_version_1_and_keeps_the_published_versions(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    first = add_tiny_model(repo, "tiny", seed=0)
    repo.publish("tiny", [first.path], first.meta)
    again = add_tiny_model(repo, "tiny", seed=1)
    assert repo.versions("tiny") == [1, 2]
    assert again.digest != first.digest and repo.resolve("tiny", 1).digest == again.digest
    assert repo.resolve("tiny", 2).meta["files"] == first.meta["files"]


def test_a_version_without_its_meta_json_is_invisible(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    add_tiny_model(repo, "tiny")
    half = repo.root / "tiny" / "2"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"half an upload")
    (repo.root / "tiny" / "v3").mkdir()  # not a version number
    assert repo.versions("tiny") == [1] and repo.next_version("tiny") == 2
    (half / "meta.json").write_text(json.dumps({"name": "tiny"}))
    assert repo.versions("tiny") == [1, 2]


def test_catalog_lists_versions_and_models_outside_the_zoo(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    entry = add_tiny_model(repo, "tiny")
    repo.publish("tiny", [entry.path], entry.meta)
    rows = {r["name"]: r for r in list_models(repo)}
    assert rows["tiny"]["versions"] == [1, 2] and rows["tiny"]["family"] == "Tiny" and rows["tiny"]["input_size"] == 32
    assert rows["resnet50"]["versions"] == [] and not rows["resnet50"]["exported"]


def test_locations_pick_the_implementation(tmp_path: Path) -> None:
    assert isinstance(open_repository(Settings(repository=str(tmp_path))), ModelRepository)
    s3 = open_repository(Settings(repository="s3://bucket/some/prefix/", model_cache_dir=tmp_path))
    assert (s3.bucket, s3.prefix, s3.location) == ("bucket", "some/prefix/", "s3://bucket/some/prefix")  # type: ignore[attr-defined]
    for bad in ("gs://bucket/x", "s3:///nobucket"):
        with pytest.raises(RepositoryError, match="s3://bucket/prefix"):
            open_repository(Settings(repository=bad))


# ---- the cache ----
def _cached(cache: ModelCache, key: str, size: int) -> None:
    staging = cache.staging()
    (staging / "model.onnx").write_bytes(b"x" * size)
    (staging / "meta.json").write_text("{}")
    pin = cache.pin(key)
    cache.commit(staging, key)
    pin.release()


def test_the_cache_evicts_least_recently_used_versions_first(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, max_bytes=25_000)
    _cached(cache, "a", 10_000)
    _cached(cache, "b", 10_000)
    assert cache.lookup("a") is not None  # a is now the most recently used
    _cached(cache, "c", 10_000)  # over budget: b goes
    assert cache.lookup("b") is None and cache.lookup("a") is not None and cache.lookup("c") is not None
    assert cache.size_bytes() <= 25_000


def test_the_cache_never_evicts_a_version_another_process_holds(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, max_bytes=15_000)
    _cached(cache, "held", 10_000)
    holder = textwrap.dedent(f"""
        import sys
        from saikyo.models.cache import ModelCache
        pin = ModelCache({str(tmp_path)!r}, 0).pin("held")
        print("holding", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        _cached(cache, "new", 10_000)  # over budget, but the older version is held: it stays
        assert cache.lookup("held") is not None and cache.lookup("new") is not None
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
        cache.evict()  # no longer held: now the least recently used goes
        assert cache.lookup("held") is None and cache.lookup("new") is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
