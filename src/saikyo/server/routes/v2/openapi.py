"""OpenAPI descriptions of the v2 routes. The routes read raw bodies (JSON or JSON + binary tensors), so
their request and response shapes are written out here, from the KServe v2 spec and Triton's extensions."""

from __future__ import annotations

from typing import Any

from saikyo.server.errors import error_response as _error


NO_BODY: dict[str, Any] = {"description": "true", "content": {}}
NOT_FOUND = _error("unknown model, or a version that is not loaded")
LOADING = _error("the model is still loading, or failed to load; see Retry-After")

LIVE: dict[int | str, dict[str, Any]] = {200: {"description": "the server is live", "content": {}}}
READY: dict[int | str, dict[str, Any]] = {
    200: {"description": "every model is loaded and warmed up", "content": {}},
    400: _error("not ready; detail maps each model to its state"),
}

SERVER_METADATA: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "server name, version and the protocol extensions it supports",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["name", "version", "extensions"],
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": "string"},
                        "extensions": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "example": {
                    "name": "saikyo",
                    "version": "0.1.0",
                    "extensions": ["classification", "binary_tensor_data"],
                },
            }
        },
    }
}

_TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}, "description": "-1: any size (the batch)"},
    },
}

MODEL_METADATA: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the model's inputs (supply exactly one) and output",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["name", "platform", "inputs", "outputs"],
                    "properties": {
                        "name": {"type": "string"},
                        "versions": {"type": "array", "items": {"type": "string"}},
                        "platform": {"type": "string"},
                        "inputs": {"type": "array", "items": _TENSOR_METADATA},
                        "outputs": {"type": "array", "items": _TENSOR_METADATA},
                        "parameters": {
                            "type": "object",
                            "description": "provenance: family, weights, backend, device; tuning: how the serving "
                            "options were chosen ('tuned on <cpu> at <date>: ...' or 'untuned: the static rule chose ...')",
                        },
                        "serving": {
                            "type": "object",
                            "description": "the effective serving configuration: per key its value and its source "
                            "(tuning: this CPU's tuning by saikyo tune; model: the version's meta.json serving block; "
                            "flag, env or default: the server's)",
                            "additionalProperties": {
                                "type": "object",
                                "properties": {"value": {}, "source": {"type": "string"}},
                            },
                        },
                    },
                },
                "example": {
                    "name": "efficientnet_lite0",
                    "versions": ["1"],
                    "platform": "onnxruntime_onnx",
                    "inputs": [
                        {"name": "images", "datatype": "BYTES", "shape": [-1]},
                        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
                    ],
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}],
                    "parameters": {"weights": "imagenet-pretrained", "backend": "onnxruntime", "device": "cpu",
                                   "tuning": "untuned: the static rule chose onnxruntime (the CPU has no native bf16, "
                                   "and OpenVINO's fp32 is no faster); `saikyo tune efficientnet_lite0` measures instead"},
                    "serving": {
                        "max_batch_size": {"value": 32, "source": "model"},
                        "max_delay_ms": {"value": 0.0, "source": "default"},
                        "backend": {"value": "onnxruntime", "source": "flag"},
                    },
                },
            }
        },
    },
    404: NOT_FOUND,
    503: LOADING,
}

MODEL_READY: dict[int | str, dict[str, Any]] = {
    200: {"description": "the model is ready for inference", "content": {}},
    400: _error("the model is loading or failed to load"),
    404: NOT_FOUND,
}

def _optional_json_body(properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties}
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}


REPOSITORY_INDEX_BODY = _optional_json_body({"ready": {"type": "boolean", "description": "list only ready models"}})

REPOSITORY_INDEX: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "one entry per version: those the server holds with their state (and why a load failed), then "
            "the repository's other versions without one"
        ),
        "content": {
            "application/json": {
                "schema": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "version"],
                        "properties": {
                            "name": {"type": "string"},
                            "version": {"type": "string"},
                            "state": {"type": "string", "enum": ["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]},
                            "reason": {"type": "string"},
                        },
                    },
                },
                "example": [
                    {"name": "resnet50", "version": "2", "state": "READY", "reason": ""},
                    {"name": "resnet50", "version": "3", "state": "UNAVAILABLE", "reason": "model.onnx ... did not match the sha256 in its meta.json"},
                    {"name": "squeezenet1_1", "version": "1"},
                ],
            }
        },
    },
    400: _error("the body is not a JSON object with an optional boolean 'ready'"),
    413: _error("the body is over 64 KiB"),
}


SERVED_MODELS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "one entry per model this server serves (the version taking its requests) with its state",
        "content": {
            "application/json": {
                "schema": REPOSITORY_INDEX[200]["content"]["application/json"]["schema"],
                "example": [{"name": "efficientnet_lite0", "version": "1", "state": "READY", "reason": ""}],
            }
        },
    },
}


def _control_body(parameters: dict[str, Any]) -> dict[str, Any]:
    return _optional_json_body({"parameters": {"type": "object", "properties": parameters, "additionalProperties": False}})


