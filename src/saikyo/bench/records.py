"""Benchmark records: one JSON line per measured run (docs/architecture.md, "Benchmark record").

Flat keys so that `jq` and a spreadsheet read them directly. What ran: url, model, family, precision,
backend, device, max_batch_size, workers, weights, hardware (+ cpu_model, cores, memory_gib, accelerator),
instance_type, price_per_hour, price_source, mode, images_per_request, concurrency, rate, seconds,
warmup (open loop: warmup_seconds). What came out: duration_s, requests, ok, errors, errors_by_kind,
latency_{mean,p50,p90,p99,min,max}_ms, requests_per_s, images_per_s, cost_performance_kimg_per_usd
(images/s x 3600 / price per hour / 1000). A sweep adds `cell`, the identity it resumes by.

Accuracy (published, for the named weights; never measured here): published_top1, published_top5 (percent,
ImageNet-1k validation), published_for (the weights they are for), published_source, speed_only (true when
the served weights are not those: the record measures speed only). int8 variants add
top1_agreement_with_fp32 (from the entry's meta.json), agreement_photos (how many photos, each with its
mirror image) and agreement_held_out (whether those photos were kept out of calibration).

A capacity search (`saikyo bench capacity`) writes one open-loop record, that of its highest passing
step, with search = "capacity", p99_target_ms, capacity_rate (offered requests/s), capacity_images_per_s,
capacity_cost_performance_kimg_per_usd, capacity_upper_rate (lowest failing rate above), capacity_precision,
capacity_resolution, capacity_converged, peak_images_per_s, peak_cost_performance_kimg_per_usd,
capacity_step_rule and capacity_steps (every step: phase, rate, seconds, requests, errors, p99_ms,
beyond_p99, images_per_s, passed, why).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from saikyo import __version__
from saikyo.models import zoo
from saikyo.models.errors import UnknownModel
from saikyo.bench.capacity import CapacityResult
from saikyo.bench.cost import Pricing
from saikyo.bench.hardware import Hardware
from saikyo.bench.load import LoadResult

SCHEMA = "saikyo.bench/1"


@dataclass(frozen=True)
class RunContext:
    """What the load generator cannot see for itself: the server's settings, the machine, the price."""

    hardware: Hardware
    pricing: Pricing
    family: str | None = None
    backend: str | None = None
    device: str | None = None
    max_batch_size: int | None = None
    workers: int | None = None  # server processes (`saikyo serve --workers`)
    weights: str | None = None
    precision: str | None = None  # what the server ran, where it says (torch on CUDA: fp16, OpenVINO: bf16)
    quantization: dict[str, Any] | None = None  # the entry's meta.json "quantization", when known
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a sweep's `cell`


def family_of(model: str | None) -> str:
    if not model:
        return "unknown"
    try:
        return zoo.get(model).family
    except UnknownModel:
        return model


def precision_of(model: str | None) -> str:
    return zoo.precision_of(model) if model else "fp32"


# The weights value (meta.json "weights") of an export with --weights imagenet: the weights the zoo names.
NAMED_WEIGHTS = "imagenet-pretrained"


