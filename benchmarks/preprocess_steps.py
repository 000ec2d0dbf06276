"""Per-image CPU cost of each preprocessing step, 2018 design vs saikyo's, on one core.

Prints milliseconds per image for a small photo (the cat, 451x300) and a 2000x1500 JPEG, and the ratio
of the 2018-style pipeline to saikyo.inference.imaging.decode.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from saikyo.inference import imaging
from saikyo.inference.preprocessing import Preprocessing

ROOT = Path(__file__).resolve().parent.parent
PP = Preprocessing(input_size=224, crop_pct=0.875, interpolation="bilinear")
MEAN = np.asarray(PP.mean, np.float32)
STD = np.asarray(PP.std, np.float32)


def per_image_ms(fn: Callable[[], object], seconds: float = 1.5) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1000


def seed_2018(data: bytes) -> np.ndarray:
    """Full decode, resize, crop, then float math and transpose in numpy."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = PP.resize_size / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    x = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def decode_only(data: bytes, draft: bool) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if draft:
        w, h = img.size
        s = PP.resize_size / min(w, h)
        img.draft("RGB", (int(w * s + 1), int(h * s + 1)))
    return img.convert("RGB")


def two_pass(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = PP.resize_size / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    return img.crop((left, top, left + 224, top + 224))


def one_pass(img: Image.Image) -> Image.Image:
    return img.resize((224, 224), Image.Resampling.BILINEAR, box=imaging.crop_box(*img.size, PP), reducing_gap=3.0)


def numpy_normalize(img: Image.Image) -> np.ndarray:
    x = np.asarray(img, np.float32) / 255.0
    return np.ascontiguousarray(((x - MEAN) / STD).transpose(2, 0, 1))


def main() -> None:
    cat = (ROOT / "tests/data/cat.jpg").read_bytes()
    big_img = Image.open(io.BytesIO(cat)).resize((2000, 1500), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big_img.save(buf, "JPEG", quality=90)
    big = buf.getvalue()
    for label, data in (("cat 451x300", cat), ("2000x1500", big)):
        full = decode_only(data, False)
        drafted = decode_only(data, True)
        cropped = one_pass(drafted)
        rows = {
            "2018 pipeline (decode, resize, crop, numpy float normalise)": per_image_ms(lambda: seed_2018(data)),
            "decode, full size": per_image_ms(lambda: decode_only(data, False)),
            "decode, DCT-scaled (draft)": per_image_ms(lambda: decode_only(data, True)),
            "resize then crop (two passes) of the decoded image": per_image_ms(lambda: two_pass(full)),
            "resize+crop in one pass (box, reducing_gap) of the drafted image": per_image_ms(lambda: one_pass(drafted)),
            "numpy cast+normalise+transpose (now folded into the graph)": per_image_ms(lambda: numpy_normalize(cropped)),
            "uint8 handoff np.asarray (what saikyo does instead)": per_image_ms(lambda: np.asarray(cropped)),
            "saikyo.inference.imaging.decode (all of it)": per_image_ms(lambda: imaging.decode(data, PP)),
        }
        print(f"\n{label}: ms per image, one core")
        for name, ms in rows.items():
            print(f"  {ms:7.3f}  {name}")
        seed, ours = rows["2018 pipeline (decode, resize, crop, numpy float normalise)"], rows["saikyo.inference.imaging.decode (all of it)"]
        print(f"  ratio 2018/saikyo = {seed / ours:.2f}x")


if __name__ == "__main__":
    main()
