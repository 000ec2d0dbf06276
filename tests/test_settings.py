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
    assert s.max_batch_size == 4 and s.repository == Path("/tmp/x") and s.port == 8080


@pytest.mark.parametrize(("env", "match"), [({"SAIKYO_PORT": "eighty"}, "invalid literal"),
                                            ({"SAIKYO_ORT_SPINNING": "maybe"}, "true or false"),
                                            ({"SAIKYO_MODELS": " , "}, "at least one"),
                                            ({"SAIKYO_GIL_SWITCH_INTERVAL_MS": "0"}, "gil_switch_interval_ms"),
                                            ({"SAIKYO_GIL_SWITCH_INTERVAL_MS": "nan"}, "positive"),
                                            ({"SAIKYO_GIL_SWITCH_INTERVAL_MS": "inf"}, "below 1000")])
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
