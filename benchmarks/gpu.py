"""GPU numbers in one prepared run: raw model throughput, GPU vs CPU decode, the server end to end.

    PYTHONPATH=src python benchmarks/gpu.py --out gpu.jsonl                  # on the GPU machine, < 8 min
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu-dry.jsonl   # dry run of the whole flow

Sections, in order (each appends JSON lines to --out as it measures, naming the GPU):
  env     versions, the GPU's properties and saikyo.bench.hardware's description of the machine;
  raw     images/s of resnet50, resnext50_32x4d, squeezenet1_1 (random weights, fp16, CUDA graphs) at
          batch 1, 8, 64, 256: "img_s" with the batch already on the GPU (the model alone), "host_img_s"
          from uint8 numpy pixels to numpy probabilities (pinned copies included);
  decode  images/s to model-ready uint8 224x224 pixels: nvJPEG + resize/crop on the GPU
          (saikyo.runtime.torch.imaging) vs saikyo.inference.imaging in a thread pool over every core,
          on ImageNet-sized photos and on 1920x1280 ones; "ratio" = GPU / CPU;
  export  resnet50 (random weights) into a temporary repository with `saikyo models export`'s code
          (CPU work, run beside the raw section; if the dynamo exporter fails, TorchScript's writes it);
  e2e     `saikyo serve --backend torch` on a loopback port (saikyo.bench.localserver), the cost lab's
          closed-loop client (saikyo.bench.load, aiohttp; latency percentiles by nearest rank), 32
          images per request, concurrency 16, max batch 256, one configuration each ("config"):
            baseline   one batch in flight, power-of-two buckets (the runner before pipelining)
            pipelined  2 batches in flight, buckets every 32 above 64 (today's defaults)
            k3         3 batches in flight
            workers2   two worker processes sharing the GPU ("cuda_mps": whether an MPS daemon ran)
            cpu-decode today's defaults with JPEGs decoded on the CPU
            batch64    today's defaults at max batch 64 (lower latency: what it costs)
            gil0.5     today's defaults with a GIL switch interval of 0.5 ms instead of 5
          "ratio" = server img/s / raw img_s at the server's max batch size; from the server's metrics
          over the measured window: device and host ms per batch, GPU busy fraction (device seconds
          per second of wall time; above 1 when batches overlap), mean batch;
  compile torch.compile (inductor) + CUDA graphs vs eager + CUDA graphs, resnet50 and squeezenet1_1 at
          batch 64 and 256: img/s with the batch on the GPU, and compile + capture seconds.
Sections run in child processes under hard time limits: a hang or crash costs its own section only,
and what it measured before stays in the file. The total stays under --budget-s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))
# Children (sections, servers) find the same saikyo and print as they go.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
os.environ["PYTHONUNBUFFERED"] = "1"

from saikyo.bench import records  # noqa: E402
from saikyo.bench.load import LoadResult, LoadSpec, multipart_body, run_load  # noqa: E402
from saikyo.bench.localserver import local_server  # noqa: E402
from saikyo.models.provenance import utc_now  # noqa: E402
from saikyo.models.repository import Entry, ModelRepository  # noqa: E402
from saikyo.settings import available_cores  # noqa: E402

PHOTOS = [ROOT / "tests" / "data" / f"{name}.jpg" for name in ("cat", "coffee", "astronaut")]

RAW_MODELS = ("resnet50", "resnext50_32x4d", "squeezenet1_1")
RAW_BATCHES = (1, 8, 64, 256)
E2E_MODEL = "resnet50"


# ---- records ----
class Recorder:
    def __init__(self, path: Path, common: dict[str, Any]) -> None:
        self.path = path
        self.common = common

    def emit(self, record: dict[str, Any]) -> dict[str, Any]:
        full = {**record, **{k: v for k, v in self.common.items() if k not in record}, "time": utc_now()}
        records.append(self.path, full)
        shown = {k: v for k, v in record.items() if k not in ("traceback",)}
        print("  " + json.dumps(shown), flush=True)
        return full

    def error(self, section: str, exc: BaseException, **extra: Any) -> None:
        self.emit({"section": section, "error": f"{type(exc).__name__}: {exc}", **extra,
                   "traceback": traceback.format_exc()[-3000:]})  # fmt: skip


def read_records(path: Path) -> list[dict[str, Any]]:
    """This script's records (records.read keeps only the cost lab's schema); a torn line is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn: Callable[[], Any], min_seconds: float, sync: Callable[[], None], min_iters: int = 2) -> tuple[int, float]:
    """Run fn repeatedly for at least min_seconds (and min_iters); returns (iterations, seconds)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    iters = max(min_iters, int(min_seconds / once))
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return iters, time.perf_counter() - t0


def photos() -> list[tuple[str, bytes]]:
    """The test photos (ImageNet-sized, 451x300 to 600x400), in a fixed order: the requests' mix."""
    return [(p.name, p.read_bytes()) for p in PHOTOS]


