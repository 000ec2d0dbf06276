"""What the tests share: the photos and paths (`paths`), real servers on loopback ports (`serverproc`,
`s3server`, `slowserver`), generated ONNX models (`tinymodel`, `faultmodels`), load and malformed input
(`stress`), a headless browser (`browser`) and the atheris harness (`fuzz_decode_harness`, run as a
script). Tests import from here; fixtures live in tests/conftest.py."""
