"""The suite's shared fixtures; what tests import is in tests/support/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.faultmodels import slow_classifier
from support.paths import ROOT
from support.s3server import S3Server, running_s3, unavailable
from support.serverproc import ServerProcess, running_server
from support.tinymodel import add_model, add_tiny_model, add_tiny_models

from saikyo.models.repository import ModelRepository


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    d = ROOT / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """`tiny` (32 px) and `tiny2` (48 px): microseconds per image. Shared: a test that adds to a repository
    copies this one (support.tinymodel.copy_repository)."""
    return add_tiny_models(ModelRepository(tmp_path_factory.mktemp("tiny-repository")))


@pytest.fixture(scope="session")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """`slow` (64 px, about 10 ms per image on two cores: requests queue and share batches) and `tiny`."""
    repo = ModelRepository(tmp_path_factory.mktemp("slow-repository"))
    add_tiny_model(repo, "tiny", input_size=32, seed=0)
    add_model(repo, "slow", slow_classifier(input_size=64, layers=8), input_size=64)
    return repo


@pytest.fixture(scope="session")
def pretrained_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """The default model exported for real: ImageNet-pretrained EfficientNet-Lite0."""
    from saikyo.models.export import export_model

    repo = ModelRepository(tmp_path_factory.mktemp("pretrained-repository"))
    export_model("efficientnet_lite0", repo, weights="imagenet")
    return repo


@pytest.fixture(scope="session")
def tiny_server(tiny_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tiny_repository.root, "tiny,tiny2", tmp_path_factory.mktemp("logs")) as server:
        yield server


@pytest.fixture(scope="session")
def pretrained_server(
    pretrained_repository: ModelRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with running_server(
        pretrained_repository.root, "efficientnet_lite0", tmp_path_factory.mktemp("logs")
    ) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS on loopback (tests/support/s3server.py), bucket `models`; skipped, with the reason, where it cannot run."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with running_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process talks to the test server with the standard AWS variables, as any client would."""
    for key, value in s3_server.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
