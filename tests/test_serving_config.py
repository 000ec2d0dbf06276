"""Per-model serving configuration: a version's own `serving` block in meta.json overrides the server's
settings for that model only. Real servers on loopback ports, the real `saikyo models config` command,
real repositories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support.paths import CAT
from prometheus_client.parser import text_string_to_metric_families
from support.s3server import BUCKET, S3Server
from support.serverproc import running_server, wait_for
from support.tinymodel import add_tiny_model

from saikyo.bench.records import server_info
from saikyo.models.cache import ModelCache
from saikyo.models.repository import META_FILE, ModelRepository
from saikyo.models.s3 import S3Repository
from saikyo.models.serving import ServingConfigError, parse_serving
from saikyo.runtime.options import resolve_serving
from saikyo.settings import Settings

_CAT = CAT.read_bytes()


def saikyo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "saikyo", *args], capture_output=True, text=True, env=env, timeout=120)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its content: what "nothing was written" is checked against."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def batch_sizes(url: str, model: str) -> tuple[float, float, float]:
    """(forward passes, images, passes of at most 2 images) for `model`, from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "saikyo_batch_size"
        for s in family.samples
        if s.labels.get("model") == model
    }
    return samples[("saikyo_batch_size_count", None)], samples[("saikyo_batch_size_sum", None)], samples[("saikyo_batch_size_bucket", "2.0")]


