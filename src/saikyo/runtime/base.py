"""What every runner offers the batcher and the server, and what some offer besides (declared, not probed).

A new backend implements `Runner` and fills in `capabilities`; the server reads the capabilities to choose
its pipeline and never looks for methods by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from saikyo.inference.imaging import ImageError, RequestBudget
from saikyo.inference.preprocessing import Preprocessing
from saikyo.runtime.torch.pipelining import PipelineStats


class RunnerError(RuntimeError):
    """A model could not be loaded or run."""


@dataclass(frozen=True)
class Capabilities:
    # The runner decodes encoded images on its own device (`DeviceDecoder`): the server hands it the
    # request's bytes instead of decoding them in its CPU pool, and batches the decoded images it returns.
    device_decode: bool = False
    # Forward passes the runner runs at once (e.g. OpenVINO streams, one infer request each): the batcher
    # keeps up to this many batches in flight, calling infer from as many threads.
    max_in_flight: int = 1


class Runner(Protocol):
    name: str
    preprocessing: Preprocessing
    num_classes: int
    meta: dict[str, Any]  # the repository's meta.json, plus what the runner adds (backend, device)
    capabilities: Capabilities
    # Running totals of a runner that pipelines batches on a device (batches, device vs host seconds, in
    # flight now), which /metrics shows; None for a runner that keeps none.
    stats: PipelineStats | None

    def infer_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] RGB, already resized and cropped -> float32 probabilities [N, classes]."""
        ...

    def infer_tensor(self, tensor: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W], already normalised -> float32 probabilities [N, classes]."""
        ...

    def close(self) -> None: ...


class DeviceDecoder(Runner, Protocol):
    """A runner whose capabilities say `device_decode`."""

    def decode_images(
        self, blobs: Sequence[bytes], max_pixels: int | None = None, budget: RequestBudget | None = None
    ) -> list[Any | ImageError]:
        """Encoded images -> one opaque decoded image each (e.g. a device tensor), or the ImageError that
        says why that one cannot be used. Called from the server's decode threads; each image takes its
        pixels from the request's `budget` before it is decoded (imaging.RequestBudget)."""
        ...

    def infer_images(self, images: Sequence[Any]) -> np.ndarray:
        """Images from decode_images -> float32 probabilities [N, classes]."""
        ...


def device_decoder(runner: Runner) -> DeviceDecoder | None:
    """The runner as a DeviceDecoder when it declares that capability, else None."""
    return cast(DeviceDecoder, runner) if runner.capabilities.device_decode else None
