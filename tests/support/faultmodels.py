"""Generated ONNX models that misbehave on purpose: real graphs that fail the way real models do.

- poison: fails at run time (ONNX Runtime raises) for any batch holding a bright image (mean normalised
  value > 2, e.g. an all-white picture); every other batch runs normally. Warm-up (black images) passes.
- narrow: fails at run time for batches larger than `k`; with max_batch_size > k its warm-up fails.
- slow: a deeper conv stack, milliseconds per image, so that a flood outruns it.
- corrupt: a model.onnx that is not ONNX at all, so loading fails.
"""

from __future__ import annotations


import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from support.tinymodel import add_model  # noqa: F401  (tests import it from here beside the models)

CLASSES = 1000


def _head(rng: np.random.Generator, source: str, channels: int) -> tuple[list, list]:
    fc = rng.standard_normal((channels, CLASSES)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", [source], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits_raw"]),
    ]
    return nodes, [numpy_helper.from_array(fc, "fc")]


def _conv(rng: np.random.Generator, name: str, source: str, cin: int, cout: int) -> tuple[list, list]:
    w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    b = np.zeros(cout, np.float32)
    nodes = [
        helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [f"{name}_c"], [name]),
    ]
    return nodes, [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]


def _model(nodes: list, inits: list, input_size: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "fault",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, input_size, input_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def poison_classifier(input_size: int = 32, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    conv, conv_init = _conv(rng, "c1", "input", 3, 8)
    head, head_init = _head(rng, "c1", 8)
    poison = [
        # Per-image mean, then the batch's brightest image: > 2 selects index 1 of a 1-element table,
        # which ONNX Runtime's Gather rejects at run time ("indices element out of data bounds").
        helper.make_node("ReduceMean", ["input"], ["image_mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("ReduceMax", ["image_mean"], ["batch_max"], keepdims=0),
        helper.make_node("Greater", ["batch_max", "threshold"], ["is_poison"]),
        helper.make_node("Cast", ["is_poison"], ["poison_index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "poison_index"], ["zero"], axis=0),
        helper.make_node("Add", ["logits_raw", "zero"], ["logits"]),
    ]
    inits = conv_init + head_init + [
        numpy_helper.from_array(np.array(2.0, np.float32), "threshold"),
        numpy_helper.from_array(np.zeros(1, np.float32), "table"),
    ]
    return _model(conv + head + poison, inits, input_size)


def narrow_classifier(k: int, input_size: int = 32, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    conv, conv_init = _conv(rng, "c1", "input", 3, 8)
    head, head_init = _head(rng, "c1", 8)
    narrow = [
        # Gather rows 0..N-1 of a k-row table: out of bounds for batches larger than k.
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero_i"], ["batch"], axis=0),
        helper.make_node("Range", ["zero_i", "batch", "one_i"], ["rows"]),
        helper.make_node("Gather", ["table", "rows"], ["zeros"], axis=0),
        helper.make_node("Add", ["logits_raw", "zeros"], ["logits"]),
    ]
    inits = conv_init + head_init + [
        numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
        numpy_helper.from_array(np.array(1, np.int64), "one_i"),
        numpy_helper.from_array(np.zeros((k, 1), np.float32), "table"),
    ]
    return _model(conv + head + narrow, inits, input_size)


def slow_classifier(input_size: int = 32, layers: int = 4, channels: int = 64, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = _conv(rng, "c0", "input", 3, channels)
    source = "c0"
    for i in range(1, layers + 1):
        n, w = _conv(rng, f"c{i}", source, channels, channels)
        nodes += n
        inits += w
        source = f"c{i}"
    head, head_init = _head(rng, source, channels)
    nodes += head + [helper.make_node("Identity", ["logits_raw"], ["logits"])]
    return _model(nodes, inits + head_init, input_size)
