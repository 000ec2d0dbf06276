"""A user's ONNX image classifier, inspected and rewritten to the repository's contract (models/contract.py).

Whatever the file takes (NCHW or NHWC, float32 or float16, BGR, any names, a fixed batch of 1) and gives
(logits or probabilities, any names), the graph that is written takes "input" float32 [N, 3, S, S]
normalised RGB and gives "logits" float32 [N, K]: the runners then fold in the uint8 front and batch it
exactly as they do a zoo export, on every backend. The rewrite is checked against the original file with
ONNX Runtime before anything is written.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from saikyo.inference.predictions import softmax
from saikyo.models.contract import INPUT_NAME, OUTPUT_NAME
from saikyo.models.errors import ImportRejected

LAYOUTS = ("nchw", "nhwc")
OUTPUT_KINDS = ("logits", "probabilities")
FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
# Largest model file read: protobuf cannot hold more than 2 GiB in one message anyway.
MAX_MODEL_BYTES = 2 << 30
BATCH_DIM = "N"
# Softmax of the rewritten graph vs the original's probabilities, on the same inputs; float16 graphs
# round far more coarsely. A wrong rewrite (a channel swapped, rows mixed) is off by far more.
CHECK_ATOL = {"float32": 1e-4, "float16": 5e-3}
CHECK_BATCHES = (1, 3)
_PREFIX = "saikyo_import_"


@dataclass(frozen=True)
class Inspected:
    """What the file takes and gives, as found (and forced by flags)."""

    input_name: str
    output_name: str
    dtype: str  # float32 | float16
    layout: str  # nchw | nhwc
    size: int  # H == W
    batch: int | None  # None when symbolic in the file
    num_classes: int
    output: str  # logits | probabilities
    ends_in_softmax: bool


def load(path: Path) -> onnx.ModelProto:
    """The file as an ONNX model, external weights included, or ImportRejected saying why not."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImportRejected(f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_MODEL_BYTES:
        raise ImportRejected(f"{path} is {size} bytes; ONNX files over {MAX_MODEL_BYTES} bytes are not supported")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError, a missing external file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportRejected(f"{path} is not a readable ONNX model (truncated or not ONNX?): {first[:300]}") from None
    return model


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _describe(value: onnx.ValueInfoProto) -> str:
    kind = TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()
    dims = ["?" if d is None else str(d) for d in _dims(value)]
    return f"{value.name!r} {kind}[{', '.join(dims)}]"


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initialisers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initialisers]


def inspect(
    model: onnx.ModelProto, layout: str | None = None, size: int | None = None, output: str | None = None
) -> Inspected:
    """Check that `model` is a single-input image classifier and say how it is shaped; ImportRejected
    names what was found and what was expected."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        found = ", ".join(_describe(i) for i in inputs) or "none"
        raise ImportRejected(f"the model has {len(inputs)} inputs ({found}); expected one image input [N, 3, H, W] or [N, H, W, 3]")
    value = inputs[0]
    elem = value.type.tensor_type.elem_type
    dims = _dims(value)
    if elem not in FLOAT_TYPES or len(dims) != 4:
        raise ImportRejected(
            f"the model's input is {_describe(value)}; expected an image: float32 or float16 of rank 4, "
            "[N, 3, H, W] or [N, H, W, 3]"
        )
    if layout is None:
        if dims[1] == 3 and dims[3] != 3:
            layout = "nchw"
        elif dims[3] == 3 and dims[1] != 3:
            layout = "nhwc"
        elif dims[1] == 3:
            layout = "nchw"  # [N, 3, H, 3]: NCHW is the common case; --layout says otherwise
        else:
            raise ImportRejected(f"the model's input is {_describe(value)}: no axis 1 or 3 of size 3 to tell the layout; pass --layout nchw|nhwc")
    channels, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
    if channels not in (3, None) and not isinstance(channels, str):
        raise ImportRejected(f"the model's input is {_describe(value)}: {channels} channels in layout {layout}; expected 3 (RGB or BGR)")
    fixed = [d for d in (h, w) if isinstance(d, int) and d > 0]
    if len(set(fixed)) > 1:
        raise ImportRejected(f"the model's input is {_describe(value)}: {h}x{w} is not square; expected H == W")
    if fixed:
        if size is not None and size != fixed[0]:
            raise ImportRejected(f"--size {size} does not match the model's input {_describe(value)}: it is fixed at {fixed[0]}")
        size = fixed[0]
    elif size is None:
        raise ImportRejected(f"the model's input is {_describe(value)}: height and width are dynamic; pass --size S (the image side the model expects)")
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None

    outputs = list(model.graph.output)
    if len(outputs) != 1:
        found = ", ".join(_describe(o) for o in outputs)
        raise ImportRejected(f"the model has {len(outputs)} outputs ({found}); expected one, [N, K] class scores")
    out = outputs[0]
    out_dims = _dims(out)
    if out.type.tensor_type.elem_type not in FLOAT_TYPES or (out_dims and len(out_dims) != 2):
        raise ImportRejected(f"the model's output is {_describe(out)}; expected float32 or float16 [N, K] class scores")
    producer = next((n for n in model.graph.node if out.name in n.output), None)
    ends_in_softmax = producer is not None and producer.op_type == "Softmax" and _softmax_on_classes(producer, model)
    if output is None:
        output = "probabilities" if ends_in_softmax else "logits"
    elif output == "logits" and ends_in_softmax:
        raise ImportRejected("the graph ends in Softmax, so its output is probabilities, not logits: drop --output logits")
    num_classes = _num_classes(model, value, layout, size, out)
    return Inspected(value.name, out.name, FLOAT_TYPES[elem], layout, size, batch, num_classes, output, ends_in_softmax)


def _softmax_on_classes(node: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), None)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if axis is None:
        axis = -1 if opset >= 13 else 1
    return axis in (1, -1)


def _num_classes(model: onnx.ModelProto, value: onnx.ValueInfoProto, layout: str, size: int, out: onnx.ValueInfoProto) -> int:
    """K from the output's declared shape, else from one run: files often leave it symbolic."""
    dims = _dims(out)
    if len(dims) == 2 and isinstance(dims[1], int) and dims[1] > 0:
        return dims[1]
    got = _run(model, _source_input(np.zeros((1, 3, size, size), np.float32), layout, FLOAT_TYPES[value.type.tensor_type.elem_type], "rgb"))
    if got.ndim != 2 or got.shape[0] != 1:
        raise ImportRejected(f"the model's output for one image has shape {list(got.shape)}; expected [N, K] class scores")
    return int(got.shape[1])


