"""The wire format of Open Inference Protocol v2 inference over HTTP, with Triton's extensions.

Pure functions, no web framework: bytes in, tensors out, and back.
- JSON tensors: `{"name", "datatype", "shape", "data"}`, data flat or nested in row-major order.
- Binary tensor data (Triton): the body is the JSON header followed by raw tensor bytes, the header's
  length in `Inference-Header-Content-Length`; an input carries `"binary_data_size"`, an output is sent
  binary when asked with `"binary_data": true` (or the request's `"binary_data_output": true`).
  BYTES elements are 4-byte little-endian lengths followed by the bytes, both ways.
- Classification (Triton): `"classification": k` on a requested output returns BYTES strings
  `"<score>:<index>[:<label>]"`, shape [N, k], the score printed as C++ std::to_string prints a float.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saikyo.inference.predictions import top_k

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
# Triton's timeout is a uint64 of microseconds; anything larger is not a number we can honour.
MAX_TIMEOUT_US = 2**64 - 1
# Dimensions are int64, as in Triton: a larger one is refused before any arithmetic on it.
MAX_DIM = 2**63 - 1


class ProtocolError(ValueError):
    """The request breaks the protocol; the message is safe to show to the client (HTTP 400)."""


class TooLarge(ValueError):
    """The (decompressed) body is over its limit (HTTP 413)."""


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None  # the JSON "data" member, when not binary
    raw: bytes | None = None  # the tensor's binary data, when sent binary

    @property
    def element_count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int  # 0: the raw tensor


@dataclass
class InferenceRequest:
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output, in the request's default encoding
    binary_output: bool = False  # the request-level "binary_data_output"
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def timeout_us(self) -> int | None:
        """Triton's request "timeout" parameter, in microseconds."""
        value = self.parameters.get("timeout")
        if value is None:
            return None
        if not _is_int(value) or not 0 <= value <= MAX_TIMEOUT_US:
            raise ProtocolError(f"parameter 'timeout' must be an integer of microseconds, 0 to {MAX_TIMEOUT_US}")
        return int(value)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # "FP32" or "BYTES"
    shape: tuple[int, ...]
    array: np.ndarray | None = None  # FP32
    strings: list[bytes] | None = None  # BYTES, row-major
    binary: bool = False