def serving(url: str, model: str) -> dict[str, dict[str, object]]:
    r = httpx.get(f"{url}/v2/models/{model}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["serving"]


def index(url: str) -> list[dict[str, str]]:
    """The repository index, or nothing while the server is not listening yet."""
    try:
        return httpx.post(f"{url}/v2/repository/index", timeout=10).json()
    except httpx.TransportError:
        return []


# ---- the block as hostile input ----


@pytest.mark.parametrize(
    ("block", "says"),
    [
        ({"max_batch_size": "16"}, "max_batch_size: input should be a valid integer"),
        ({"max_batch_size": True}, "max_batch_size: input should be a valid integer"),
        ({"max_batch_size": 0}, "max_batch_size: input should be greater than or equal to 1"),
        ({"max_batch_size": 10**9}, "max_batch_size: input should be less than or equal to 1024"),
        ({"max_delay_ms": float("nan")}, "max_delay_ms: input should be a finite number"),
        ({"backend": "tensorflow"}, "backend: input should be 'auto', 'onnxruntime', 'openvino' or 'torch'"),
        ({"streams": 1000}, "streams: input should be less than or equal to 64"),
        ({"max_batch": 8}, "unknown key 'max_batch'"),
        ([8], "must be a JSON object"),
    ],
)
def test_a_bad_block_is_refused_naming_the_key(block: object, says: str) -> None:
    with pytest.raises(ServingConfigError, match="serving") as caught:
        parse_serving(block)
    assert says in str(caught.value)


def test_each_value_says_where_it_came_from() -> None:
    settings = Settings.from_env({"SAIKYO_MAX_DELAY_MS": "2"}, openvino_streams=3)
    meta = {"serving": {"max_batch_size": 8, "backend": "onnxruntime"}}
    config = resolve_serving(meta, settings, environ={"SAIKYO_MAX_DELAY_MS": "2"})
    shown = config.to_dict()
    assert shown["max_batch_size"] == {"value": 8, "source": "model"}
    assert shown["backend"] == {"value": "onnxruntime", "source": "model"}
    assert shown["max_delay_ms"] == {"value": 2.0, "source": "env"}
    assert shown["streams"] == {"value": 3, "source": "flag"}
    assert shown["in_flight"] == {"value": 2, "source": "default"}
    # A further layer (a tuning measured for this CPU, say) sits between the model's block and the server.
    tuned = resolve_serving(meta, settings, layers=[("tuning", {"max_batch_size": 4, "streams": 2})], environ={})
    assert tuned.to_dict()["max_batch_size"]["source"] == "model" and tuned.to_dict()["streams"] == {"value": 2, "source": "tuning"}
    options = config.runner_options(settings)
    assert (options.max_batch_size, options.backend, options.streams) == (8, "onnxruntime", 3)
    with pytest.raises(ServingConfigError, match="max_queue_images"):
        resolve_serving({"serving": {"max_batch_size": 512}}, settings)  # more than the server queues


# ---- servers ----


def test_two_models_serve_with_their_own_batch_sizes(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repository")
    for name in ("small", "large"):
        add_tiny_model(repo, name)
    assert saikyo("models", "config", "small", "--max-batch-size", "2", "--repository", str(repo.root)).returncode == 0
    eight = [("images", (f"cat{i}.jpg", _CAT, "image/jpeg")) for i in range(8)]
    with running_server(repo.root, "small,large", tmp_path / "logs", "--max-batch-size", "8") as server:
        assert serving(server.url, "small")["max_batch_size"] == {"value": 2, "source": "model"}
        assert serving(server.url, "large")["max_batch_size"] == {"value": 8, "source": "flag"}
        assert serving(server.url, "large")["max_delay_ms"] == {"value": 0.0, "source": "default"}
        # What the cost lab records for each: the model's own.
        assert (server_info(server.url, "small").max_batch_size, server_info(server.url, "large").max_batch_size) == (2, 8)
        for model in ("small", "large"):
            r = httpx.post(f"{server.url}/classify?model={model}", files=eight, timeout=60)
            assert r.status_code == 200 and len(r.json()) == 8, r.text
        small, large = batch_sizes(server.url, "small"), batch_sizes(server.url, "large")
    passes, images, at_most_2 = small
    assert images == 8 and passes >= 4 and at_most_2 == passes  # never more than 2 images a pass
    passes, images, at_most_2 = large
    assert images == 8 and at_most_2 < passes  # 8 images in one request: a pass larger than 2


def test_models_config_publishes_a_new_version_that_a_polling_server_picks_up(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repository")
    entry = add_tiny_model(repo, "tiny")
    assert repo.publish("tiny", [entry.path], entry.meta) == 2  # numbered versions: never replaced
    before = tree(repo.root)
    args = ("--model-control", "poll", "--repository-poll-s", "0.3")
    with running_server(repo.root, "tiny", tmp_path / "logs", *args) as server:
        assert serving(server.url, "tiny")["max_batch_size"] == {"value": 16, "source": "default"}
        done = saikyo("models", "config", "tiny", "--max-batch-size", "4", "--max-delay-ms", "1.5", "--repository", str(repo.root))
        assert done.returncode == 0, done.stderr
        assert "tiny version 3" in done.stdout
        wait_for("version 3 serves", lambda: httpx.get(f"{server.url}/v2/models/tiny", timeout=10).json()["versions"] == ["3"], server)
        shown = serving(server.url, "tiny")
        assert shown["max_batch_size"] == {"value": 4, "source": "model"}
        assert shown["max_delay_ms"] == {"value": 1.5, "source": "model"}
    assert {k: v for k, v in tree(repo.root).items() if k in before} == before  # versions 1 and 2 untouched
    meta = json.loads((repo.root / "tiny" / "3" / META_FILE).read_text())
    assert meta["serving"] == {"max_batch_size": 4, "max_delay_ms": 1.5}
    assert (repo.root / "tiny" / "3" / "model.onnx").read_bytes() == entry.path.read_bytes()
    # A second call keeps what the block had and changes what it is given; --reset drops it.
    assert saikyo("models", "config", "tiny", "--threads", "1", "--repository", str(repo.root)).returncode == 0
    assert json.loads((repo.root / "tiny" / "4" / META_FILE).read_text())["serving"] == {"max_batch_size": 4, "max_delay_ms": 1.5, "threads": 1}
    assert saikyo("models", "config", "tiny", "--reset", "--repository", str(repo.root)).returncode == 0
    assert "serving" not in json.loads((repo.root / "tiny" / "5" / META_FILE).read_text())


def test_an_unversioned_export_is_configured_in_place_and_an_explicit_load_picks_it_up(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repository")
    add_tiny_model(repo, "tiny")
    with running_server(repo.root, "tiny", tmp_path / "logs", "--model-control", "explicit") as server:
        done = saikyo("models", "config", "tiny", "--max-batch-size", "3", "--repository", str(repo.root))
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in (repo.root / "tiny").iterdir()) == ["meta.json", "model.onnx"]  # still version 1
        r = httpx.post(f"{server.url}/v2/repository/models/tiny/load", timeout=120)
        assert r.status_code == 200 and r.json()["version"] == "1", r.text
        assert serving(server.url, "tiny")["max_batch_size"] == {"value": 3, "source": "model"}


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--max-batch-size", "0"), "max_batch_size: input should be greater than or equal to 1"),
        (("--backend", "tensorflow"), "backend: input should be"),
        (("--threads", "100000"), "threads: input should be less than or equal to 256"),
        ((), "nothing to set"),
    ],
)
def test_models_config_refuses_a_bad_block_with_exit_2_and_writes_nothing(tmp_path: Path, flags: tuple[str, ...], says: str) -> None:
    repo = ModelRepository(tmp_path / "repository")
    entry = add_tiny_model(repo, "tiny")
    repo.publish("tiny", [entry.path], entry.meta)
    before = tree(repo.root)
    done = saikyo("models", "config", "tiny", *flags, "--repository", str(repo.root))
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert tree(repo.root) == before


def test_a_bad_block_at_load_fails_that_model_with_its_reason(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repository")
    for name in ("good", "bad"):
        add_tiny_model(repo, name)
    meta_file = repo.root / "bad" / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["serving"] = {"max_batch_size": "lots", "turbo": True}
    meta_file.write_text(json.dumps(meta))
    with running_server(
        repo.root, "good,bad", tmp_path / "logs", "--no-exit-on-error", "--model-control", "explicit", wait_ready=False
    ) as server:
        wait_for("both models tried", lambda: any(r["name"] == "bad" and r.get("reason") for r in index(server.url)), server)
        rows = {r["name"]: r for r in index(server.url)}
        assert rows["good"]["state"] == "READY"
        assert rows["bad"]["state"] == "UNAVAILABLE"
        reason = rows["bad"]["reason"]
        assert "meta.json serving" in reason and "max_batch_size" in reason and "unknown key 'turbo'" in reason, reason
        assert "Traceback" not in server.log_tail()
        r = httpx.post(f"{server.url}/classify?model=good", files=[("images", ("cat.jpg", _CAT, "image/jpeg"))], timeout=30)
        assert r.status_code == 200


def test_the_runner_gets_only_its_options(tmp_path: Path) -> None:
    """The narrowing itself: a runner is built from an entry and a RunnerOptions, no Settings in sight."""
    from saikyo.runtime import create_runner
    from saikyo.runtime.options import RunnerOptions

    repo = ModelRepository(tmp_path / "repository")
    entry = add_tiny_model(repo, "tiny")
    runner = create_runner(entry, RunnerOptions(backend="onnxruntime", device="cpu", threads=1, max_batch_size=4))
    assert runner.meta["backend"] == "onnxruntime" and runner.meta["intra_op_threads"] == 1
    runner.close()


def test_models_config_on_s3_publishes_the_next_version_there(
    tiny_repository: ModelRepository, s3_server: S3Server, tmp_path: Path, aws_env: None
) -> None:
    bucket = S3Repository(f"s3://{BUCKET}/configured", s3_server.url, ModelCache(tmp_path / "cache", 1 << 30))
    entry = tiny_repository.get("tiny")
    assert bucket.publish("tiny", [entry.path], entry.meta) == 1
    env = {k: v for k, v in s3_server.env().items() if not k.startswith("SAIKYO_")}
    args = ("--repository", bucket.location, "--s3-endpoint-url", s3_server.url)
    refused = saikyo("models", "config", "tiny", "--streams", "0", *args, env=env)
    assert refused.returncode == 2 and "streams" in refused.stderr and bucket.versions("tiny") == [1]
    done = saikyo("models", "config", "tiny", "--max-batch-size", "8", "--backend", "onnxruntime", *args, env=env)
    assert done.returncode == 0, done.stderr
    assert bucket.versions("tiny") == [1, 2]
    second = bucket.resolve("tiny", 2)
    assert second.meta["serving"] == {"max_batch_size": 8, "backend": "onnxruntime"}
    assert second.meta["files"] == bucket.resolve("tiny", 1).meta["files"]  # the same files, checked on download
    assert bucket.fetch(second).path.read_bytes() == entry.path.read_bytes()
