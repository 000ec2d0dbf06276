"""Open Inference Protocol v2 against a real server: the stock tritonclient, raw HTTP, and the wire codec."""

from __future__ import annotations

import base64
import gzip
import json
import struct

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from support.paths import CAT, CAT_CLASSES, DATA
from tritonclient.utils import InferenceServerException

from saikyo.inference import imaging
from saikyo.inference import labels as imagenet_labels
from saikyo.server.routes.v2 import protocol as wire
from saikyo.inference.preprocessing import Preprocessing

COFFEE = DATA / "coffee.jpg"
ASTRONAUT = DATA / "astronaut.jpg"


def client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=30, network_timeout=60)


def images_input(*paths) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(paths)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=object), binary_data=True)
    return tensor


def preprocessed(repository, model: str, *paths) -> np.ndarray:
    """What the server does to an image, done here: decode, resize, crop, normalise -> [N, 3, S, S]."""
    pp = Preprocessing.from_dict(repository.get(model).meta["preprocessing"])
    pixels = np.stack([imaging.decode(p.read_bytes(), pp) for p in paths])
    return imaging.normalize(pixels, pp)


def classify(server, path, **params) -> dict:
    files = [("images", (path.name, path.read_bytes(), "image/jpeg"))]
    response = httpx.post(f"{server.url}/classify", files=files, params=params, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()[0]


def text(item: bytes | str) -> str:
    # tritonclient returns bytes for binary BYTES outputs and str for JSON ones.
    return item.decode() if isinstance(item, bytes) else item


def parse_classes(strings: np.ndarray) -> list[list[tuple[float, int, str]]]:
    rows = []
    for row in strings:
        parsed = []
        for item in row:
            score, index, label = text(item).split(":", 2)
            parsed.append((float(score), int(index), label))
        rows.append(parsed)
    return rows


# ---- the stock client ----
def test_server_and_model_metadata_and_readiness(tiny_server) -> None:
    c = client(tiny_server)
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "saikyo"
    assert meta["extensions"] == ["classification", "binary_tensor_data"]

    assert c.is_model_ready("tiny") and c.is_model_ready("tiny2", "1")
    assert not c.is_model_ready("no-such-model")
    assert not c.is_model_ready("tiny", "2")

    model = c.get_model_metadata("tiny2")
    assert model == c.get_model_metadata("tiny2", "1")
    assert model["name"] == "tiny2" and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [
        {"name": "images", "datatype": "BYTES", "shape": [-1]},
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 48, 48]},
    ]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]
    assert model["parameters"]["weights"] == "random"

    served = httpx.get(f"{tiny_server.url}/v2/models", timeout=10).json()
    assert [(m["name"], m["version"], m["state"]) for m in served] == [("tiny", "1", "READY"), ("tiny2", "1", "READY")]
    # The repository extension is only served with model control (tests/test_model_control.py).
    with pytest.raises(InferenceServerException) as refused:
        c.get_model_repository_index()
    assert refused.value.status() == "400" and "--model-control" in refused.value.message()

    for call in (lambda: c.get_model_metadata("no-such-model"), lambda: c.get_model_metadata("tiny", "2")):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "404"


def test_infer_bytes_images_matches_classify(tiny_server) -> None:
    c = client(tiny_server)
    result = c.infer("tiny", [images_input(CAT, COFFEE, CAT)])
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (3, 1000)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(probs[0], probs[2], rtol=1e-6)
    assert not np.allclose(probs[0], probs[1])
    # Same pipeline as /classify: same numbers.
    for row, path in ((0, CAT), (1, COFFEE)):
        full = classify(tiny_server, path, model="tiny", topk=1000)
        np.testing.assert_allclose(probs[row], [full[str(i)] for i in range(1000)], rtol=1e-5, atol=1e-7)


def test_infer_fp32_tensor_binary_matches_images(tiny_server, tiny_repository) -> None:
    c = client(tiny_server)
    batch = preprocessed(tiny_repository, "tiny2", CAT, ASTRONAUT)
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    output = triton.InferRequestedOutput("probabilities", binary_data=True)
    result = c.infer("tiny2", [tensor], outputs=[output])
    assert result.get_output("probabilities")["parameters"]["binary_data_size"] == 2 * 1000 * 4
    from_tensor = result.as_numpy("probabilities")

    from_images = c.infer("tiny2", [images_input(CAT, ASTRONAUT)]).as_numpy("probabilities")
    np.testing.assert_allclose(from_tensor, from_images, rtol=1e-4, atol=1e-6)

    # The same tensor as JSON numbers, the output as JSON.
    tensor.set_data_from_numpy(batch, binary_data=False)
    as_json = c.infer("tiny2", [tensor], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    assert "data" in as_json.get_output("probabilities")
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), from_tensor, rtol=1e-5, atol=1e-7)