# ---- request ----
def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo Content-Encoding gzip / deflate (what tritonclient's request_compression_algorithm sends)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge(f"decompressed body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise ProtocolError(f"body is truncated {encoding} data")
    return out


def parse_request(body: bytes, header_length: str | None, max_json_bytes: int | None = None) -> InferenceRequest:
    """Split header and binary section, check the JSON's structure, attach each input's bytes.

    The JSON header is parsed in one call that holds the GIL, so its size is capped (`max_json_bytes`,
    TooLarge beyond): a larger request sends its tensors as binary data, which costs no parsing.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        value = header_length.strip()
        # isdigit() alone accepts digits int() refuses ("²") and numbers of any length.
        if not (value.isascii() and value.isdigit()) or len(value) > 20:
            raise ProtocolError(f"{HEADER_LENGTH} must be a non-negative integer, got {header_length[:40]!r}")
        n = int(value)
        if n > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body holds only {len(body)} bytes")
        header, binary = body[:n], body[n:]
    if max_json_bytes is not None and len(header) > max_json_bytes:
        raise TooLarge(
            f"the JSON part of the request is {len(header)} bytes; the limit is {max_json_bytes} "
            f"(send tensors as binary data with the {HEADER_LENGTH} header)"
        )
    try:
        doc = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = "" if header_length is not None else f" (binary data needs the {HEADER_LENGTH} header)"
        raise ProtocolError(f"request header is not valid JSON: {exc}{hint}") from None
    except RecursionError:
        raise ProtocolError("request header is not usable JSON: arrays or objects nested too deeply") from None
    except ValueError as exc:  # e.g. an integer beyond Python's int-string conversion limit
        raise ProtocolError(f"request header is not usable JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("inference request must be a JSON object")

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    parameters = _object(doc.get("parameters"), "parameters")
    binary_output = _flag(parameters, "binary_data_output", "request parameters")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    inputs: list[InputTensor] = []
    offset = 0
    for i, item in enumerate(raw_inputs):
        tensor, used = _input(item, i, binary, offset)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise ProtocolError(
            f"the body holds {len(binary) - offset} bytes of binary data beyond the inputs' binary_data_size"
        )

    outputs: list[RequestedOutput] | None = None
    if "outputs" in doc and doc["outputs"] is not None:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise ProtocolError("'outputs' must be a list")
        outputs = [_output(item, i, binary_output) for i, item in enumerate(raw_outputs)]
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise ProtocolError("an output is requested more than once")
    return InferenceRequest(inputs, outputs, binary_output, request_id, parameters)


def _input(item: Any, i: int, binary: bytes, offset: int) -> tuple[InputTensor, int]:
    where = f"inputs[{i}]"
    if not isinstance(item, dict):
        raise ProtocolError(f"{where} must be an object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where}.name must be a non-empty string")
    where = f"input {name!r}"
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise ProtocolError(f"{where}: 'datatype' must be a string")
    shape = item.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise ProtocolError(f"{where}: 'shape' must be a list of at most 8 integers, each 0 to {MAX_DIM}")
    params = _object(item.get("parameters"), f"{where} parameters")
    if "shared_memory_region" in params:
        raise ProtocolError(f"{where}: shared memory is not supported; send the data in the request")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise ProtocolError(f"{where} has neither 'data' nor a 'binary_data_size' parameter")
        return InputTensor(name, datatype, tuple(shape), data=item["data"]), 0
    if not _is_int(size) or size < 0:
        raise ProtocolError(f"{where}: 'binary_data_size' must be a non-negative integer")
    if offset + size > len(binary):
        raise ProtocolError(
            f"{where}: binary_data_size {size} runs past the end of the body's binary data "
            f"({len(binary) - offset} bytes left)"
        )
    return InputTensor(name, datatype, tuple(shape), raw=binary[offset : offset + size]), size


def _output(item: Any, i: int, binary_default: bool) -> RequestedOutput:
    if not isinstance(item, dict):
        raise ProtocolError(f"outputs[{i}] must be an object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"outputs[{i}].name must be a non-empty string")
    params = _object(item.get("parameters"), f"output {name!r} parameters")
    if "shared_memory_region" in params:
        raise ProtocolError(f"output {name!r}: shared memory is not supported")
    binary = binary_default if "binary_data" not in params else _flag(params, "binary_data", f"output {name!r}")
    k = params.get("classification", 0)
    if not _is_int(k) or not 0 <= k <= MAX_DIM:
        raise ProtocolError(f"output {name!r}: 'classification' must be a non-negative integer")
    return RequestedOutput(name, binary, int(k))


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be an object")
    return value


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: {key!r} must be true or false")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- tensor contents ----
def deserialize_bytes(raw: bytes, limit: int | None = None) -> list[bytes]:
    """BYTES tensor binary data: each element a uint32 little-endian length, then that many bytes.

    With `limit`, a tensor holding more elements than that is refused as soon as the excess is seen.
    """
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        if limit is not None and len(out) == limit:
            raise ProtocolError(f"BYTES binary data holds more than the {limit} elements its shape declares")
        if i + 4 > len(raw):
            raise ProtocolError("BYTES binary data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise ProtocolError(f"BYTES element of {n} bytes runs past the end of its binary data")
        out.append(raw[i : i + n])
        i += n
    return out


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def flatten_json(data: Any, what: str, limit: int | None = None) -> list[Any]:
    """Nested or flat row-major JSON data -> a flat list; with `limit`, refused past that many elements."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if limit is not None and len(out) == limit:
                raise ProtocolError(f"{what}: 'data' holds more than the {limit} elements its shape declares")
            out.append(item)
        else:
            stack.pop()
    return out


def fp32_array(tensor: InputTensor) -> np.ndarray:
    """An FP32 input as a float32 array of its declared shape."""
    where = f"input {tensor.name!r}"
    count = tensor.element_count
    if tensor.raw is not None:
        if len(tensor.raw) != count * 4:
            raise ProtocolError(
                f"{where}: shape {list(tensor.shape)} needs {count * 4} bytes of FP32 data, got {len(tensor.raw)}"
            )
        flat = np.frombuffer(tensor.raw, dtype="<f4").astype(np.float32, copy=False)
    else:
        try:
            values = np.asarray(tensor.data)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise ProtocolError(f"{where}: 'data' is not a regular array of numbers") from None
        if values.dtype.kind not in "iuf":
            raise ProtocolError(f"{where}: 'data' must hold only numbers for datatype FP32")
        flat = values.astype(np.float32).reshape(-1)
        if flat.size != count:
            raise ProtocolError(f"{where}: shape {list(tensor.shape)} needs {count} values, 'data' holds {flat.size}")
    return flat.reshape(tensor.shape)


def bytes_elements(tensor: InputTensor, decode_json: Callable[[Any, int], bytes]) -> list[bytes]:
    """A BYTES input's elements; `decode_json` turns one JSON element into bytes (or raises ProtocolError)."""
    where = f"input {tensor.name!r}"
    # Counted against the declared shape while walking: a body cannot make us walk more than it declares.
    if tensor.raw is not None:
        items = deserialize_bytes(tensor.raw, tensor.element_count)
    else:
        items = [decode_json(v, i) for i, v in enumerate(flatten_json(tensor.data, where, tensor.element_count))]
    if len(items) != tensor.element_count:
        raise ProtocolError(
            f"{where}: shape {list(tensor.shape)} has {tensor.element_count} elements, the data holds {len(items)}"
        )
    return items


# ---- response ----
def classification_strings(probs: np.ndarray, k: int, label: Callable[[int], str] | None) -> list[bytes]:
    """Triton's classification output, row-major [N, k]: b"0.391234:282:tiger cat"."""
    idx, vals = top_k(probs, k)
    out: list[bytes] = []
    for row_i, row_v in zip(idx.tolist(), vals.tolist()):
        for i, v in zip(row_i, row_v):
            # std::to_string(float) is printf("%f"): six decimals.
            text = f"{v:f}:{i}" + (f":{label(i)}" if label is not None else "")
            out.append(text.encode())
    return out


def encode_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Sequence[OutputTensor],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (Content-Type, and the header length when any output is binary)."""
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs:
        t: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if out.binary:
            blob = (
                serialize_bytes(out.strings or [])
                if out.datatype == "BYTES"
                else np.ascontiguousarray(out.array, dtype="<f4").tobytes()
            )
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif out.datatype == "BYTES":
            t["data"] = [s.decode("utf-8") for s in out.strings or []]
        else:
            assert out.array is not None
            t["data"] = out.array.reshape(-1).tolist()
        tensors.append(t)
    doc["outputs"] = tensors
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return header, {"Content-Type": JSON_TYPE}
    return header + b"".join(blobs), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}
