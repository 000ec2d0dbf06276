"""What every runner offers the batcher and the server."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from saikyo.zoo import Preprocessing


class RunnerError(RuntimeError):
    """A model could not be loaded or run."""


class Runner(Protocol):
    name: str
    preprocessing: Preprocessing
    num_classes: int
    meta: dict[str, Any]  # the repository's meta.json, plus what the runner adds (backend, device)

    def infer_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] RGB, already resized and cropped -> float32 probabilities [N, classes]."""
        ...

    def infer_tensor(self, tensor: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W], already normalised -> float32 probabilities [N, classes]."""
        ...

    def close(self) -> None: ...
