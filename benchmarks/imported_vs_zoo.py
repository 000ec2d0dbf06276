"""An imported model against the same network exported from the zoo: one server, the default backend, one run.

    PYTHONPATH=src python benchmarks/imported_vs_zoo.py [--seconds 20 --rounds 3 --concurrency 4]

The zoo side is `models export efficientnet_lite0 --weights imagenet`. The imported side is the same
torch network as someone else's code leaves it: NHWC input, a Softmax at the end,
other I/O names, with a timm pretrained_cfg JSON for its preprocessing, exported by torch.export (the zoo's
exporter: the graphs differ only where the import rewrites) or, with --exporter torchscript, by TorchScript's
exporter with a fixed batch of 1 (a different graph of the same network); `models import` rewrites it to the
serving contract. Both are served by one `saikyo serve` (backend auto) and driven in alternating rounds by
the cost lab's closed-loop client (8 images per request), so that drift on a shared machine hits both.

Then both runners in this process, a full batch each in turn (the forward pass alone).
Last line: ratio=<imported/zoo img/s through the server> imported_img_s=<x> zoo_img_s=<y> runner_ratio=<..>
backend=<..> cpu=<..>
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np

from saikyo.bench.hardware import describe as describe_hardware
from saikyo.bench.load import LoadSpec, bundled_cat, run_load
from saikyo.bench.localserver import local_server
from saikyo.inference import imaging
from saikyo.models import builders, zoo
from saikyo.models.export import export_model
from saikyo.models.importing import ImportOptions, import_model
from saikyo.models.repository import ModelRepository
from saikyo.runtime import create_runner
from saikyo.settings import Settings

ZOO_MODEL = "efficientnet_lite0"
IMPORTED = "lite0_imported"


def foreign_file(directory: Path, exporter: str) -> tuple[Path, Path]:
    """The zoo's network exported as another toolchain would: NHWC, probabilities out, other names."""
    import torch

    spec = zoo.get(ZOO_MODEL)
    network = builders.build(spec, "imagenet")

    class Foreign(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            # contiguous(): a permuted view reaching timm's flatten makes torch.export emit a strided gather
            # (Shape, Range, Gather) that is the source graph's cost, not the import's.
            return torch.softmax(self.network(image.permute(0, 3, 1, 2).contiguous()), dim=-1)

    size = spec.preprocessing.input_size
    path = directory / f"lite0_nhwc_softmax_{exporter}.onnx"
    if exporter == "torchscript":
        # TorchScript's exporter, as many files in the wild were made: a fixed batch of 1, which the import
        # frees. It computes TF "same" padding at run time (Shape, Ceil, Pad nodes): another graph than the zoo's.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(Foreign().eval(), (torch.randn(1, size, size, 3),), str(path), input_names=["image"],
                              output_names=["probs"], dynamo=False, opset_version=17)  # fmt: skip
    else:
        # The zoo's exporter (torch.export), batch dynamic: the zoo's graph plus the permute and the Softmax,
        # so that any difference in speed is the import's doing.
        with torch.no_grad():
            torch.onnx.export(Foreign().eval(), (torch.randn(2, size, size, 3),), str(path), input_names=["image"],
                              output_names=["probs"], dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=False)  # fmt: skip
    pre = spec.preprocessing
    cfg = directory / "pretrained_cfg.json"
    cfg.write_text(json.dumps({"input_size": [3, size, size], "mean": list(pre.mean), "std": list(pre.std),
                               "crop_pct": pre.crop_pct, "interpolation": pre.interpolation}))  # fmt: skip
    return path, cfg


def measure(url: str, model: str, seconds: float, concurrency: int) -> tuple[int, float]:
    spec = LoadSpec(url=url, model=model, mode="closed", images_per_request=8, concurrency=concurrency, seconds=seconds, warmup=4)
    result = asyncio.run(run_load(spec, [bundled_cat()]))
    if result.errors_by_kind():
        raise SystemExit(f"{model}: errors {result.errors_by_kind()}")
    return len(result.ok) * spec.images_per_request, result.duration_s


def probabilities(url: str, model: str) -> np.ndarray:
    """The served probabilities for the bundled cat photo (v2, BYTES input)."""
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(bundled_cat()[1]).decode()]}]}
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return np.asarray(json.load(response)["outputs"][0]["data"])


BATCH = 16


