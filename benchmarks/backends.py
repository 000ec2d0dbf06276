"""Backends and precisions side by side on this machine, with the peers saikyo is compared with, in one run.

    for m in resnet50 squeezenet1_1; do saikyo models export $m --weights random --quantize int8; done
    saikyo models export efficientnet_lite0 --weights imagenet --quantize int8
    PYTHONPATH=src python benchmarks/backends.py --openvino-streams 1,2 --out backends.jsonl   # ~25 min
    PYTHONPATH=src python benchmarks/backends.py --quick                  # the whole flow in ~3 min

For each model (resnet50, squeezenet1_1, efficientnet_lite0; NAME-int8 too where it is exported):
  raw    in process: the runner alone on batches of --images-per-request decoded photos, from as many
         threads as it runs batches at once (OpenVINO streams); images/s;
  e2e    `saikyo serve` per configuration on a loopback port, closed loop from saikyo.bench.load:
         --images-per-request images per request (the photos in tests/data), --concurrency clients;
         images/s, p50 and p99;
  peers  benchmarks/peers/: the afternoon Flask app (and with --peers also LitServe, PyTriton and BentoML,
         benchmarks/peer_servers.py), on ONNX Runtime and on OpenVINO at its default precision, serving
         the same model.onnx under the same load.
Configurations: onnxruntime fp32, openvino fp32, openvino bf16 (where the CPU computes bf16 natively),
onnxruntime int8 and openvino int8 (NAME-int8); with --openvino-streams 1,2 also OpenVINO at its default
precision with two batches in flight. `default` is what `saikyo serve` picks with no backend or
precision flag (runtime.auto_backend); "openvino default" is OpenVINO at --precision auto.
Rounds are interleaved: all of a model's servers are up at once and each round measures every one in turn,
so a slow spell of a shared machine spreads over all of them; the median round counts.
Last line (resnet50): ratio=<openvino default e2e / onnxruntime fp32 e2e> ... vs_best_peer=<saikyo default
e2e / the best peer's>.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import peer_servers
from peer_servers import peer_server
from saikyo.bench.load import LoadSpec, read_images, run_load
from saikyo.bench.localserver import local_server
from saikyo.inference import imaging
from saikyo.models import zoo
from saikyo.models.repository import ModelRepository, export_command
from saikyo.runtime import auto_backend, load_runner, openvino_installed
from saikyo.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "data"
MODELS = ("resnet50", "squeezenet1_1", "efficientnet_lite0")
RATIO_MODEL = "resnet50"


@dataclass(frozen=True)
class Config:
    label: str  # "onnxruntime/fp32", "openvino/bf16", "flask+openvino", ...
    model: str  # the served name: NAME or NAME-int8
    backend: str | None = None  # saikyo's; None for a peer
    precision: str = "auto"
    peer: str | None = None  # "FRAMEWORK+ENGINE" for a peer
    streams: int = 1  # OpenVINO: batches in flight

    def settings(self, repository: str) -> Settings:
        return Settings(repository=Path(repository), backend=str(self.backend), precision=self.precision,
                        openvino_streams=self.streams)  # fmt: skip

    def server_args(self) -> list[str]:
        return ["--backend", str(self.backend), "--precision", self.precision,
                "--openvino-streams", str(self.streams), "--log-level", "warning"]  # fmt: skip


def configs_for(model: str, repo: ModelRepository, bf16: bool, streams: list[int], peers: list[str],
                say: Any) -> list[Config]:  # fmt: skip
    int8 = zoo.variant_name(model, "int8")
    configs = [Config("onnxruntime/fp32", model, "onnxruntime", "fp32")]
    if openvino_installed():
        configs.append(Config("openvino/fp32", model, "openvino", "fp32"))
        if bf16:
            configs.append(Config("openvino/bf16", model, "openvino", "bf16"))
        default = "bf16" if bf16 else "fp32"
        configs += [Config(f"openvino/{default}/streams={n}", model, "openvino", default, streams=n) for n in streams if n > 1]
    if repo.has(int8):
        configs.append(Config("onnxruntime/int8", int8, "onnxruntime"))
        if openvino_installed():
            configs.append(Config("openvino/int8", int8, "openvino"))
    else:
        say(f"{model}: no int8 rows ({int8} is not exported: {export_command(int8)})")
    configs += [Config(peer, model, peer=peer) for peer in peer_servers.available(peers, say)]
    return configs


def default_label(model: str, bf16: bool) -> str:
    """The configuration `saikyo serve` runs with no backend or precision flag."""
    settings = Settings()
    backend = auto_backend(model, settings)[0] if settings.backend == "auto" else settings.backend
    return f"{backend}/{'bf16' if backend == 'openvino' and bf16 else 'fp32'}"


# ---- raw ----
def raw_rate(runner: Any, pixels: np.ndarray, seconds: float) -> float:
    """images/s with as many threads as the runner runs batches at once."""
    k = runner.capabilities.max_in_flight
    runner.infer_pixels(pixels)
    done = [0] * k
    stop_at = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop_at:
            runner.infer_pixels(pixels)
            done[i] += len(pixels)

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - started)


def measure_raw(configs: list[Config], args: argparse.Namespace, emit: Any) -> dict[str, float]:
    runners = {}
    for c in configs:
        if c.backend is None:
            continue
        runners[c.label] = load_runner(c.model, c.settings(args.repository))
    pp = next(iter(runners.values())).preprocessing
    photos = [imaging.decode(data, pp) for _, data in read_images(PHOTOS)]
    pixels = np.stack([photos[i % len(photos)] for i in range(args.images_per_request)])
    rounds: dict[str, list[float]] = {label: [] for label in runners}
    for r in range(args.rounds):
        for label, runner in runners.items():
            rate = raw_rate(runner, pixels, args.raw_seconds)
            rounds[label].append(rate)
            emit({"section": "raw", "model": configs[0].model, "config": label, "round": r, "img_s": round(rate, 1),
                  "in_flight": runner.capabilities.max_in_flight, "precision": runner.meta.get("precision")})  # fmt: skip
    for runner in runners.values():
        runner.close()
    return {label: statistics.median(v) for label, v in rounds.items()}


# ---- end to end ----
@dataclass(frozen=True)
class Target:
    """A server under load: where it is, the model's name there, the wire format it reads."""

    url: str
    model: str
    protocol: str = "classify"


