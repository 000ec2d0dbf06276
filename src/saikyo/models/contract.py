"""The ONNX contract every repository entry keeps, whoever wrote it (export, quantize, a user).

One input "input", float32 [N, 3, H, W], already normalised with the model's mean/std; one output
"logits", float32 [N, num_classes]; N symbolic; one self-contained file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saikyo.models.errors import ExportError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def io_meta(size: int, num_classes: int) -> dict[str, list[dict[str, Any]]]:
    """Inputs/outputs in the v2 (KServe/Triton) model-metadata shape; -1 is the dynamic batch."""
    return {
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, size, size]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, num_classes]}],
    }


def check_contract(path: Path, size: int, num_classes: int) -> None:
    """Raise ExportError unless the file at `path` is a valid, self-contained model of the contract's shape."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError("the exported model keeps weights in external files; expected one self-contained file")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise ExportError(
            f"exported I/O is {[i.name for i in inputs]} -> {[o.name for o in model.graph.output]}, "
            f"expected [{INPUT_NAME!r}] -> [{OUTPUT_NAME!r}]"
        )
    for value, want in ((inputs[0], [None, 3, size, size]), (model.graph.output[0], [None, num_classes])):
        dims = value.type.tensor_type.shape.dim
        got = [None if d.dim_param or not d.HasField("dim_value") else d.dim_value for d in dims]
        if got != want or not dims[0].dim_param:
            raise ExportError(f"{value.name} has shape {got}, expected {want} with a symbolic batch dim")