LOAD_BODY = _control_body({"version": {"type": ["string", "integer"], "description": "the version to load; default the latest"}})
UNLOAD_BODY = _control_body({"unload_dependents": {"type": "boolean", "description": "accepted; saikyo has no ensembles"}})
_CONTROL_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("model control is off (model_control none), a malformed body, or (load) the version failed to load: detail.reason says why"),
    413: _error("the body is over 64 KiB"),
}
LOAD: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the version serves",
        "content": {"application/json": {"example": {"name": "resnet50", "version": "2", "state": "READY"}}},
    },
    **_CONTROL_ERRORS,
    404: _error("the model, or that version, is not in the repository"),
    503: _error("the repository cannot be read (unreachable, credentials refused); see Retry-After"),
}
UNLOAD: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the model is unloaded and its memory freed",
        "content": {"application/json": {"example": {"name": "resnet50", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"}}},
    },
    **_CONTROL_ERRORS,
    404: _error("the model is not loaded"),
}

EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8UaHBgA0wMeAAg1MCAB4nAXgllso1AAAAAElFTkSuQmCC"

_REQUEST_INPUT = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": ["images", "input"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_size": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "this tensor's bytes follow the JSON header (binary tensor data extension)",
                }
            },
            "additionalProperties": True,
        },
        "data": {
            "description": (
                "row-major tensor data, flat or nested. `images`: base64 strings, one per image. `input`: numbers."
            ),
        },
    },
}

_REQUEST_OUTPUT = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "enum": ["probabilities"]},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data": {"type": "boolean", "description": "return this output as binary data"},
                "classification": {
                    "type": "integer",
                    "minimum": 0,
                    "description": 'return the top k as BYTES strings "<score>:<index>:<label>" instead',
                },
            },
            "additionalProperties": True,
        },
    },
}

INFERENCE_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "description": "echoed in the response"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {"type": "boolean", "description": "return every output as binary data"},
                "timeout": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "microseconds the request may wait before inference starts (504 after); 0: none",
                },
            },
            "additionalProperties": True,
        },
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _REQUEST_INPUT},
        "outputs": {"type": "array", "items": _REQUEST_OUTPUT},
    },
}

INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": INFERENCE_REQUEST,
                # A real request: an 8x8 orange PNG, base64-encoded. "Try it out" in /docs works as is.
                "example": {
                    "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [EXAMPLE_PNG]}],
                    "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
                },
            },
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": (
                        "the JSON inference request, then the binary data of each input that has "
                        "binary_data_size, in input order; the header Inference-Header-Content-Length gives "
                        "the JSON's length. BYTES elements: 4-byte little-endian length, then the bytes."
                    ),
                }
            },
        },
    },
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "length of the JSON header when binary tensor data follows it",
        }
    ],
}

_RESPONSE_OUTPUT = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
        "data": {
            "type": "array",
            "items": {"type": ["number", "string"]},
            "description": "flat, row-major; absent when the output is sent as binary data",
        },
    },
}

INFERENCE_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": _RESPONSE_OUTPUT},
    },
}

INFER_DESCRIPTION = """\
Supply exactly one input:

- `images`, datatype `BYTES`, shape `[N]` (or `[N, 1]`): encoded images (JPEG, PNG, WebP, BMP, GIF), decoded
  and preprocessed by the server as in `/classify`. As binary data (Triton's binary tensor data extension),
  each element is a 4-byte little-endian length followed by the file's bytes; in JSON `data`, each element
  is the file base64-encoded (a `data:` URL prefix is allowed).
- `input`, datatype `FP32`, shape `[N, 3, H, W]` (H and W from the model metadata): a preprocessed,
  normalised tensor, as JSON numbers or binary little-endian float32.

The output `probabilities` is FP32 `[N, classes]`. With `"parameters": {"classification": k}` on the
requested output it is instead BYTES `[N, k]`, each element `"<score>:<index>:<label>"` (Triton's
classification extension), e.g. `"0.391234:282:tiger cat"`. Outputs asked for with `"binary_data": true`
(or the request parameter `"binary_data_output": true`) follow the JSON header as raw bytes; the response
then carries `Inference-Header-Content-Length`. Request bodies may be gzip or deflate encoded
(`Content-Encoding`), responses are compressed when `Accept-Encoding` asks for it.
"""

INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the requested outputs",
        "headers": {
            "Inference-Header-Content-Length": {
                "description": "length of the JSON header, present when binary output data follows it",
                "schema": {"type": "integer"},
            }
        },
        "content": {
            "application/json": {
                "schema": INFERENCE_RESPONSE,
                "example": {
                    "model_name": "efficientnet_lite0",
                    "model_version": "1",
                    "outputs": [
                        {
                            "name": "probabilities",
                            "datatype": "BYTES",
                            "shape": [1, 2],
                            "data": ["0.391234:282:tiger cat", "0.362812:285:Egyptian cat"],
                        }
                    ],
                },
            },
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "JSON response header, then each binary output's bytes",
                }
            },
        },
    },
    400: _error("malformed request: bad JSON, unknown input or output, wrong datatype or shape, unusable image"),
    404: NOT_FOUND,
    413: _error("body, image or image count over its limit"),
    500: _error("the runtime failed on the batch holding this request"),
    503: _error("model loading, queue full or server shutting down; see Retry-After"),
    504: _error("the request's timeout passed before inference started"),
}