def to_contract(model: onnx.ModelProto, found: Inspected, channel_order: str = "rgb") -> tuple[onnx.ModelProto, list[str], dict[str, Any]]:
    """The rewritten model, what was done to it (for meta.json and the user) and its check against the
    file. The batch stays fixed only where the graph cannot take another (then the notes say so)."""
    notes: list[str] = []
    rewritten = _rewrite(model, found, channel_order, notes)
    if found.batch is None:
        return rewritten, notes, check(model, rewritten, found, channel_order)
    with contextlib.suppress(ImportRejected):
        result = check(model, rewritten, found, channel_order)
        return rewritten, [*notes, f"the file's fixed batch of {found.batch} made symbolic"], result
    patched = _batch_free_reshapes(rewritten, found.batch)
    if patched:
        with contextlib.suppress(ImportRejected):
            result = check(model, rewritten, found, channel_order)
            return rewritten, [*notes, f"the file's fixed batch of {found.batch} made symbolic ({patched} Reshape shapes freed of it)"], result
    rewritten = _rewrite(model, found, channel_order, [], symbolic=False)
    result = check(model, rewritten, found, channel_order, batches=(found.batch,))
    return rewritten, [*notes, f"the graph only takes a batch of {found.batch}: it is served with max_batch_size {found.batch}"], result


def is_fixed_batch(model: onnx.ModelProto) -> bool:
    return not model.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def _rewrite(model: onnx.ModelProto, found: Inspected, channel_order: str, notes: list[str], symbolic: bool = True) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    # Free the contract's names should the graph use them inside, then move the file's own I/O aside.
    for name in (INPUT_NAME, OUTPUT_NAME):
        if name not in (found.input_name, found.output_name):
            _rename(graph, name, f"{_PREFIX}{name}")
    source_in, source_out = f"{_PREFIX}source_input", f"{_PREFIX}source_output"
    _rename(graph, found.input_name, source_in)
    _rename(graph, found.output_name, source_out)

    front: list[onnx.NodeProto] = []
    x = INPUT_NAME
    if channel_order == "bgr":
        graph.initializer.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), f"{_PREFIX}bgr"))
        front.append(helper.make_node("Gather", [x, f"{_PREFIX}bgr"], [f"{_PREFIX}bgr_input"], axis=1))
        x = f"{_PREFIX}bgr_input"
        notes.append("RGB -> BGR channel swap added in front")
    if found.layout == "nhwc" and _drop_leading_transpose(graph, source_in):
        notes.append("the file's own NHWC -> NCHW transpose dropped: the graph takes NCHW as it is")
    elif found.layout == "nhwc":
        front.append(helper.make_node("Transpose", [x], [f"{_PREFIX}nhwc_input"], perm=[0, 2, 3, 1]))
        x = f"{_PREFIX}nhwc_input"
        notes.append("NCHW -> NHWC transpose added in front")
    if found.dtype == "float16":
        front.append(helper.make_node("Cast", [x], [f"{_PREFIX}f16_input"], to=TensorProto.FLOAT16))
        x = f"{_PREFIX}f16_input"
        notes.append("float32 -> float16 cast added in front")
    front.append(helper.make_node("Identity", [x], [source_in]))
    for node in reversed(front):
        graph.node.insert(0, node)

    y = source_out
    producer = next(n for n in graph.node if source_out in n.output)
    if found.output == "probabilities":
        if found.ends_in_softmax and not any(source_out in n.input for n in graph.node):
            graph.node.remove(producer)  # its input is the logits: the runners' softmax is the only one
            y = producer.input[0]
            notes.append("final Softmax removed: the server applies softmax once")
        else:
            graph.node.append(helper.make_node("Log", [y], [f"{_PREFIX}log_probs"]))
            y = f"{_PREFIX}log_probs"
            notes.append("Log added after the probabilities: the server's softmax gives them back unchanged")
    if _output_is_f16(model):
        graph.node.append(helper.make_node("Cast", [y], [OUTPUT_NAME], to=TensorProto.FLOAT))
    else:
        graph.node.append(helper.make_node("Identity", [y], [OUTPUT_NAME]))

    batch: str | int = BATCH_DIM if symbolic or found.batch is None else found.batch
    initialisers = {t.name for t in graph.initializer}
    # Old files (IR < 4) list their weights as inputs too: those stay.
    weights = [onnx.ValueInfoProto.FromString(i.SerializeToString()) for i in graph.input if i.name in initialisers]
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 3, found.size, found.size]))
    graph.input.extend(weights)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, found.num_classes]))
    # Intermediate shapes recorded for the old batch would contradict the new one; runtimes infer them again.
    del graph.value_info[:]
    return model