def interleaved_rounds(targets: dict[str, Target], images: Any, images_per_request: int, concurrency: int,
                       seconds: float, rounds: int, emit: Any) -> dict[str, dict[str, float]]:  # fmt: skip
    """Closed loop on every target in turn, `rounds` times: a slow spell of a shared machine spreads over all.
    Each round starts one target further on, so that no target always holds the same place: on 2 cores two
    servers of one configuration, always measured first and second, differed by 8-15% in every round.

    Each target's median round by images/s, its latencies from that same round."""
    images_by_round: dict[str, list[dict[str, float]]] = {label: [] for label in targets}
    order = list(targets.items())
    for r in range(rounds):
        for label, t in order[r % len(order):] + order[: r % len(order)]:
            spec = LoadSpec(url=t.url, model=t.model, mode="closed", protocol=t.protocol,
                            images_per_request=images_per_request, concurrency=concurrency, seconds=seconds,
                            warmup=2, timeout=120)  # fmt: skip
            result = asyncio.run(run_load(spec, images))
            lat = result.latency()
            row = {"img_s": result.images_per_s(), "p50_ms": lat.p50 if lat else float("nan"),
                   "p99_ms": lat.p99 if lat else float("nan"), "errors": len(result.samples) - len(result.ok)}  # fmt: skip
            images_by_round[label].append(row)
            emit({"section": "e2e", "model": t.model, "config": label, "round": r, "protocol": t.protocol,
                  **{k: round(v, 1) for k, v in row.items()}})  # fmt: skip
    return {label: sorted(v, key=lambda row: row["img_s"])[len(v) // 2] for label, v in images_by_round.items()}


def measure_e2e(configs: list[Config], args: argparse.Namespace, log_dir: Path, emit: Any) -> dict[str, dict[str, float]]:
    repo = ModelRepository(args.repository)
    targets: dict[str, Target] = {}
    with contextlib.ExitStack() as stack:
        for c in configs:
            if c.peer is not None:
                url = stack.enter_context(peer_server(repo.model_dir(c.model), c.peer, log_dir))
                targets[c.label] = Target(url, c.model, peer_servers.protocol(c.peer))
            else:
                server = stack.enter_context(local_server(repo.root, c.model, log_dir, c.server_args()))
                targets[c.label] = Target(server.url, c.model)
        return interleaved_rounds(targets, read_images(PHOTOS), args.images_per_request, args.concurrency,
                                  args.seconds, args.rounds, emit)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default=os.environ.get("SAIKYO_REPOSITORY", "model-repository"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--images-per-request", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0, help="e2e seconds per configuration and round")
    ap.add_argument("--raw-seconds", type=float, default=5.0)
    ap.add_argument("--openvino-streams", default="1",
                    help="e.g. 1,2: OpenVINO at its default precision with each number of batches in flight")  # fmt: skip
    ap.add_argument("--peers", default="flask", help="comma-separated: flask, litserve, pytriton, bentoml (none: '')")
    ap.add_argument("--quick", action="store_true", help="one round of 2 s (raw 1 s): checks the flow")
    ap.add_argument("--out", type=Path, help="append every measurement as a JSON line")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.raw_seconds = 1, 2.0, 1.0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    repo = ModelRepository(args.repository)
    missing = [m for m in models if not repo.has(m)]
    if missing:
        sys.exit("not exported: " + "; ".join(export_command(m) for m in missing) + f" (--repository {repo.root})")

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def emit(record: dict[str, Any]) -> None:
        print("  " + json.dumps(record), flush=True)
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(json.dumps({**record, "images_per_request": args.images_per_request,
                                    "concurrency": args.concurrency, "time": time.time()}) + "\n")  # fmt: skip

    bf16 = False
    if openvino_installed():
        from saikyo.runtime.openvino import cpu_has_native_bf16

        bf16 = cpu_has_native_bf16()
    say(f"OpenVINO {'installed' if openvino_installed() else 'not installed'}; native bf16: {bf16}; "
        f"{args.rounds} round(s), e2e {args.seconds:g} s, raw {args.raw_seconds:g} s per configuration")  # fmt: skip
    summary: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="saikyo-backends-") as logs:
        for model in models:
            streams = [int(n) for n in args.openvino_streams.split(",")]
            configs = configs_for(model, repo, bf16, streams, [p for p in args.peers.split(",") if p], say)
            say(f"{model}: raw, {sum(c.backend is not None for c in configs)} configurations")
            raw = measure_raw(configs, args, emit)
            say(f"{model}: end to end, {len(configs)} servers")
            e2e = measure_e2e(configs, args, Path(logs), emit)
            summary[model] = {"raw": raw, "e2e": e2e, "default": default_label(model, bf16)}
            print(f"{model}: " + " | ".join(
                f"{label} raw {raw.get(label, float('nan')):.1f} e2e {row['img_s']:.1f} img/s p99 {row['p99_ms']:.0f} ms"
                for label, row in e2e.items()), flush=True)  # fmt: skip
    for model in sorted(summary, key=lambda m: m == RATIO_MODEL):  # resnet50's line last
        print(ratio_line(model, summary[model]["e2e"], summary[model]["default"], bf16))


def ratio_line(model: str, e2e: dict[str, dict[str, float]], default: str, bf16: bool) -> str:
    """openvino default / onnxruntime fp32 and saikyo default / the best peer, end to end."""
    ort = e2e["onnxruntime/fp32"]["img_s"]
    ov_default = e2e.get(f"openvino/{'bf16' if bf16 else 'fp32'}", {}).get("img_s", float("nan"))
    ov_fp32 = e2e.get("openvino/fp32", {}).get("img_s", float("nan"))
    peers = {label: row["img_s"] for label, row in e2e.items() if "+" in label} or {"none": float("nan")}
    best = max(peers, key=peers.__getitem__)
    mine = e2e.get(default, {}).get("img_s", float("nan"))  # nan: the default is not a CPU engine here
    return (f"{'ratio' if model == RATIO_MODEL else model + '_ratio'}={ov_default / ort:.3f} model={model} "
            f"openvino_default_img_s={ov_default:.1f} onnxruntime_fp32_img_s={ort:.1f} "
            f"openvino_fp32_vs_onnxruntime_fp32={ov_fp32 / ort:.3f} saikyo_default={default} "
            f"saikyo_default_img_s={mine:.1f} best_peer={best} best_peer_img_s={peers[best]:.1f} "
            f"vs_best_peer={mine / peers[best]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