def test_class_count_agrees_with_classify_on_the_pretrained_model(pretrained_server, pretrained_repository) -> None:
    c = client(pretrained_server)
    expected = classify(pretrained_server, CAT, labels="true", topk=5)
    want = [(int(k.split(":")[0]), k.split(":", 1)[1], v) for k, v in expected.items()]

    for binary in (True, False):
        out = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=5)
        result = c.infer("efficientnet_lite0", [images_input(CAT)], outputs=[out])
        strings = result.as_numpy("probabilities")
        assert strings.shape == (1, 5)
        (got,) = parse_classes(strings)
        assert [i for _, i, _ in got] == [i for i, _, _ in want]
        assert [label for _, _, label in got] == [label for _, label, _ in want]
        # Triton prints the score as C++ std::to_string does: "%f".
        assert [text(s).split(":")[0] for s in strings[0]] == [f"{v:f}" for _, _, v in want]
        assert got[0][1] in CAT_CLASSES

    # The FP32 path on the real model agrees too.
    batch = preprocessed(pretrained_repository, "efficientnet_lite0", CAT)
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    out = triton.InferRequestedOutput("probabilities", binary_data=True, class_count=5)
    (got,) = parse_classes(c.infer("efficientnet_lite0", [tensor], outputs=[out]).as_numpy("probabilities"))
    assert [i for _, i, _ in got][:3] == [i for i, _, _ in want][:3]
    assert got[0][0] == pytest.approx(want[0][2], abs=1e-3)


def test_version_segment_compression_and_request_id(tiny_server) -> None:
    c = client(tiny_server)
    plain = c.infer("tiny", [images_input(COFFEE)]).as_numpy("probabilities")
    result = c.infer(
        "tiny",
        [images_input(COFFEE)],
        model_version="1",
        request_id="req-42",
        request_compression_algorithm="gzip",
        response_compression_algorithm="deflate",
    )
    assert result.get_response()["id"] == "req-42"
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(result.as_numpy("probabilities"), plain, rtol=1e-6)
    with pytest.raises(InferenceServerException) as err:
        c.infer("tiny", [images_input(COFFEE)], model_version="7")
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException) as err:
        c.infer("no-such-model", [images_input(COFFEE)])
    assert err.value.status() == "404" and "no-such-model" in err.value.message()


# ---- raw HTTP: JSON tensors and the errors ----
def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def post_json(server, doc: dict, model: str = "tiny", **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=doc, timeout=60, **kwargs)