# ---- child sections (import torch) ----
def child_env(rec: Recorder, args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torchvision

    from saikyo.bench.hardware import describe

    hw = describe()
    info: dict[str, Any] = {
        "section": "env",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cpu_cores": hw.cores,
        "cpu_model": hw.cpu_model,
        "hardware": hw.description,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    rec.emit(info)


def child_raw(rec: Recorder, args: argparse.Namespace) -> None:
    import gc

    import torch

    for name in args.models:
        if time.time() > args.deadline - 10:
            rec.emit({"section": "raw", "model": name, "skipped": "out of time"})
            continue
        try:
            raw_model(rec, args, name)
        except Exception as exc:
            rec.error("raw", exc, model=name)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def raw_model(rec: Recorder, args: argparse.Namespace, name: str) -> None:
    import numpy as np
    import torch

    from saikyo.models import builders, zoo
    from saikyo.runtime.torch.runner import TorchRunner

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    batches = tuple(args.batches)
    spec = zoo.get(name)
    t0 = time.perf_counter()
    runner = TorchRunner(
        name, builders.build(spec, "random"), spec.preprocessing,
        {"num_classes": spec.num_classes, "weights": "random"},
        device=args.device, dtype=args.dtype, max_batch_size=max(batches), buckets=batches,
        cuda_graphs=True, device_decode="off",
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    say(f"raw {name}: built, warmed up and captured {len(runner.buckets)} buckets in {load_s:.1f}s")
    size = spec.preprocessing.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (max(batches), size, size, 3), dtype=np.uint8)
    runner.infer_pixels(pixels)  # fills the device input buffer too
    try:
        for b in batches:
            if time.time() > args.deadline - 5:
                rec.emit({"section": "raw", "model": name, "batch": b, "skipped": "out of time"})
                continue
            try:
                it, sec = timed(lambda b=b: runner.forward_resident(b), args.min_seconds, sync)
                hit, hsec = timed(lambda b=b: runner.infer_pixels(pixels[:b]), args.min_seconds / 2, sync)
                rec.emit({
                    "section": "raw", "model": name, "batch": b, "dtype": runner.meta["dtype"],
                    "cuda_graphs": runner.cuda_graphs, "img_s": round(it * b / sec, 1),
                    "ms_per_batch": round(sec / it * 1000, 3), "host_img_s": round(hit * b / hsec, 1),
                    "iterations": it, "load_s": round(load_s, 1),
                })  # fmt: skip
            except Exception as exc:
                rec.error("raw", exc, model=name, batch=b)
    finally:
        runner.close()


def child_compile(rec: Recorder, args: argparse.Namespace) -> None:
    """torch.compile + CUDA graphs against eager + CUDA graphs, each bucket captured once."""
    import numpy as np
    import torch

    from saikyo.models import builders, zoo
    from saikyo.runtime.torch.runner import TorchRunner

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    batches = (8, 32) if args.quick else (64, 256)
    for name in args.models:
        spec = zoo.get(name)
        size = spec.preprocessing.input_size
        pixels = np.random.default_rng(0).integers(0, 256, (max(batches), size, size, 3), dtype=np.uint8)
        found: dict[tuple[bool, int], float] = {}
        for compiled in (False, True):
            if time.time() > args.deadline - 10:
                rec.emit({"section": "compile", "model": name, "compiled": compiled, "skipped": "out of time"})
                continue
            try:
                t0 = time.perf_counter()
                runner = TorchRunner(
                    name, builders.build(spec, "random"), spec.preprocessing,
                    {"num_classes": spec.num_classes, "weights": "random"},
                    device=args.device, dtype=args.dtype, max_batch_size=max(batches), buckets=batches,
                    compile=compiled, device_decode="off", in_flight=1,
                )  # fmt: skip
                load_s = time.perf_counter() - t0
                try:
                    runner.infer_pixels(pixels)
                    for b in batches:
                        it, sec = timed(lambda b=b: runner.forward_resident(b), args.min_seconds, sync)
                        found[(compiled, b)] = img_s = round(it * b / sec, 1)
                        record = {"section": "compile", "model": name, "batch": b, "compiled": compiled,
                                  "img_s": img_s, "load_s": round(load_s, 1), "dtype": runner.meta["dtype"]}  # fmt: skip
                        if compiled:
                            record["eager_img_s"] = found.get((False, b))
                            rec.emit(record)
                        else:
                            rec.emit({**record, "section": "compile-eager"})
                finally:
                    runner.close()
            except Exception as exc:
                rec.error("compile", exc, model=name, compiled=compiled)


def photo_sets(quick: bool) -> dict[str, list[bytes]]:
    """The test photos and the same at 1920x1280."""
    from PIL import Image

    small = [data for _, data in photos()]
    if quick:
        return {"imagenet-sized": small}
    large = []
    for data in small:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((1920, 1280), Image.Resampling.BICUBIC).save(
            buf, "JPEG", quality=90
        )
        large.append(buf.getvalue())
    return {"imagenet-sized": small, "1920x1280": large}


def child_decode(rec: Recorder, args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from saikyo.inference import imaging
    from saikyo.models import zoo
    from saikyo.runtime.torch import imaging as torch_imaging

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pp = zoo.get(E2E_MODEL).preprocessing
    cores = available_cores()
    pool = ThreadPoolExecutor(cores)
    n = args.decode_images
    for label, blobs_set in photo_sets(args.quick).items():
        if time.time() > args.deadline - 5:
            rec.emit({"section": "decode", "images": label, "skipped": "out of time"})
            continue
        blobs = [blobs_set[i % len(blobs_set)] for i in range(n)]
        mean_kb = round(sum(map(len, blobs)) / len(blobs) / 1024, 1)
        common = {"section": "decode", "images": label, "mean_kb": mean_kb, "model_input": pp.input_size}
        results: dict[str, float] = {}
        try:
            list(pool.map(lambda b: imaging.decode(b, pp), blobs[:cores]))  # warm the pool
            it, sec = timed(lambda: list(pool.map(lambda b: imaging.decode(b, pp), blobs)), args.min_seconds, sync)
            results["cpu"] = it * n / sec
            rec.emit({**common, "path": "cpu-pool", "threads": cores, "img_s": round(results["cpu"], 1)})
        except Exception as exc:
            rec.error("decode", exc, images=label, path="cpu-pool")
        for batch in sorted({32, n}):
            try:
                chunks = [blobs[i : i + batch] for i in range(0, n, batch)]

                def run(chunks: list[list[bytes]] = chunks) -> None:
                    for chunk in chunks:
                        torch_imaging.decode(chunk, pp, args.device)

                torch_imaging.decode(blobs[:batch], pp, args.device)  # nvJPEG init, weights cache
                it, sec = timed(run, args.min_seconds, sync)
                results[f"device-b{batch}"] = it * n / sec
                rec.emit({**common, "path": "device", "batch": batch, "threads": 1, "img_s": round(it * n / sec, 1)})
            except Exception as exc:
                rec.error("decode", exc, images=label, path="device", batch=batch)
        try:  # the server's shape: a request of 32 per decode thread, several threads at once
            threads = 4
            dpool = ThreadPoolExecutor(threads)
            chunks = [blobs[i : i + 32] for i in range(0, n, 32)]

            def run_threads() -> None:
                list(dpool.map(lambda c: torch_imaging.decode(c, pp, args.device), chunks))

            it, sec = timed(run_threads, args.min_seconds, sync)
            results["device-threads"] = it * n / sec
            rec.emit({**common, "path": "device", "batch": 32, "threads": threads, "img_s": round(it * n / sec, 1)})
            dpool.shutdown()
        except Exception as exc:
            rec.error("decode", exc, images=label, path="device-threads")
        if cuda:
            try:  # nvJPEG alone, no resize: what the decoder itself does
                from torchvision.io import ImageReadMode, decode_jpeg

                data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
                it, sec = timed(lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda"), args.min_seconds, sync)
                rec.emit({**common, "path": "nvjpeg-only", "batch": n, "img_s": round(it * n / sec, 1)})
            except Exception as exc:
                rec.error("decode", exc, images=label, path="nvjpeg-only")
        device_best = max((v for k, v in results.items() if k.startswith("device")), default=None)
        if device_best and results.get("cpu"):
            rec.emit({**common, "path": "ratio", "ratio": round(device_best / results["cpu"], 2),
                      "device_img_s": round(device_best, 1), "cpu_img_s": round(results["cpu"], 1)})  # fmt: skip
    pool.shutdown()


def child_export(rec: Recorder, args: argparse.Namespace) -> None:
    from saikyo.models.export import export_model
    from saikyo.models.repository import ModelRepository

    repo = ModelRepository(args.repository)
    t0 = time.perf_counter()
    try:
        entry, exporter = export_model(args.e2e_model, repo, weights="random"), "dynamo"
    except Exception as exc:
        rec.error("export", exc, model=args.e2e_model)
        say("export failed; writing the entry with the TorchScript-based ONNX exporter instead")
        entry, exporter = torchscript_entry(repo, args.e2e_model), "torchscript (fallback)"
    rec.emit({"section": "export", "model": args.e2e_model, "seconds": round(time.perf_counter() - t0, 1),
              "onnx_mb": round(entry.size_bytes / 1e6, 1), "exporter": exporter})  # fmt: skip


def torchscript_entry(repo: ModelRepository, name: str) -> Entry:
    """The repository entry without the dynamo exporter (the torch runner reads only weights.pt and
    meta.json); the ONNX contract, provenance and meta.json keys are the export's."""
    import torch

    from saikyo.models import builders, zoo
    from saikyo.models.contract import INPUT_NAME, OUTPUT_NAME, io_meta
    from saikyo.models.provenance import sha256_file, versions, weights_provenance
    from saikyo.models.repository import WEIGHTS_FILE

    spec, opset = zoo.get(name), 17
    model = builders.build(spec, "random")
    size = spec.preprocessing.input_size
    repo.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.export.", dir=repo.root) as tmp:
        onnx_path, weights = Path(tmp) / "model.onnx", Path(tmp) / WEIGHTS_FILE
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(onnx_path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                          opset_version=opset, dynamo=False)  # fmt: skip
        torch.save(model.state_dict(), weights)
        provenance, source = weights_provenance(spec, "random")
        meta = {"name": name, "family": spec.family, "base_model": name, "precision": "fp32", "weights": provenance,
                "weights_source": source, "num_classes": spec.num_classes, "input_size": size,
                "preprocessing": spec.preprocessing.to_dict(), "opset": opset, "builder": spec.builder,
                "torch_weights": WEIGHTS_FILE, "exported_at": utc_now(), "exporter": "torchscript",
                "versions": versions(), **io_meta(size, spec.num_classes), "sha256": sha256_file(onnx_path)}  # fmt: skip
        return repo.write(name, onnx_path, meta, extra_files=[weights])


CHILDREN = {"env": child_env, "raw": child_raw, "decode": child_decode, "export": child_export, "compile": child_compile}


# ---- parent: run children under time limits, drive the server ----
class Child:
    """One section in its own process group, with a hard time limit."""

    def __init__(self, name: str, args: argparse.Namespace, limit: float, extra: list[str]) -> None:
        self.name = name
        self.args = args
        self.limit = min(limit, args.deadline - time.time())
        self.proc: subprocess.Popen[bytes] | None = None
        if self.limit < 5:
            say(f"skip {name}: out of time")
            self._record({"section": name, "skipped": "out of time"})
            return
        say(f"section {name} (limit {self.limit:.0f}s)")
        self.ends = time.time() + self.limit
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(args.out),
               "--device", args.device, "--dtype", args.dtype, "--deadline", str(self.ends),
               "--min-seconds", str(args.min_seconds), *(["--quick"] if args.quick else []), *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, start_new_session=True)

    def _record(self, record: dict[str, Any]) -> None:
        Recorder(self.args.out, {"run": self.args.run_id, "device": self.args.device}).emit(record)

    def wait(self) -> None:
        if self.proc is None:
            return
        try:
            rc = self.proc.wait(max(1.0, self.ends - time.time()))
            if rc != 0:
                self._record({"section": self.name, "error": f"child exited with {rc}"})
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self._record({"section": self.name, "error": f"killed after {self.limit:.0f}s"})
        self.proc = None


async def closed_loop(url: str, args: argparse.Namespace) -> tuple[LoadResult, dict[str, float], dict[str, float]]:
    """`concurrency` clients posting the same request back to back: --warm-seconds unrecorded, then
    --e2e-seconds measured; the server's counters read before and after the measured part."""
    spec = LoadSpec(url=url, model=args.e2e_model, mode="closed", images_per_request=args.images_per_request,
                    concurrency=args.concurrency, seconds=args.warm_seconds, timeout=120.0)  # fmt: skip
    await run_load(spec, photos())  # its first request proves the server answers (LoadError if not)
    before = await asyncio.to_thread(scrape, url, args.e2e_model)
    result = await run_load(dataclasses.replace(spec, seconds=args.e2e_seconds, warmup=0), photos())
    return result, before, await asyncio.to_thread(scrape, url, args.e2e_model)


def model_meta(url: str, model: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{url}/v2/models/{model}", timeout=5) as r:
            return json.loads(r.read()).get("parameters", {})
    except Exception:
        return {}


def load_fields(result: LoadResult) -> dict[str, Any]:
    lat = result.latency()  # saikyo.bench.stats.LatencySummary, nearest-rank percentiles
    errors = [s.error for s in result.samples if s.error is not None]
    return {"requests": len(result.ok), "elapsed_s": round(result.duration_s, 2), "errors": len(errors),
            "first_error": errors[0] if errors else None, "errors_by_kind": result.errors_by_kind(),
            "p50_ms": round(lat.p50, 1) if lat else None, "p90_ms": round(lat.p90, 1) if lat else None,
            "p99_ms": round(lat.p99, 1) if lat else None}  # fmt: skip


COUNTERS = ("saikyo_batch_size_sum", "saikyo_batch_size_count", "saikyo_inference_duration_seconds_sum",
            "saikyo_runner_batches_total", "saikyo_runner_device_seconds_total", "saikyo_runner_host_seconds_total")


def scrape(url: str, model: str) -> dict[str, float]:
    """The counters batch_stats needs, summed over worker processes, and the time they were read."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return {}
    out = {"wall": time.time()}
    for metric in COUNTERS:
        found = re.findall(rf'^{metric}\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} ([0-9.eE+-]+)$', text, re.M)
        if found:
            out[metric] = sum(float(v) for v in found)
    return out


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Over the measured window: mean batch, runner img/s of busy time, and per batch the device's and
    the host's milliseconds (the larger is the limit), GPU busy fraction."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    out: dict[str, Any] = {}
    size_sum, size_count = d.get("saikyo_batch_size_sum"), d.get("saikyo_batch_size_count")
    if size_sum is not None and size_count:
        out["mean_batch"] = round(size_sum / size_count, 1)
        out["batches"] = int(size_count)
        if d.get("saikyo_inference_duration_seconds_sum"):
            out["runner_img_s"] = round(size_sum / d["saikyo_inference_duration_seconds_sum"], 1)
    batches = d.get("saikyo_runner_batches_total")
    if batches:
        out["device_ms_per_batch"] = round(d["saikyo_runner_device_seconds_total"] / batches * 1000, 2)
        out["host_ms_per_batch"] = round(d["saikyo_runner_host_seconds_total"] / batches * 1000, 2)
        if d.get("wall"):
            out["gpu_busy"] = round(d["saikyo_runner_device_seconds_total"] / d["wall"], 3)
    return out


POWERS_OF_TWO = "1,2,4,8,16,32,64,128,256"
# name -> (decode, max batch size or None for --e2e-batch, extra server flags, GIL switch interval ms)
E2E_CONFIGS: dict[str, tuple[str, int | None, list[str], float]] = {
    "baseline": ("gpu", None, ["--torch-in-flight", "1", "--batch-buckets", POWERS_OF_TWO], 5.0),
    "pipelined": ("gpu", None, [], 5.0),
    "k3": ("gpu", None, ["--torch-in-flight", "3"], 5.0),
    "workers2": ("gpu", None, ["--workers", "2"], 5.0),
    "cpu-decode": ("cpu", None, [], 5.0),
    "batch64": ("gpu", 64, [], 5.0),
    "gil0.5": ("gpu", None, [], 0.5),
}


def e2e(rec: Recorder, args: argparse.Namespace, repo: Path, raw: dict[tuple[str, int], float], config: str) -> None:
    """One E2E_CONFIGS entry. Its GIL switch interval: the server's (benchmarks/gil_switch.py says why it
    matters)."""
    decode, batch_or_none, extra, gil_switch_ms = E2E_CONFIGS[config]
    batch = batch_or_none or args.e2e_batch
    if batch_or_none is not None and args.quick:
        batch = min(batch, args.e2e_batch // 2)
    budget = args.deadline - time.time()
    if budget < args.e2e_seconds + 40:
        rec.emit({"section": "e2e", "config": config, "decode": decode, "max_batch_size": batch,
                  "skipped": "out of time"})  # fmt: skip
        return
    n = args.images_per_request
    server_args = ["--backend", "torch", "--device", args.device, "--dtype", args.dtype,
                   "--max-batch-size", str(batch), "--max-queue-images", str(4 * args.concurrency * n),
                   "--max-concurrent-requests", str(4 * args.concurrency),
                   "--device-decode", "on" if decode == "gpu" else "off",
                   "--gil-switch-interval-ms", f"{gil_switch_ms:g}", "--log-level", "warning", *extra]  # fmt: skip
    say(f"e2e {config} ({decode} decode, max batch {batch}): {' '.join(server_args)}")
    t0 = time.time()
    server = None
    with tempfile.TemporaryDirectory(prefix="saikyo-gpu-bench-logs-") as logs:
        try:
            with local_server(repo, args.e2e_model, Path(logs), server_args,
                              timeout=min(args.ready_timeout, budget - args.e2e_seconds - 15)) as server:  # fmt: skip
                load_s = time.time() - t0
                say(f"server ready in {load_s:.1f}s")
                result, before, after = asyncio.run(closed_loop(server.url, args))
                img_s = result.images_per_s()
                meta = model_meta(server.url, args.e2e_model)
                raw_img_s = raw.get((args.e2e_model, batch))
                rec.emit({
                    "section": "e2e", "config": config, "model": args.e2e_model, "decode": decode, "backend": "torch",
                    "in_flight": meta.get("in_flight"),
                    "batch_buckets": POWERS_OF_TWO if POWERS_OF_TWO in extra else "every 32 above 64",
                    "cuda_mps": meta.get("cuda_mps"), "workers": 2 if "--workers" in extra else 1,
                    "img_s": round(img_s, 1), "raw_img_s": raw_img_s, "raw_batch": batch,
                    "ratio": round(img_s / raw_img_s, 3) if raw_img_s else None,
                    "images_per_request": n, "concurrency": args.concurrency,
                    "max_batch_size": batch, "gil_switch_interval_ms": gil_switch_ms,
                    "mean_kb": round(len(multipart_body(photos(), n)[0]) / n / 1024, 1),
                    "client": "aiohttp", "server_load_s": round(load_s, 1),
                    **load_fields(result), **batch_stats(before, after),
                })  # fmt: skip
        except Exception as exc:  # ServerStartError carries the log's tail itself
            rec.error("e2e", exc, config=config, decode=decode, max_batch_size=batch)
            if server is not None:
                print(server.log_tail(60), flush=True)


def summary(rec: Recorder, args: argparse.Namespace) -> None:
    mine = [r for r in read_records(args.out) if r.get("run") == rec.common["run"]]
    print("\n==== summary ====", flush=True)
    print(f"device: {rec.common.get('gpu')}", flush=True)
    for r in mine:
        if r.get("section") == "raw" and "img_s" in r:
            print(f"raw    {r['model']:<16} batch {r['batch']:>4}: {r['img_s']:>10.1f} img/s on device, "
                  f"{r['host_img_s']:>10.1f} from host ({r['dtype']}, graphs={r['cuda_graphs']})", flush=True)  # fmt: skip
    for r in mine:
        if r.get("section") == "decode" and "img_s" in r:
            print(f"decode {r['images']:<15} {r['path']:<12} batch {str(r.get('batch', '-')):>4} "
                  f"threads {r.get('threads', '-')}: {r['img_s']:>9.1f} img/s", flush=True)  # fmt: skip
        if r.get("section") == "decode" and "ratio" in r:
            print(f"ratio  GPU decode / CPU decode ({r['images']}): {r['ratio']:.2f} (target >= 3)", flush=True)
    for r in mine:
        if r.get("section") == "e2e" and "img_s" in r:
            ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "n/a"
            print(f"e2e    {r['model']} {r.get('config', '-'):<10} {r['decode']} decode: "
                  f"{r['img_s']:.1f} img/s, p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms, errors {r['errors']}, mean batch {r.get('mean_batch')}, "
                  f"device/host ms per batch {r.get('device_ms_per_batch')}/{r.get('host_ms_per_batch')}, "
                  f"GPU busy {r.get('gpu_busy')}; ratio server/raw(batch {r['raw_batch']}) = {ratio} "
                  f"(target >= 0.5)", flush=True)  # fmt: skip
    for r in mine:
        if r.get("section") == "compile" and "img_s" in r:
            print(f"compile {r['model']:<15} batch {r['batch']:>4}: {r['img_s']:>10.1f} img/s compiled vs "
                  f"{r.get('eager_img_s')} eager + graphs (compile + capture {r['load_s']} s)", flush=True)  # fmt: skip
    errors = [r for r in mine if r.get("error")]
    for r in errors:
        print(f"ERROR in {r['section']}: {r['error']}", flush=True)
    rec.emit({"section": "summary", "records": len(mine), "errors": len(errors),
              "elapsed_s": round(time.time() - args.started, 1)})  # fmt: skip


def gpu_name_from(found: list[dict[str, Any]], run: str) -> str | None:
    for r in found:
        if r.get("run") == run and r.get("section") == "env":
            return r.get("gpu") or "cpu"
    return None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSONL file to append to")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--quick", action="store_true", help="small, fast settings: a dry run of the whole flow")
    ap.add_argument("--budget-s", type=float, default=450.0, help="hard limit for everything")
    ap.add_argument("--sections", default="env,raw,decode,export,e2e,compile")
    ap.add_argument("--configs", default=",".join(E2E_CONFIGS), help="e2e configurations, in order")
    ap.add_argument("--compile-models", default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--images-per-request", type=int, default=None)
    ap.add_argument("--e2e-batch", type=int, default=None, help="server max batch size [256]")
    ap.add_argument("--e2e-seconds", type=float, default=None)
    ap.add_argument("--warm-seconds", type=float, default=None)
    ap.add_argument("--ready-timeout", type=float, default=240.0)
    ap.add_argument("--min-seconds", type=float, default=None, help="per raw/decode cell")
    # child-process arguments
    ap.add_argument("--child", default=None, choices=tuple(CHILDREN))
    ap.add_argument("--deadline", type=float, default=None)
    ap.add_argument("--models", default=None)
    ap.add_argument("--batches", default=None)
    ap.add_argument("--repository", default=None)
    ap.add_argument("--e2e-model", default=None)
    ap.add_argument("--decode-images", type=int, default=None)
    ap.add_argument("--run", default=None)
    ap.add_argument("--gpu", default=None)
    args = ap.parse_args()
    q = args.quick
    defaults = {
        "concurrency": 4 if q else 16, "images_per_request": 8 if q else 32, "e2e_batch": 32 if q else 256,
        "e2e_seconds": 5.0 if q else 20.0, "warm_seconds": 2.0 if q else 4.0, "min_seconds": 0.3 if q else 1.0,
        "models": "squeezenet1_1" if q else ",".join(RAW_MODELS), "batches": "1,8,32" if q else ",".join(map(str, RAW_BATCHES)),
        "e2e_model": "squeezenet1_1" if q else E2E_MODEL, "decode_images": 32 if q else 256,
        "compile_models": "squeezenet1_1" if q else "resnet50,squeezenet1_1",
    }  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m for m in str(args.models).split(",") if m] if isinstance(args.models, str) else args.models
    args.batches = [int(b) for b in str(args.batches).split(",")] if isinstance(args.batches, str) else args.batches
    args.compile_models = [m for m in str(args.compile_models).split(",") if m]
    args.configs = [c for c in str(args.configs).split(",") if c]
    unknown = set(args.configs) - set(E2E_CONFIGS)
    if unknown:
        ap.error(f"unknown --configs {sorted(unknown)}; choose from {', '.join(E2E_CONFIGS)}")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        rec = Recorder(args.out, {"run": args.run, "gpu": args.gpu, "device": args.device, "quick": args.quick})
        try:
            CHILDREN[args.child](rec, args)
        except Exception as exc:
            rec.error(args.child, exc)
            sys.exit(1)
        return

    args.started = time.time()
    args.deadline = args.started + args.budget_s
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run = args.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    sections = set(args.sections.split(","))
    say(f"saikyo GPU benchmark, run {run}, device {args.device}, budget {args.budget_s:.0f}s -> {args.out}")

    def child(name: str, limit: float, *extra: str) -> Child:
        return Child(name, args, limit, ["--run", run, "--gpu", gpu or "", *extra])

    def raw_results() -> dict[tuple[str, int], float]:
        return {(r["model"], r["batch"]): r["img_s"] for r in read_records(args.out)
                if r.get("run") == run and r.get("section") == "raw" and "img_s" in r}  # fmt: skip

    gpu: str | None = None
    if "env" in sections:
        child("env", 60).wait()
    gpu = gpu_name_from(read_records(args.out), run) or ("cpu" if args.device == "cpu" else "unknown")
    rec = Recorder(args.out, {"run": run, "gpu": gpu, "device": args.device, "quick": args.quick})
    say(f"device: {gpu}")
    repo = Path(tempfile.mkdtemp(prefix="saikyo-gpu-bench-"))
    try:
        # The export is CPU work: it runs beside the raw section, which measures the GPU.
        export = None
        if "e2e" in sections and "export" in sections:
            export = child("export", 150, "--repository", str(repo), "--e2e-model", args.e2e_model)
        if "raw" in sections:
            models = [args.e2e_model] + [m for m in args.models if m != args.e2e_model]  # the ratio's first
            batches = sorted(set(args.batches) | {args.e2e_batch})
            child("raw", 200, "--models", ",".join(models), "--batches", ",".join(map(str, batches))).wait()
        if export is not None:
            export.wait()
        if "decode" in sections:
            child("decode", 90, "--decode-images", str(args.decode_images)).wait()
        if "e2e" in sections:
            raw = raw_results()
            for config in args.configs:  # in order of importance: later ones are skipped when time runs out
                e2e(rec, args, repo, raw, config)
        if "compile" in sections:
            child("compile", 150, "--models", ",".join(args.compile_models)).wait()
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    summary(rec, args)


if __name__ == "__main__":
    main()
