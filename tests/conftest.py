from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from s3server import S3Server, running_s3, unavailable  # noqa: E402
from serverproc import ServerProcess, running_server  # noqa: E402
from tinymodel import add_tiny_model  # noqa: E402

from saikyo.models.repository import ModelRepository  # noqa: E402

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
CAT = DATA / "cat.jpg"
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    d = ROOT / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repo = ModelRepository(tmp_path_factory.mktemp("tiny-repository"))
    repo.root.mkdir(parents=True, exist_ok=True)
    add_tiny_model(repo, "tiny", input_size=32, seed=0)
    add_tiny_model(repo, "tiny2", input_size=48, seed=1)
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
    """SeaweedFS on loopback (tests/s3server.py), bucket `models`; skipped, with the reason, where it cannot run."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with running_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