def test_json_base64_images_and_classification(tiny_server) -> None:
    doc = {
        "id": "a",
        "inputs": [
            {
                "name": "images",
                "datatype": "BYTES",
                "shape": [2, 1],
                "data": [[b64(CAT)], ["data:image/jpeg;base64," + b64(COFFEE)]],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    response = post_json(tiny_server, doc)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "tiny" and body["model_version"] == "1" and body["id"] == "a"
    (out,) = body["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "BYTES" and out["shape"] == [2, 3]
    for row, path in enumerate((CAT, COFFEE)):
        top = classify(tiny_server, path, model="tiny", topk=3, labels="true")
        want = [f"{v:f}:{k}" for k, v in top.items()]
        assert out["data"][row * 3 : row * 3 + 3] == want

    # No outputs named: every output, as JSON unless binary_data_output asks otherwise.
    doc = {"inputs": doc["inputs"]}
    body = post_json(tiny_server, doc).json()
    assert body["outputs"][0]["shape"] == [2, 1000] and len(body["outputs"][0]["data"]) == 2000
    doc["parameters"] = {"binary_data_output": True}
    response = post_json(tiny_server, doc)
    header_length = int(response.headers[wire.HEADER_LENGTH])
    header = json.loads(response.content[:header_length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 8000
    probs = np.frombuffer(response.content[header_length:], "<f4").reshape(2, 1000)
    np.testing.assert_allclose(probs.ravel(), body["outputs"][0]["data"], rtol=1e-6)
    assert response.headers["content-type"] == "application/octet-stream"


def test_timeout_parameter_bounds_the_wait_for_inference(tiny_server) -> None:
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [b64(CAT)]}]}
    # Triton's request timeout, in microseconds: a minute is plenty, one microsecond has passed before
    # the decoded image reaches the batcher.
    assert post_json(tiny_server, {**doc, "parameters": {"timeout": 60_000_000}}).status_code == 200
    response = post_json(tiny_server, {**doc, "parameters": {"timeout": 1}})
    assert response.status_code == 504 and "deadline" in response.json()["error"]


def binary_body(doc: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(doc).encode()
    return header + b"".join(blobs), {wire.HEADER_LENGTH: str(len(header))}


def images_doc(n: int, size: int) -> dict:
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": size}}]}


def test_raw_binary_request(tiny_server) -> None:
    blob = wire.serialize_bytes([CAT.read_bytes()])
    body, headers = binary_body(images_doc(1, len(blob)), blob)
    response = httpx.post(f"{tiny_server.url}/v2/models/tiny/infer", content=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert "Server-Timing" in response.headers
    assert len(response.json()["outputs"][0]["data"]) == 1000


def _bad_cases() -> list[tuple[str, dict | bytes, dict[str, str], int, str]]:
    cat = CAT.read_bytes()
    blob = wire.serialize_bytes([cat])
    one_image = {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(cat).decode()]}
    cases: list[tuple[str, dict | bytes, dict[str, str], int, str]] = [
        ("not json", b"{nope", {}, 400, "not valid JSON"),
        ("not an object", b"[1, 2]", {}, 400, "JSON object"),
        ("no inputs", {"inputs": []}, {}, 400, "'inputs'"),
        ("two inputs", {"inputs": [one_image, one_image]}, {}, 400, "exactly one input"),
        ("unknown input", {"inputs": [{**one_image, "name": "pixels"}]}, {}, 400, "unknown input 'pixels'"),
        ("wrong datatype", {"inputs": [{**one_image, "datatype": "FP32"}]}, {}, 400, "datatype BYTES"),
        ("shape mismatch", {"inputs": [{**one_image, "shape": [2]}]}, {}, 400, "2 elements"),
        ("bad shape", {"inputs": [{**one_image, "shape": [1, 2, 3]}]}, {}, 400, "shape [N]"),
        ("not base64", {"inputs": [{**one_image, "data": ["%%%"]}]}, {}, 400, "base64"),
        (
            "not an image",
            {"inputs": [{**one_image, "data": [base64.b64encode(b"hello").decode()]}]},
            {},
            400,
            "images[0]",
        ),
        ("unknown output", {"inputs": [one_image], "outputs": [{"name": "logits"}]}, {}, 400, "unknown output"),
        (
            "bad classification",
            {"inputs": [one_image], "outputs": [{"name": "probabilities", "parameters": {"classification": "5"}}]},
            {},
            400,
            "classification",
        ),
        (
            "bad binary flag",
            {"inputs": [one_image], "outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}]},
            {},
            400,
            "binary_data",
        ),
        ("no data", {"inputs": [{k: v for k, v in one_image.items() if k != "data"}]}, {}, 400, "neither 'data'"),
        (
            "fp32 wrong size",
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]},
            {},
            400,
            "[N, 3, 32, 32]",
        ),
        (
            "fp32 short data",
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 10}]},
            {},
            400,
            "3072 values",
        ),
        (
            "fp32 strings",
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ["1"] * 3072}]},
            {},
            400,
            "only numbers",
        ),
        ("negative timeout", {"inputs": [one_image], "parameters": {"timeout": -1}}, {}, 400, "timeout"),
        ("header past body", b"{}", {wire.HEADER_LENGTH: "99"}, 400, wire.HEADER_LENGTH),
        ("header not a number", b"{}", {wire.HEADER_LENGTH: "x"}, 400, wire.HEADER_LENGTH),
        ("unknown encoding", b"{}", {"Content-Encoding": "br"}, 400, "Content-Encoding"),
        ("broken gzip", b"\x1f\x8bnope", {"Content-Encoding": "gzip"}, 400, "gzip"),
    ]
    body, headers = binary_body(images_doc(1, len(blob) + 5), blob)
    cases.append(("binary size past end", body, headers, 400, "runs past the end"))
    body, headers = binary_body(images_doc(1, len(blob)), blob, b"extra")
    cases.append(("binary leftovers", body, headers, 400, "beyond"))
    truncated = struct.pack("<I", 1000) + b"short"
    body, headers = binary_body(images_doc(1, len(truncated)), truncated)
    cases.append(("truncated BYTES element", body, headers, 400, "runs past the end"))
    nan = np.full((1, 3, 32, 32), np.nan, np.float32).tobytes()
    doc = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "parameters": {"binary_data_size": len(nan)}}
        ]
    }
    body, headers = binary_body(doc, nan)
    cases.append(("fp32 NaN", body, headers, 400, "NaN"))
    many = {"inputs": [{**one_image, "shape": [65], "data": one_image["data"] * 65}]}
    cases.append(("too many images", many, {}, 413, "too many images"))
    return cases


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "message"), _bad_cases(), ids=[c[0] for c in _bad_cases()]
)
def test_bad_requests_get_json_errors(tiny_server, case, body, headers, status, message) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{tiny_server.url}/v2/models/tiny/infer", content=content, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and message in error


