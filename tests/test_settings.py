from __future__ import annotations

from pathlib import Path

import pytest

from saikyo.settings import Settings


def test_env_overrides_defaults_and_flags_override_env() -> None:
    env = {"SAIKYO_MAX_BATCH_SIZE": "32", "SAIKYO_MODELS": "resnet50, squeezenet1_1", "SAIKYO_ORT_SPINNING": "yes"}
    s = Settings.from_env(env)
    assert s.max_batch_size == 32 and s.models == ("resnet50", "squeezenet1_1") and s.ort_spinning is True
    assert s.default_model == "resnet50"
    s = Settings.from_env(env, max_batch_size=4, repository="/tmp/x", port=None)
    assert s.max_batch_size == 4 and s.repository == "/tmp/x" and s.port == 8080


def test_the_repository_is_a_directory_or_an_s3_uri_kept_as_written() -> None:
    assert Settings.from_env({"SAIKYO_REPOSITORY": "s3://models/prod/"}).repository == "s3://models/prod/"
    assert Settings(repository=Path("/srv/models")).repository == "/srv/models"  # a Path given in code
    s = Settings.from_env({"SAIKYO_S3_ENDPOINT_URL": "http://127.0.0.1:8333", "SAIKYO_MODEL_CACHE_DIR": "/tmp/c"})
    assert s.s3_endpoint_url == "http://127.0.0.1:8333" and s.model_cache_dir == Path("/tmp/c")
    assert Settings.from_env({"SAIKYO_S3_ENDPOINT_URL": ""}).s3_endpoint_url is None


@pytest.mark.parametrize(("env", "match"), [({"SAIKYO_PORT": "eighty"}, "invalid literal"),
                                            ({"SAIKYO_ORT_SPINNING": "maybe"}, "true or false"),
                                            ({"SAIKYO_MODELS": " , "}, "at least one"),
                                            ({"SAIKYO_GIL_SWITCH_INTERVAL_MS": "0"}, "gil_switch_interval_ms"),
                                            ({"SAIKYO_GIL_SWITCH_INTERVAL_MS": "nan"}, "positive"),
                                            ({"SAIKYO_GIL_SWITCH_INTERVAL_MS": "inf"}, "below 1000"),
                                            ({"SAIKYO_BACKEND": "tensorflow"}, "'backend' must be one of auto"),
                                            ({"SAIKYO_PRECISION": "fp16"}, "'precision' must be one of auto, fp32, bf16"),
                                            ({"SAIKYO_OPENVINO_STREAMS": "0"}, "'openvino_streams' must be at least 1"),
                                            ({"SAIKYO_MODEL_CONTROL": "auto"}, "none, explicit, poll"),
                                            ({"SAIKYO_REPOSITORY_POLL_S": "0"}, "repository_poll_s")])
def test_bad_values_say_which_setting(env: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Settings.from_env(env)


def test_settings_built_directly_are_checked_too() -> None:
    with pytest.raises(ValueError, match="gil_switch_interval_ms"):
        Settings(gil_switch_interval_ms=0.0)

def test_the_serving_process_takes_the_gil_switch_interval() -> None:
    import sys

    from fastapi.testclient import TestClient

    from saikyo.server import create_app

    default = sys.getswitchinterval()
    try:
        app = create_app(Settings.from_env({"SAIKYO_GIL_SWITCH_INTERVAL_MS": "0.5"}, models="nothing-to-load"))
        with TestClient(app):
            assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(default)


def test_every_setting_but_the_keys_is_a_serve_flag() -> None:
    import typer.main

    from saikyo.cli import app
    from saikyo.settings import cli_fields

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    flags = {p.name for p in serve.params if not p.hidden}  # hidden: old flag names and --no- forms
    assert flags == {f.name for f in cli_fields()}
    assert "api_keys" not in flags and "api_keys_file" in flags and len(flags) >= 40


def test_serve_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import saikyo.server
    from saikyo.cli import app

    seen: list[Settings] = []

    def fake_create_app(settings: Settings) -> None:
        seen.append(settings)
        raise SystemExit(0)  # stop before serving

    monkeypatch.setattr(saikyo.server, "create_app", fake_create_app)
    monkeypatch.setenv("SAIKYO_MAX_QUEUE_IMAGES", "99")
    args = ["serve", "--ort-spinning", "--batch-buckets", "1,8", "--dtype", "bf16", "--max-batch-size", "8",
            "--gil-switch-interval-ms", "0.5", "--public-endpoints", "", "--models", "resnet50"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (s,) = seen
    assert s.ort_spinning is True and s.batch_buckets == (1, 8) and s.torch_dtype == "bf16"
    assert s.max_batch_size == 8 and s.gil_switch_interval_ms == 0.5 and s.public_endpoints == ()
    assert s.max_queue_images == 99 and s.port == 8080  # the environment, then the default
    bad = CliRunner().invoke(app, ["serve", "--max-batch-size", "many"])
    assert bad.exit_code == 2 and "--max-batch-size" in bad.output