def accuracy_fields(model: str | None, weights: str | None, quantization: dict[str, Any] | None = None) -> dict:
    """The published accuracy of the weights the zoo names for `model`, and whether this run served them.

    Published, not measured: the numbers are true of the named weights. A run on other weights (random,
    or a file the zoo cannot vouch for) measured speed only, and says so. int8 variants add how often
    their top-1 agreed with fp32 on the photos the quantiser compared them on.
    """
    out: dict[str, Any] = dict.fromkeys(
        ("published_top1", "published_top5", "published_for", "published_source", "speed_only",
         "top1_agreement_with_fp32", "agreement_photos", "agreement_held_out")
    )  # fmt: skip
    try:
        accuracy = zoo.get(model).accuracy if model else None
    except UnknownModel:
        accuracy = None
    if accuracy is not None:
        out.update(
            published_top1=accuracy.top1,
            published_top5=accuracy.top5,
            published_for=accuracy.weights,
            published_source=accuracy.source,
            speed_only=weights != NAMED_WEIGHTS,
        )
    if quantization and quantization.get("top1_agreement_with_fp32") is not None:
        calibration = list(quantization.get("calibration_photos") or [])
        compared = quantization.get("agreement_photos")  # absent: compared on the calibration photos
        out.update(
            top1_agreement_with_fp32=float(quantization["top1_agreement_with_fp32"]),
            agreement_photos=len(compared if compared is not None else calibration),
            agreement_held_out=bool(compared) and not set(compared) & set(calibration),
        )
    return out


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def make_record(result: LoadResult, ctx: RunContext) -> dict[str, Any]:
    spec = result.spec
    lat = result.latency()
    images_per_s = result.images_per_s()
    cost_perf = ctx.pricing.cost_performance(images_per_s) if lat is not None else None
    hw = ctx.hardware
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "saikyo_version": __version__,
        "url": spec.url,
        "model": spec.model or "default",
        "family": ctx.family or family_of(spec.model),
        "precision": ctx.precision or precision_of(spec.model),
        "backend": ctx.backend or "unknown",
        "device": ctx.device or "unknown",
        "max_batch_size": ctx.max_batch_size,
        "workers": ctx.workers,
        "weights": ctx.weights,
        "hardware": hw.description,
        "cpu_model": hw.cpu_model,
        "cores": hw.cores,
        "memory_gib": round(hw.memory_gib, 1) if hw.memory_gib else None,
        "accelerator": hw.accelerator,
        # Client and server on one machine share its cores: the numbers include the client's cost.
        "client_colocated": is_loopback(spec.url),
        "instance_type": ctx.pricing.instance_type,
        "price_per_hour": ctx.pricing.price_per_hour,
        "price_source": ctx.pricing.source,
        "mode": spec.mode,
        "protocol": spec.protocol,
        "images_per_request": spec.images_per_request,
        "concurrency": spec.concurrency if spec.mode != "open" else None,
        "rate": spec.rate if spec.mode == "open" else None,
        "seconds": spec.seconds if spec.mode != "seed" else None,
        "warmup": spec.warmup,
        "duration_s": round(result.duration_s, 4),
        "requests": len(result.samples),
        "ok": len(result.ok),
        "errors": len(result.samples) - len(result.ok),
        "errors_by_kind": result.errors_by_kind(),
        "latency_mean_ms": _r(lat.mean if lat else None),
        "latency_p50_ms": _r(lat.p50 if lat else None),
        "latency_p90_ms": _r(lat.p90 if lat else None),
        "latency_p99_ms": _r(lat.p99 if lat else None),
        "latency_min_ms": _r(lat.min if lat else None),
        "latency_max_ms": _r(lat.max if lat else None),
        "requests_per_s": _r(result.requests_per_s()),
        "images_per_s": _r(images_per_s),
        "cost_performance_kimg_per_usd": _r(cost_perf),
        **accuracy_fields(spec.model, ctx.weights, ctx.quantization),
    }
    if spec.mode == "open":
        record["warmup_seconds"] = spec.warmup_seconds
    if spec.mode == "seed":
        record["concurrency"] = 1
    record.update(ctx.extra)
    return record


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def capacity_record(found: CapacityResult, ctx: RunContext) -> dict[str, Any]:
    """The record of a capacity search: its highest passing step's open-loop record (or, when no rate
    passed, its lowest failing one's) with the search's outcome and every step beside it."""
    capacity, upper, peak = found.capacity, found.upper, found.peak
    shown = capacity or min(found.steps, key=lambda s: s.rate)
    assert shown.result is not None
    record = make_record(shown.result, ctx)
    peak_ips = peak.result.images_per_s() if peak is not None and peak.result is not None else None
    capacity_ips = capacity.result.images_per_s() if capacity is not None and capacity.result is not None else None
    record.update(
        search="capacity",
        p99_target_ms=found.spec.p99_ms,
        capacity_rate=_r(capacity.rate) if capacity else None,
        capacity_images_per_s=_r(capacity_ips),
        capacity_cost_performance_kimg_per_usd=_r(ctx.pricing.cost_performance(capacity_ips) if capacity_ips else None),
        capacity_upper_rate=_r(upper.rate) if upper else None,
        capacity_precision=found.spec.precision,
        capacity_resolution=_r(found.resolution, 4),
        capacity_converged=found.converged,
        peak_images_per_s=_r(peak_ips),
        peak_cost_performance_kimg_per_usd=_r(ctx.pricing.cost_performance(peak_ips) if peak_ips else None),
        capacity_step_rule=found.spec.rule.to_dict(),
        capacity_steps=[s.summary() for s in found.steps],
    )
    return record


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one line and flush it to disk: an interrupted sweep keeps every finished cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        torn = False
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # a line cut short by a kill: end it, so ours stays whole
        f.write((b"\n" if torn else b"") + json.dumps(record).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read(paths: Path | Iterable[Path]) -> list[dict[str, Any]]:
    """Records from JSONL files; a torn last line (a run killed mid-write) is skipped, not fatal."""
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
                out.append(_with_accuracy(rec))
    return out


def _with_accuracy(rec: dict[str, Any]) -> dict[str, Any]:
    """Records written before the accuracy fields existed get them from the zoo by model name (the int8
    agreement, which lives in the entry's meta.json, stays unknown)."""
    if "published_top1" in rec:
        return rec
    return {**rec, **accuracy_fields(rec.get("model"), rec.get("weights"))}


@dataclass(frozen=True)
class ServerInfo:
    backend: str | None = None
    device: str | None = None
    max_batch_size: int | None = None
    weights: str | None = None
    family: str | None = None
    workers: int | None = None
    precision: str | None = None


_PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "torch", "pytorch": "torch"}