def runner_comparison(repo: ModelRepository, trials: int) -> tuple[float, dict[str, float]]:
    """Both models' runners (backend auto) in this process, one full batch of the cat's pixels each in
    turn: the forward pass alone, where HTTP and decoding cannot hide a difference."""
    runners = {m: create_runner(repo.get(m), Settings(repository=str(repo.root))) for m in (ZOO_MODEL, IMPORTED)}
    pixels = {m: np.stack([imaging.decode(bundled_cat()[1], r.preprocessing)] * BATCH) for m, r in runners.items()}
    seconds: dict[str, list[float]] = {m: [] for m in runners}
    for m, runner in runners.items():
        runner.infer_pixels(pixels[m])  # warm-up
    for t in range(trials):
        for m in (ZOO_MODEL, IMPORTED) if t % 2 == 0 else (IMPORTED, ZOO_MODEL):
            started = time.perf_counter()
            runners[m].infer_pixels(pixels[m])
            seconds[m].append(time.perf_counter() - started)
    for runner in runners.values():
        runner.close()
    ratio = statistics.median(z / i for z, i in zip(seconds[ZOO_MODEL], seconds[IMPORTED]))
    return ratio, {m: BATCH * len(s) / sum(s) for m, s in seconds.items()}


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="per model per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--exporter", choices=("torch.export", "torchscript"), default="torch.export",
                    help="how the 'foreign' file is made: the zoo's exporter with a dynamic batch, or TorchScript's with batch 1")
    ap.add_argument("--runner-trials", type=int, default=20, help="in-process forward passes of a full batch, alternating")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="saikyo-imported-vs-zoo.") as tmp:
        root = Path(tmp)
        repo = ModelRepository(root / "repository")
        export_model(ZOO_MODEL, repo, weights="imagenet")
        source, cfg = foreign_file(root, args.exporter)
        done = import_model(IMPORTED, source, repo, ImportOptions(preprocessing_file=cfg))
        print(f"imported: {'; '.join(done.notes)}")
        with local_server(repo.root, f"{ZOO_MODEL},{IMPORTED}", root / "logs") as server:
            backends = {m: get_json(f"{server.url}/v2/models/{m}")["parameters"]["backend"] for m in (ZOO_MODEL, IMPORTED)}
            totals = {m: [0, 0.0] for m in (ZOO_MODEL, IMPORTED)}
            round_ratios = []
            for r in range(args.rounds):
                order = (ZOO_MODEL, IMPORTED) if r % 2 == 0 else (IMPORTED, ZOO_MODEL)
                rates = {}
                for model in order:
                    images, seconds = measure(server.url, model, args.seconds, args.concurrency)
                    totals[model][0] += images
                    totals[model][1] += seconds
                    rates[model] = images / seconds
                    print(f"round {r + 1} {model}: {rates[model]:.1f} img/s")
                round_ratios.append(rates[IMPORTED] / rates[ZOO_MODEL])
            answers = {m: probabilities(server.url, m) for m in (ZOO_MODEL, IMPORTED)}
        runner_ratio, runner_rates = runner_comparison(repo, args.runner_trials)
    zoo_rate = totals[ZOO_MODEL][0] / totals[ZOO_MODEL][1]
    imported_rate = totals[IMPORTED][0] / totals[IMPORTED][1]
    diff = float(np.max(np.abs(answers[ZOO_MODEL] - answers[IMPORTED])))
    print(f"cat photo: max |probability difference| {diff:.2e}, top-1 {int(answers[ZOO_MODEL].argmax())} vs {int(answers[IMPORTED].argmax())}")
    print(f"server rounds: median imported/zoo {statistics.median(round_ratios):.3f} "
          f"(each round: {', '.join(f'{x:.3f}' for x in round_ratios)})")  # fmt: skip
    print(f"runner, in process, batch {BATCH}: imported {runner_rates[IMPORTED]:.1f} img/s, zoo {runner_rates[ZOO_MODEL]:.1f} img/s, "
          f"median ratio of alternating trials {runner_ratio:.3f}")  # fmt: skip
    cpu = describe_hardware().description
    print(f"ratio={imported_rate / zoo_rate:.3f} imported_img_s={imported_rate:.1f} zoo_img_s={zoo_rate:.1f} "
          f"runner_ratio={runner_ratio:.3f} backend={backends[IMPORTED]}/{backends[ZOO_MODEL]} cpu={cpu!r}")  # fmt: skip


if __name__ == "__main__":
    main()
