"""Benchmark records: one JSON line per measured run (docs/architecture.md, "Benchmark record").

Flat keys so that `jq` and a spreadsheet read them directly. What ran: url, model, family, precision,
backend, device, max_batch_size, weights, hardware (+ cpu_model, cores, memory_gib, accelerator),
instance_type, price_per_hour, price_source, mode, images_per_request, concurrency, rate, seconds,
warmup. What came out: duration_s, requests, ok, errors, errors_by_kind, latency_{mean,p50,p90,p99,
min,max}_ms, requests_per_s, images_per_s, cost_performance_kimg_per_usd (images/s x 3600 / price per
hour / 1000). A sweep adds `cell`, the identity it resumes by.
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
    weights: str | None = None
    precision: str | None = None  # what the server ran (bf16 is not in the model's name)
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
    }
    if spec.mode == "seed":
        record["concurrency"] = 1
    record.update(ctx.extra)
    return record


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


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
                out.append(rec)
    return out


@dataclass(frozen=True)
class ServerInfo:
    backend: str | None = None
    device: str | None = None
    max_batch_size: int | None = None
    weights: str | None = None
    family: str | None = None
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
    merged = {**params, **saikyo_meta}

    def pick(*keys: str) -> Any:
        for k in keys:
            v = merged.get(k, meta.get(k))
            if isinstance(v, dict) and "string_param" in v:  # KServe/Triton parameter shape
                v = v["string_param"]
            if v not in (None, ""):
                return v
        return None

    backend = pick("backend") or _PLATFORMS.get(str(meta.get("platform", "")))
    mbs = pick("max_batch_size")
    try:
        mbs = int(mbs) if mbs is not None else None
    except (TypeError, ValueError):
        mbs = None
    return ServerInfo(
        backend=str(backend) if backend else None,
        device=str(pick("device")) if pick("device") else None,
        max_batch_size=mbs,
        weights=str(pick("weights")) if pick("weights") else None,
        family=str(pick("family")) if pick("family") else None,
        precision=str(pick("precision")) if pick("precision") else None,
    )
