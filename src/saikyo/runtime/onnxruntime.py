"""ONNX Runtime runner: the CPU path (and CUDA / TensorRT execution providers when onnxruntime-gpu is here).

The repository's model.onnx takes a normalised float32 NCHW tensor (the standard artefact, and what v2
FP32 clients send). For images we prepend a few nodes -- uint8 NHWC -> transpose -> cast -> scale ->
shift -- so the per-pixel float math runs inside the runtime's vectorised kernels instead of numpy.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from saikyo.inference.predictions import softmax
from saikyo.models import zoo
from saikyo.models.repository import Entry
from saikyo.runtime.base import Capabilities, RunnerError
from saikyo.runtime.options import RunnerOptions
from saikyo.inference.preprocessing import Preprocessing

log = logging.getLogger(__name__)

PIXELS_INPUT = "pixels"
OPTIMIZED_FILE = "model.optimized.onnx"


def with_pixel_front(model: onnx.ModelProto, pp: Preprocessing) -> onnx.ModelProto:
    """Return a copy of `model` whose input is uint8 [N, H, W, 3] pixels instead of the float tensor."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if len(graph.input) != 1:
        raise RunnerError(f"expected one graph input, found {len(graph.input)}")
    tensor_name = graph.input[0].name
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    batch = batch_dim.dim_param or "N"
    scale, shift = (a.reshape(1, 3, 1, 1) for a in pp.pixel_affine())
    graph.initializer.extend(
        [numpy_helper.from_array(scale, "pixels_scale"), numpy_helper.from_array(shift, "pixels_shift")]
    )
    front = [
        # Transpose while still uint8: a quarter of the bytes to move.
        helper.make_node("Transpose", [PIXELS_INPUT], ["pixels_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["pixels_nchw"], ["pixels_f32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pixels_f32", "pixels_scale"], ["pixels_scaled"]),
        helper.make_node("Add", ["pixels_scaled", "pixels_shift"], [tensor_name]),
    ]
    for node in reversed(front):
        graph.node.insert(0, node)
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info(PIXELS_INPUT, TensorProto.UINT8, [batch, pp.input_size, pp.input_size, 3])
    )
    return model


def session_options(options: RunnerOptions, optimized_path: Path | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    spin = "1" if options.ort_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device in ("cuda", "auto"):
        wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        if device == "cuda" and not wanted:
            raise RunnerError("device 'cuda' asked for, but this onnxruntime has no CUDA provider")
        return wanted + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRunner:
    capabilities = Capabilities()
    stats = None

    def __init__(
        self,
        name: str,
        model: onnx.ModelProto,
        meta: dict[str, Any],
        options: RunnerOptions,
        model_file: Path | None = None,
    ) -> None:
        if options.precision == "bf16":
            raise RunnerError("ONNX Runtime runs fp32 here (and int8 files): bf16 needs --backend openvino")
        self.name = name
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.meta = dict(meta)
        self._options = options
        self._providers = providers_for(options.device)
        self._tensor_model = model
        self._tensor_session: ort.InferenceSession | None = None
        self._tensor_lock = threading.Lock()

        pixel_model = with_pixel_front(model, self.preprocessing)
        optimized = None
        if options.ort_cache_optimized and model_file is not None:
            optimized = model_file.parent / OPTIMIZED_FILE
        try:
            if optimized is not None and optimized.is_file() and optimized.stat().st_mtime >= model_file.stat().st_mtime:
                so = session_options(options)
                # The cached graph is already optimised: skip the work at load.
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                self._session = ort.InferenceSession(str(optimized), so, providers=self._providers)
            else:
                so = session_options(options, optimized)
                self._session = ort.InferenceSession(pixel_model.SerializeToString(), so, providers=self._providers)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise RunnerError(f"ONNX Runtime could not load model {name!r}: {exc}") from exc
        out = self._session.get_outputs()[0]
        self.num_classes = int(out.shape[-1]) if isinstance(out.shape[-1], int) else int(meta.get("num_classes", 1000))
        self._output = out.name
        self.meta.update(
            backend="onnxruntime",
            device="cuda" if self._session.get_providers()[0] != "CPUExecutionProvider" else "cpu",
            providers=self._session.get_providers(),
            intra_op_threads=options.threads,
            precision=meta.get("precision") or zoo.precision_of(name),
        )

    @classmethod
    def load(cls, entry: Entry, options: RunnerOptions) -> "OnnxRunner":
        try:
            graph = onnx.load(str(entry.path))
        except Exception as exc:
            raise RunnerError(f"model file for {entry.name!r} is unreadable: {exc}") from exc
        return cls(entry.name, graph, entry.meta, options, model_file=entry.path)

    def infer_pixels(self, pixels: np.ndarray) -> np.ndarray:
        (logits,) = self._session.run([self._output], {PIXELS_INPUT: pixels})
        return softmax(logits)

    def infer_tensor(self, tensor: np.ndarray) -> np.ndarray:
        # Built on first use: most deployments never receive preprocessed tensors.
        with self._tensor_lock:
            if self._tensor_session is None:
                so = session_options(self._options)
                self._tensor_session = ort.InferenceSession(
                    self._tensor_model.SerializeToString(), so, providers=self._providers
                )
        session = self._tensor_session
        (logits,) = session.run([self._output], {session.get_inputs()[0].name: tensor})
        return softmax(logits)

    def close(self) -> None:
        # Everything that holds the weights: an unloaded model gives its memory back.
        self._session = None  # type: ignore[assignment]
        self._tensor_session = None
        self._tensor_model = None  # type: ignore[assignment]
