"""Image classifiers as other toolchains leave them, built here (no downloads): what `models import` meets."""

from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image


def conv_classifier(
    classes: int = 5,
    size: int | str = 32,
    layout: str = "nhwc",
    batch: int | str = 1,
    softmax: bool = False,
    dtype: int = TensorProto.FLOAT,
    input_name: str = "serving_default_image:0",
    output_name: str = "StatefulPartitionedCall:0",
    seed: int = 0,
    shared_shape: bool = False,
) -> onnx.ModelProto:
    """conv -> relu -> global pool -> flatten by a Reshape that spells the batch out -> dense (-> Softmax),
    the way TensorFlow-to-ONNX files with a fixed batch of 1 look."""
    rng = np.random.default_rng(seed)
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    w = rng.standard_normal((8, 3, 3, 3)).astype(np_dtype)
    fc = rng.standard_normal((8, classes)).astype(np_dtype)
    flat_batch = batch if isinstance(batch, int) else -1
    shape = np.array([flat_batch, 8] if isinstance(batch, int) else [-1, 8], np.int64)
    x = input_name
    nodes = []
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    scores = "scores" if softmax else output_name
    nodes += [
        helper.make_node("Conv", [x, "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"]),
    ]
    if shared_shape:  # the batch-spelling shape feeds two Reshapes: nothing the import may rewrite alone
        nodes.append(helper.make_node("Reshape", ["flat", "flat_shape"], ["flat2"]))
    nodes.append(helper.make_node("MatMul", ["flat2" if shared_shape else "flat", "fc"], [scores]))
    if softmax:
        nodes.append(helper.make_node("Softmax", [scores], [output_name], axis=-1))
    dims = [batch, size, size, 3] if layout == "nhwc" else [batch, 3, size, size]
    graph = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info(input_name, dtype, dims)],
        [helper.make_tensor_value_info(output_name, dtype, [batch, classes])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(shape, "flat_shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def two_inputs() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["a", "b"], ["c"])]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 8, 8]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    return _model(graph)


def token_ids() -> onnx.ModelProto:
    """A text model's input: int64 token ids [N, T]."""
    table = numpy_helper.from_array(np.zeros((100, 4), np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"]), helper.make_node("ReduceMean", ["emb"], ["out"], axes=[1], keepdims=0)]
    graph = helper.make_graph(
        nodes,
        "text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
        [table],
    )
    return _model(graph, opset=17)


def feature_map() -> onnx.ModelProto:
    """An image in, a feature map out: [N, 8, H, W] is not [N, K] class scores."""
    w = numpy_helper.from_array(np.ones((8, 3, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["image", "w"], ["features"])]
    graph = helper.make_graph(
        nodes,
        "fm",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [w],
    )
    return _model(graph)


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def photos_as_jpegs(names: tuple[str, ...]) -> list[bytes]:
    """scikit-image's bundled photos, as JPEG files a client would upload."""
    import skimage.data

    out = []
    for name in names:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out