def server_info(url: str, model: str | None, timeout: float = 5.0, api_key: str | None = None) -> ServerInfo:
    """What the server says about the model (v2 model metadata), if it says anything; never fails."""
    import urllib.error
    import urllib.request
    from urllib.parse import quote

    if not model:
        return ServerInfo()
    target = f"{url.rstrip('/')}/v2/models/{quote(model, safe='')}"
    request = urllib.request.Request(target, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            meta = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return ServerInfo()
    if not isinstance(meta, dict):
        return ServerInfo()
    params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
    saikyo_meta = meta.get("saikyo") if isinstance(meta.get("saikyo"), dict) else {}
    # The model's effective serving configuration ({key: {"value", "source"}}): its own max batch size.
    serving = meta.get("serving") if isinstance(meta.get("serving"), dict) else {}
    effective = {k: v["value"] for k, v in serving.items() if isinstance(v, dict) and "value" in v}
    merged = {**effective, **params, **saikyo_meta}

    def pick(*keys: str) -> Any:
        for k in keys:
            v = merged.get(k, meta.get(k))
            if isinstance(v, dict) and "string_param" in v:  # KServe/Triton parameter shape
                v = v["string_param"]
            if v not in (None, ""):
                return v
        return None

    def count(key: str) -> int | None:
        value = pick(key)
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    backend = pick("backend") or _PLATFORMS.get(str(meta.get("platform", "")))
    return ServerInfo(
        backend=str(backend) if backend else None,
        device=str(pick("device")) if pick("device") else None,
        max_batch_size=count("max_batch_size"),
        weights=str(pick("weights")) if pick("weights") else None,
        family=str(pick("family")) if pick("family") else None,
        workers=count("workers"),
        precision=str(pick("precision")) if pick("precision") else None,
    )
