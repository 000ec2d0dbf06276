"""atheris harness for imaging.decode, run by test_fuzz_decode.py in a subprocess.

Pillow's Python layer and saikyo.inference.imaging are instrumented for coverage feedback. Any exception other
than ImageError escapes TestOneInput, and atheris reports it as a crash with a non-zero exit status.
"""

import sys

import atheris

with atheris.instrument_imports(include=["PIL", "saikyo"]):
    from saikyo.inference import imaging
    from saikyo.inference.preprocessing import Preprocessing

PP = Preprocessing(input_size=32, crop_pct=0.875)
LIMIT = 1_000_000


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    try:
        out = imaging.decode(data, PP, LIMIT)
    except imaging.ImageError:
        return
    if out.shape != (PP.input_size, PP.input_size, 3):
        raise AssertionError(f"decode returned shape {out.shape}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
