"""Limits and bad input against a real server: every limit answers its own clear JSON error, bad input is a
4xx that names the file or field, and nothing a client sends becomes a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from support.paths import CAT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from support.serverproc import ServerProcess, running_server
from support.stress import encode, every_format, noise_image, png_claiming, raw_exchange

MAX_BODY = 200_000
MAX_IMAGES = 4
MAX_IMAGE_BYTES = 100_000
MAX_PIXELS = 1_000_000
BODY_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def limited(tiny_repository, tmp_path_factory) -> Iterator[ServerProcess]:
    with running_server(
        tiny_repository.root, "tiny", tmp_path_factory.mktemp("logs"),
        "--max-body-bytes", str(MAX_BODY), "--max-images-per-request", str(MAX_IMAGES),
        "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(MAX_PIXELS),
        "--body-timeout-s", str(BODY_TIMEOUT_S),
    ) as server:  # fmt: skip
        yield server


def post(url: str, files=None, **kw) -> httpx.Response:
    return httpx.post(f"{url}/classify", files=files, timeout=30, **kw)


def assert_json_error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    text = json.dumps(body)
    for needle in needles:
        assert needle in text, (needle, text)
    return body


def multipart_head(boundary: str = "b0undary", name: str = "images", filename: str = "big.jpg") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()


# ---- the body limit: Content-Length, streaming, slow bodies ----
def test_content_length_over_the_limit_is_refused_before_the_body_is_read(limited) -> None:
    # 10 GB announced, not one byte sent: a server that read first would wait for the body (and 408).
    request = (
        b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: 10000000000\r\n\r\n"
    )
    status, headers, body, _ = raw_exchange(limited.url, request)
    assert status == 413 and headers["connection"] == "close"
    detail = json.loads(body)
    assert detail["detail"] == {"limit_bytes": MAX_BODY, "content_length": 10_000_000_000}
    assert str(MAX_BODY) in detail["error"]


def test_chunked_body_is_cut_off_when_it_crosses_the_limit(limited) -> None:
    sent: list[int] = []

    def body() -> Iterator[bytes]:
        yield multipart_head()
        for _ in range(500):  # 5 MB in 10 kB chunks, no Content-Length: the limit is found while streaming
            sent.append(10_000)
            yield b"\xff" * 10_000

    r = post(limited.url, content=body(), headers={"content-type": "multipart/form-data; boundary=b0undary"})
    body_json = assert_json_error(r, 413, str(MAX_BODY))
    # Cut off within a socket read or two of the limit, far from the 5 MB on offer.
    assert MAX_BODY < body_json["detail"]["received_bytes"] < 1_000_000
    assert r.headers["connection"] == "close"
    assert post(limited.url, [("images", ("cat.jpg", CAT.read_bytes(), "image/jpeg"))]).status_code == 200


def test_a_body_that_stops_arriving_gets_408(limited) -> None:
    head = multipart_head()
    request = (
        b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
        b"Content-Length: 5000\r\n\r\n" + head + b"\xff\xd8\xff"
    )
    status, headers, body, seconds = raw_exchange(limited.url, request, then_wait=BODY_TIMEOUT_S + 20)
    assert status == 408, body
    assert "not received within" in json.loads(body)["error"]
    assert seconds >= BODY_TIMEOUT_S * 0.9  # it waited for the body, then gave up, instead of hanging


# ---- per-image limits ----
def test_too_many_images_is_413_with_the_limit(limited) -> None:
    png = encode(noise_image(), "PNG")
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(MAX_IMAGES + 1)]
    assert_json_error(post(limited.url, files), 413, f"limit is {MAX_IMAGES}")
    assert post(limited.url, files[:MAX_IMAGES]).status_code == 200


def test_an_image_over_the_byte_limit_is_413_and_named(limited) -> None:
    big = encode(noise_image(220, 200), "PNG")  # noise does not compress: ~130 kB
    assert MAX_IMAGE_BYTES < len(big) < MAX_BODY
    files = [("images", ("small.png", encode(noise_image(), "PNG"), "image/png")), ("images", ("huge.png", big, "image/png"))]
    assert_json_error(post(limited.url, files), 413, "huge.png", str(MAX_IMAGE_BYTES))


def test_pixel_limit_is_checked_from_the_header(limited) -> None:
    over = encode(Image.new("L", (1200, 1000), 128), "PNG")  # 1.2 MP in a few kB
    body = assert_json_error(post(limited.url, [("images", ("wide.png", over, "image/png"))]), 400, "wide.png", str(MAX_PIXELS))
    assert "1200x1000" in body["error"]


def test_decompression_bomb_is_refused_before_decoding(tiny_server) -> None:
    # Default settings (40 MP). 50000x50000 RGB would need 7.5 GB: refused from the header alone.
    bomb = png_claiming(50_000, 50_000)
    assert len(bomb) < 1000
    r = post(tiny_server.url, [("images", ("bomb.png", bomb, "image/png"))])
    assert_json_error(r, 400, "bomb.png", "2500000000 pixels", "40000000")
    r = post(tiny_server.url, [("images", ("bomb2.png", png_claiming(8000, 8000), "image/png"))])
    assert_json_error(r, 400, "bomb2.png", "8000x8000", "40000000")
    assert post(tiny_server.url, [("images", ("cat.jpg", CAT.read_bytes(), "image/jpeg"))]).status_code == 200


# ---- formats by content, never by name ----
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_every_accepted_format_is_read_by_content_whatever_its_name(limited, fmt) -> None:
    data = every_format()[fmt]
    r = post(limited.url, [("images", ("misnamed.txt", data, "text/plain"))])
    assert r.status_code == 200, r.text
    assert len(r.json()) == 1


def test_recognised_but_unaccepted_formats_and_disguised_text_are_named(limited) -> None:
    tiff = encode(noise_image(), "TIFF")
    assert_json_error(post(limited.url, [("images", ("photo.jpg", tiff, "image/jpeg"))]), 400, "photo.jpg", "TIFF")
    text = b"GIF89a? no, just text pretending\n" * 3
    assert_json_error(post(limited.url, [("images", ("fake.gif", text, "image/gif"))]), 400, "fake.gif")


# ---- bad input: always a 4xx naming the file or field, never a 500 ----
_CAT = CAT.read_bytes()
_CORRUPT = bytearray(_CAT)
_CORRUPT[600:4000] = bytes(reversed(_CORRUPT[600:4000]))
_MP = "multipart/form-data; boundary=x"

BAD = [
    ("truncated-jpeg", {"files": [("images", ("cut.jpg", _CAT[: len(_CAT) // 3], "image/jpeg"))]}, 400, ["cut.jpg"]),
    ("header-only-jpeg", {"files": [("images", ("head.jpg", _CAT[:200], "image/jpeg"))]}, 400, ["head.jpg"]),
    ("zero-byte", {"files": [("images", ("empty.png", b"", "image/png"))]}, 400, ["empty.png", "empty"]),
    ("text-file", {"files": [("images", ("notes.txt", b"hello\n" * 50, "text/plain"))]}, 400, ["notes.txt"]),
    ("second-file-bad", {"files": [("images", ("ok.jpg", _CAT, "image/jpeg")), ("images", ("bad.jpg", b"\xff\xd8junk", "image/jpeg"))]}, 400, ["bad.jpg", '"index": 1']),
    ("wrong-field-name", {"files": [("image", ("cat.jpg", _CAT, "image/jpeg"))]}, 400, ["'images'", "image"]),
    ("field-as-text", {"data": {"images": "cat.jpg"}, "files": [("other", ("x", b"x", "text/plain"))]}, 400, ["'images'", "text"]),
    ("json-body", {"json": {"images": ["..."]}}, 415, ["multipart/form-data", "application/json"]),
    ("raw-jpeg-body", {"content": _CAT, "headers": {"content-type": "image/jpeg"}}, 415, ["image/jpeg"]),
    ("no-content-type", {"content": b"abc"}, 415, ["multipart"]),
    ("no-boundary", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, ["multipart"]),
    ("boundary-mismatch", {"content": b"--y\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n\r\nabc\r\n--y--\r\n", "headers": {"content-type": _MP}}, 400, []),
    ("no-final-boundary", {"content": b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n\r\nabc", "headers": {"content-type": _MP}}, 400, []),
    ("garbage-part-header", {"content": b"--x\r\nthis is not a header\r\n\r\nabc\r\n--x--\r\n", "headers": {"content-type": _MP}}, 400, []),
    ("empty-multipart", {"content": b"", "headers": {"content-type": _MP}}, 400, ["'images'"]),
    ("too-many-fields", {"data": {f"f{i}": "v" for i in range(150)}, "files": [("images", ("c.jpg", _CAT, "image/jpeg"))]}, 400, ["field"]),
    ("topk-negative", {"params": {"topk": -1}}, 400, ["topk"]),
    ("topk-zero", {"params": {"topk": 0}}, 400, ["topk"]),
    ("topk-1001", {"params": {"topk": 1001}}, 400, ["topk"]),
    ("topk-huge", {"params": {"topk": 10**40}}, 400, ["topk"]),
    ("topk-nan", {"params": {"topk": "NaN"}}, 400, ["topk"]),
    ("topk-empty", {"params": {"topk": ""}}, 400, ["topk"]),
    ("labels-maybe", {"params": {"labels": "maybe"}}, 400, ["labels"]),
    ("unknown-model", {"params": {"model": "alexnet"}}, 404, ["alexnet"]),
    ("traversal-model", {"params": {"model": "../../etc/passwd"}}, 404, ["unknown model"]),
    ("deadline-garbage", {"headers": {"X-Request-Timeout-Ms": "soon"}}, 400, ["X-Request-Timeout-Ms"]),
    ("deadline-negative", {"headers": {"X-Request-Timeout-Ms": "-5"}}, 400, ["X-Request-Timeout-Ms"]),
    ("deadline-inf", {"headers": {"X-Request-Timeout-Ms": "inf"}}, 400, ["X-Request-Timeout-Ms"]),
]


@pytest.mark.parametrize(("kwargs", "status", "needles"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_a_named_4xx(limited, kwargs, status, needles) -> None:
    if not any(k in kwargs for k in ("files", "content", "json", "data")):
        kwargs = {**kwargs, "files": [("images", ("cat.jpg", _CAT, "image/jpeg"))]}
    r = httpx.post(f"{limited.url}/classify", timeout=30, **kwargs)
    assert_json_error(r, status, *needles)


def test_corrupt_jpeg_body_is_200_or_a_named_400(limited) -> None:
    # Scrambled entropy-coded data may still decode (to noise); it must never be a 500.
    r = post(limited.url, [("images", ("scrambled.jpg", bytes(_CORRUPT), "image/jpeg"))])
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert "scrambled.jpg" in r.text


_BOUNDARY = "fuzzb"
_part_name = st.sampled_from(["images", "image", "", 'im"ages', "images\r\nX: y"])
_part_body = st.one_of(st.binary(max_size=300), st.sampled_from([_CAT[:1000], encode(noise_image(8, 8), "PNG")]))


@st.composite
def multipart_bodies(draw) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(_part_name)
        filename = draw(st.one_of(st.none(), st.text(max_size=20)))
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        extra = draw(st.sampled_from(["", "Content-Type: image/png\r\n", "Content-Type: \r\n", "garbage\r\n"]))
        parts.append(f"--{_BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode("utf-8", "surrogatepass") + draw(_part_body) + b"\r\n")
    tail = draw(st.sampled_from([f"--{_BOUNDARY}--\r\n".encode(), b"", f"--{_BOUNDARY}".encode(), b"--other--\r\n"]))
    body = b"".join(parts) + tail
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(body)))
        body = body[:cut]
    return body


@pytest.mark.slow  # fuzz
@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=multipart_bodies(), topk=st.one_of(st.none(), st.integers(-5, 2000), st.text(max_size=5)))
def test_malformed_multipart_is_never_a_server_error(limited, body, topk) -> None:
    params = {"topk": topk} if topk is not None else None
    r = httpx.post(
        f"{limited.url}/classify", content=body, params=params, timeout=30,
        headers={"content-type": f"multipart/form-data; boundary={_BOUNDARY}"},
    )  # fmt: skip
    assert r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/json")
    if r.status_code != 200:
        assert isinstance(r.json()["error"], str)


# ---- malformed Open Inference Protocol v2 requests: 4xx naming the field, never a 500 ----
_B64_CAT = __import__("base64").b64encode(_CAT).decode()
_B64_TEXT = __import__("base64").b64encode(b"plain text").decode()
_B64_PNG = __import__("base64").b64encode(encode(noise_image(), "PNG")).decode()


def _images(data: list, **kw) -> dict:
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(data)], "data": data, **kw}]}


def _tensor(shape: list, data, datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": data}]}


V2_BAD = [
    ("not-json", {"content": b"{not json"}, 400, []),
    ("json-array", {"json": []}, 400, ["object"]),
    ("no-inputs", {"json": {"inputs": []}}, 400, ["inputs"]),
    ("two-inputs", {"json": {"inputs": _images([_B64_CAT])["inputs"] * 2}}, 400, ["exactly one input"]),
    ("unknown-input", {"json": {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [0]}]}}, 400, ["pixels"]),
    ("bad-base64", {"json": _images(["!!not base64!!"])}, 400, ["images"]),
    ("text-as-image", {"json": _images([_B64_TEXT])}, 400, ["images[0]"]),
    ("second-image-bad", {"json": _images([_B64_CAT, _B64_TEXT])}, 400, ["images[1]"]),
    ("wrong-shape", {"json": _tensor([1, 3, 5, 5], [0.0] * 75)}, 400, ["input"]),
    ("wrong-datatype", {"json": _tensor([1, 3, 32, 32], [0] * 3072, "INT8")}, 400, ["input"]),
    ("short-data", {"json": _tensor([1, 3, 32, 32], [0.0] * 10)}, 400, ["3072"]),
    ("strings-as-fp32", {"json": _tensor([1, 3, 32, 32], ["a"] * 3072)}, 400, ["numbers"]),
    ("negative-shape", {"json": _tensor([-1, 3, 32, 32], [])}, 400, ["shape"]),
    ("absurd-shape", {"json": _tensor([10**12, 3, 32, 32], [0.0])}, 413, [f"limit is {MAX_IMAGES}"]),
    ("negative-classification", {"json": {**_images([_B64_CAT]), "outputs": [{"name": "probabilities", "parameters": {"classification": -3}}]}}, 400, ["classification"]),
    ("unknown-output", {"json": {**_images([_B64_CAT]), "outputs": [{"name": "logits"}]}}, 400, ["logits"]),
    ("bad-header-length", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "abc"}}, 400, ["Inference-Header-Content-Length"]),
    ("header-length-past-end", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "900"}}, 400, ["900"]),
    ("bad-gzip", {"content": b"\x1f\x8bnot really", "headers": {"Content-Encoding": "gzip"}}, 400, ["gzip"]),
    ("too-many-images", {"json": _images([_B64_PNG] * (MAX_IMAGES + 1))}, 413, [f"the limit is {MAX_IMAGES}"]),
    ("deadline-header", {"json": _images([_B64_CAT]), "headers": {"X-Request-Timeout-Ms": "0.001"}}, 504, ["deadline"]),
]


@pytest.mark.parametrize(("kwargs", "status", "needles"), [c[1:] for c in V2_BAD], ids=[c[0] for c in V2_BAD])
def test_malformed_v2_requests_are_named_4xx(limited, kwargs, status, needles) -> None:
    r = httpx.post(f"{limited.url}/v2/models/tiny/infer", timeout=30, **kwargs)
    assert_json_error(r, status, *needles)


def test_v2_unknown_model_and_version_are_404(limited) -> None:
    assert_json_error(httpx.post(f"{limited.url}/v2/models/nope/infer", json=_images([_B64_CAT])), 404, "nope")
    r = httpx.post(f"{limited.url}/v2/models/tiny/versions/7/infer", json=_images([_B64_CAT]))
    assert_json_error(r, 404, "7")
    assert httpx.post(f"{limited.url}/v2/models/tiny/infer", json=_images([_B64_CAT])).status_code == 200


def test_v2_absurd_classification_count_is_not_a_server_error(limited) -> None:
    body = {**_images([_B64_PNG]), "outputs": [{"name": "probabilities", "parameters": {"classification": 10**30}}]}
    r = httpx.post(f"{limited.url}/v2/models/tiny/infer", json=body, timeout=30)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:  # clamped to the classes there are
        assert r.json()["outputs"][0]["shape"] == [1, 1000]


def test_v2_streamed_body_over_the_limit_is_413(limited) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["'
        for _ in range(100):
            yield b"A" * 10_000

    r = httpx.post(f"{limited.url}/v2/models/tiny/infer", content=body(), timeout=30)
    assert_json_error(r, 413, str(MAX_BODY))


_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=12))
_json = st.recursive(_json_scalar, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
_tensorish = st.fixed_dictionaries(
    {"name": st.sampled_from(["images", "input", "x"]), "datatype": st.sampled_from(["BYTES", "FP32", "INT64", "fp32", ""]),
     "shape": st.lists(st.integers(-2, 10**13), max_size=5)},
    optional={"data": _json, "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "classification", "x"]), _json_scalar, max_size=2)},
)  # fmt: skip
_v2_body = st.fixed_dictionaries({}, optional={
    "id": _json_scalar, "inputs": st.one_of(st.lists(_tensorish, max_size=2), _json),
    "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["probabilities", "y"])}, optional={"parameters": st.dictionaries(st.sampled_from(["classification", "binary_data"]), _json_scalar, max_size=2)}), max_size=2), _json),
    "parameters": _json,
})  # fmt: skip


@pytest.mark.slow  # fuzz
@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_v2_body)
def test_fuzzed_v2_json_is_never_a_server_error(limited, body) -> None:
    r = httpx.post(f"{limited.url}/v2/models/tiny/infer", content=json.dumps(body).encode(), timeout=30)
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        assert isinstance(r.json()["error"], str)
