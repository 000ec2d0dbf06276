"""Each engine and precision against ONNX Runtime fp32, on photos the int8 calibration never saw.

    PYTHONPATH=src python benchmarks/accuracy.py --repository model-repository

For every zoo model exported with pretrained weights (and its NAME-int8 where exported): top-1 agreement
with ONNX Runtime fp32 and the largest probability difference, on tests/data's JPEGs (decoded as an upload
is) and the held-out scikit-image photos (models/quantize.py, HELD_OUT_PHOTOS). Prints the Markdown table
README shows; a changed top-1 is named with fp32's margin over its runner-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from saikyo.models import zoo
from saikyo.models.quantize import held_out_pixels
from saikyo.models.repository import ModelRepository
from saikyo.runtime import load_runner, openvino_installed
from saikyo.settings import Settings

JPEGS = sorted((Path(__file__).resolve().parent.parent / "tests" / "data").glob("*.jpg"))


def rows_for(model: str, repo: ModelRepository) -> list[tuple[str, str, str]]:
    """(served name, backend, precision) to compare with ONNX Runtime fp32."""
    rows = []
    if openvino_installed():
        from saikyo.runtime.openvino import cpu_has_native_bf16

        rows.append((model, "openvino", "fp32"))
        if cpu_has_native_bf16():
            rows.append((model, "openvino", "bf16"))
    int8 = zoo.variant_name(model, "int8")
    if repo.has(int8):
        rows.append((int8, "onnxruntime", "auto"))
        if openvino_installed():
            rows.append((int8, "openvino", "auto"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default=os.environ.get("SAIKYO_REPOSITORY", "model-repository"))
    args = ap.parse_args()
    repo = ModelRepository(args.repository)
    models = [m for m in zoo.ZOO if repo.has(m) and repo.get(m).meta.get("weights") == "imagenet-pretrained"]
    if not models:
        sys.exit(f"no pretrained model in {repo.root}: saikyo models export efficientnet_lite0 --weights imagenet")
    print("| model | engine, precision | top-1 agreement | largest probability difference | top-1 changed on |")
    print("| --- | --- | --- | --- | --- |")
    for model in models:
        reference = load_runner(model, Settings(repository=repo.root, backend="onnxruntime", precision="fp32"))
        names, pixels = held_out_pixels(reference.preprocessing, JPEGS)
        want = reference.infer_pixels(pixels)
        top2 = np.argsort(-want, axis=1)[:, :2]
        for served, backend, precision in rows_for(model, repo):
            runner = load_runner(served, Settings(repository=repo.root, backend=backend, precision=precision))
            got = runner.infer_pixels(pixels)
            same = got.argmax(1) == top2[:, 0]
            changed = [
                f"{names[i]} ({top2[i, 0]} -> {got[i].argmax()}; fp32 margin {want[i, top2[i, 0]] - want[i, top2[i, 1]]:.3f})"
                for i in np.flatnonzero(~same)
            ]  # fmt: skip
            print(f"| {model} | {backend} {runner.meta['precision']} | {int(same.sum())}/{len(same)} | "
                  f"{float(np.abs(got - want).max()):.3f} | {', '.join(changed) or '-'} |", flush=True)  # fmt: skip
            runner.close()


if __name__ == "__main__":
    main()