def _drop_leading_transpose(graph: onnx.GraphProto, source_in: str) -> bool:
    """An NHWC graph that turns its input to NCHW first (TF converters, torch wrappers do) needs no NHWC:
    that Transpose becomes an Identity and none is added in front. Otherwise ONNX Runtime cancels the two
    transposes by running the normalisation in NHWC, three channels innermost: several percent slower."""
    consumers = [n for n in graph.node if source_in in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "Transpose" or any(o.name == source_in for o in graph.output):
        return False
    node = consumers[0]
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    if perm != [0, 3, 1, 2]:
        return False
    node.op_type = "Identity"
    del node.attribute[:]
    return True


def _output_is_f16(model: onnx.ModelProto) -> bool:
    """Whether the file's output is float16 (then so is the tensor that becomes "logits": a removed
    Softmax's input and an added Log keep the type)."""
    return model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def _batch_free_reshapes(model: onnx.ModelProto, batch: int) -> int:
    """Reshape targets that spell the fixed batch out ([1, 512] in a flatten), made to copy the batch from
    their input instead (0 in Reshape's shape). Returns how many were changed."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    changed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants or uses[node.input[1]] != 1:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        tensor = constants[node.input[1]]
        shape = numpy_helper.to_array(tensor).copy()
        if shape.ndim == 1 and shape.size >= 1 and shape[0] == batch:
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), tensor.name))
            changed += 1
    return changed


def _source_input(x: np.ndarray, layout: str, dtype: str, channel_order: str) -> np.ndarray:
    """What the original file takes for normalised RGB NCHW float32 `x`."""
    if channel_order == "bgr":
        x = x[:, ::-1]
    if layout == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x.astype(np.float16 if dtype == "float16" else np.float32))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failed run is reported below, once, in our words
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x})
    except Exception as exc:  # ORT's own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportRejected(f"ONNX Runtime cannot run the model: {first[:300]}") from None
    return np.asarray(got, np.float32)


def check(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    found: Inspected,
    channel_order: str,
    batches: tuple[int, ...] = CHECK_BATCHES,
) -> dict[str, Any]:
    """Run both on the same random inputs: the rewritten graph's softmax must equal the original's class
    probabilities row for row (the original run one image at a time where its batch is fixed)."""
    rng = np.random.default_rng(0)
    worst = 0.0
    tolerance = CHECK_ATOL[found.dtype]
    for batch in batches:
        x = rng.standard_normal((batch, 3, found.size, found.size)).astype(np.float32)
        got = _run(rewritten, x)
        if got.shape != (batch, found.num_classes):
            raise ImportRejected(f"the rewritten model returned shape {list(got.shape)} for {batch} images; expected [{batch}, {found.num_classes}]")
        step = found.batch or batch
        rows = [_run(original, _source_input(x[i : i + step], found.layout, found.dtype, channel_order)) for i in range(0, batch, step)]
        want = np.concatenate(rows)
        want = want if found.output == "probabilities" else softmax(want.copy())
        diff = float(np.max(np.abs(softmax(got.copy()) - want)))
        if not diff <= tolerance:
            raise ImportRejected(f"the rewritten model disagrees with the file at batch {batch}: max |diff| {diff:.3g} > {tolerance:g}")
        worst = max(worst, diff)
    return {"runtime": "onnxruntime CPUExecutionProvider", "batch": list(batches), "max_abs_diff_probabilities": worst, "tolerance": tolerance}
