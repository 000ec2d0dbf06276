"""Triton through PyTriton: the model behind Triton's own HTTP server, its dynamic batcher on.

    python benchmarks/peers/pytriton_app.py MODEL_DIR --engine onnxruntime|openvino --port 8092

Triton speaks the Open Inference Protocol, not multipart: a client sends the encoded images as the BYTES
input `images` of shape [N, 1] and asks for the top 5 of output `probabilities` through Triton's
classification extension (saikyo's load generator does with --protocol v2). Triton's dynamic batcher
joins requests up to MAX_BATCH images; the bound function decodes them and runs one forward pass.
"""

import os
import socket
import sysconfig

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

import common

MAX_BATCH = 64  # images per forward pass

args = common.arguments(__doc__)
# Triton's Python stub links libpython3.X.so and finds the system's first; this interpreter's own must win
# (a pyenv Python beside Debian's 3.11 otherwise gets "'_thread.RLock' object has no attribute ...").
os.environ["LD_LIBRARY_PATH"] = ":".join(filter(None, [sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH")]))
pp = common.preprocessing(args.model_dir)
forward = common.engine(args.model_dir, args.engine)


@batch
def infer(images: np.ndarray) -> dict[str, np.ndarray]:
    pixels = np.stack([common.preprocess(bytes(row[0]), pp) for row in images])
    return {"probabilities": common.softmax(forward(pixels)).astype(np.float32)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1",
                      grpc_port=free_port(), metrics_port=free_port(), allow_metrics=False)  # fmt: skip
with Triton(config=config) as triton:
    triton.bind(
        model_name=args.name or args.model_dir.name,
        infer_func=infer,
        inputs=[Tensor(name="images", dtype=bytes, shape=(1,))],
        outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,))],
        config=ModelConfig(max_batch_size=MAX_BATCH, batcher=DynamicBatcher()),
        strict=True,
    )
    triton.serve()