def test_unknown_model_and_version_are_404(tiny_server) -> None:
    for path in (
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/tiny/versions/3",
        "/v2/models/tiny/versions/3/ready",
    ):
        response = httpx.get(tiny_server.url + path, timeout=10)
        assert response.status_code == 404 and "error" in response.json(), path
    assert httpx.get(f"{tiny_server.url}/v2/models/tiny/ready", timeout=10).status_code == 200


def test_gzip_request_body_round_trip(tiny_server) -> None:
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [b64(COFFEE)]}]}
    plain = post_json(tiny_server, doc).json()["outputs"][0]["data"]
    response = httpx.post(
        f"{tiny_server.url}/v2/models/tiny/versions/1/infer",
        content=gzip.compress(json.dumps(doc).encode()),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json", "Accept-Encoding": "gzip"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-encoding"] == "gzip"  # httpx decoded it for us
    assert response.json()["outputs"][0]["data"] == pytest.approx(plain, rel=1e-6)


# ---- the codec, without a server ----
def test_bytes_serialization_round_trip() -> None:
    items = [b"", b"a", bytes(range(256)) * 3]
    raw = wire.serialize_bytes(items)
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:8] == struct.pack("<I", 1)
    assert wire.deserialize_bytes(raw) == items
    with pytest.raises(wire.ProtocolError):
        wire.deserialize_bytes(raw[:-1])
    with pytest.raises(wire.ProtocolError):
        wire.deserialize_bytes(b"\x01\x00")


def test_classification_strings_print_like_triton() -> None:
    probs = np.zeros((2, 1000), np.float32)
    probs[0, [282, 285, 281]] = [0.391234, 0.3628, 0.17]
    probs[1, [1, 2]] = [0.5, 0.25]
    strings = wire.classification_strings(probs, 2, imagenet_labels.name)
    assert strings == [
        b"0.391234:282:tiger cat",
        b"0.362800:285:Egyptian cat",
        b"0.500000:1:goldfish",
        b"0.250000:2:great white shark",
    ]
    assert wire.classification_strings(probs[:1], 1, None) == [b"0.391234:282"]


def test_parse_request_pairs_binary_sections_with_inputs_in_order() -> None:
    doc = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
            {"name": "b", "datatype": "FP32", "shape": [1], "data": [3.0]},
            {"name": "c", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}},
        ],
        "outputs": [{"name": "o", "parameters": {"classification": 2}}],
        "parameters": {"binary_data_output": True},
    }
    header = json.dumps(doc).encode()
    req = wire.parse_request(
        header + np.array([1, 2], "<f4").tobytes() + wire.serialize_bytes([b"xy"]), str(len(header))
    )
    a, b, c = req.inputs
    assert wire.fp32_array(a).tolist() == [1.0, 2.0]
    assert wire.fp32_array(b).tolist() == [3.0]
    assert wire.bytes_elements(c, lambda v, i: b"") == [b"xy"]
    assert req.outputs == [wire.RequestedOutput("o", True, 2)]
    assert req.binary_output is True
