"""BentoML: the same /classify API as a BentoML service with adaptive batching on.

    python benchmarks/peers/bentoml_app.py MODEL_DIR --engine onnxruntime|openvino --port 8093

Runs `bentoml serve` on the service below (one worker); the API takes the multipart field `images` as a
list of images and is batchable, so BentoML's adaptive batcher joins requests up to MAX_BATCH images.
"""

import os
import sys
from pathlib import Path

import bentoml
import numpy as np
from PIL.Image import Image

import common

MAX_BATCH, MAX_LATENCY_MS = 64, 10_000  # images per batch; the latency bound is BentoML's batching SLO


@bentoml.service(workers=1, logging={"access": {"enabled": False}})  # no line per request
class Classifier:
    def __init__(self) -> None:
        model_dir = Path(os.environ["PEER_MODEL_DIR"])
        self.pp = common.preprocessing(model_dir)
        self.forward = common.engine(model_dir, os.environ["PEER_ENGINE"])

    @bentoml.api(route="/classify", batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: list[Image]) -> list[dict[str, float]]:
        return common.top5(self.forward(np.stack([common.preprocess(im, self.pp) for im in images])))


if __name__ == "__main__":
    args = common.arguments(__doc__)
    os.environ.update(PEER_MODEL_DIR=str(args.model_dir.resolve()), PEER_ENGINE=args.engine)
    here = str(Path(__file__).resolve().parent)
    os.execv(sys.executable, [sys.executable, "-m", "bentoml", "serve", "bentoml_app:Classifier", "--working-dir",
                              here, "--host", "127.0.0.1", "--port", str(args.port)])  # fmt: skip
