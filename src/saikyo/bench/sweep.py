"""The sweep: models x precisions x server settings x images per request x load levels, on this machine.

One local server per (model, backend, device, max batch size, workers): only the measured model is loaded, so
cells do not share memory or threads with models they do not measure. Each finished cell is appended
to the output at once, with its identity (`cell`); a rerun of the same command skips every cell whose
identity is already there, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saikyo.models import zoo
from saikyo.bench import records
from saikyo.bench.cost import Pricing
from saikyo.bench.hardware import Hardware, describe
from saikyo.bench.load import LoadError, LoadSpec, run_load
from saikyo.bench.localserver import ServerStartError, local_server
from saikyo.models.errors import ModelNotExported, RepositoryError
from saikyo.models.location import open_repository
from saikyo.models.repository import ModelRepository, Repository
from saikyo.settings import Settings

PRECISIONS = ("fp32", "bf16", "int8")
# NAME-int8 is a quantised ONNX file: the torch runner builds fp32 networks only, so it has no int8 cells.
ONNX_ONLY_BACKENDS = ("torch",)
# Backends that run a model at another precision than its file's, by the server's --precision (bf16).
PRECISION_BACKENDS = ("openvino",)

Say = Callable[[str], None]


@dataclass(frozen=True)
class ServerSetting:
    model: str  # the served name: "resnet50" or "resnet50-int8"
    backend: str
    device: str
    max_batch_size: int
    workers: int = 1  # `saikyo serve --workers`
    precision: str = "fp32"  # fp32 | bf16 | int8 (int8: the NAME-int8 file)

    def args(self) -> list[str]:
        args = ["--backend", self.backend, "--device", self.device, "--max-batch-size", str(self.max_batch_size),
                "--workers", str(self.workers)]  # fmt: skip
        # int8 is the file's; fp32 and bf16 are what the server is told (OpenVINO's own default is bf16).
        return args if self.precision == "int8" else [*args, "--precision", self.precision]

    def describe(self) -> str:
        workers = f", {self.workers} workers" if self.workers != 1 else ""
        return f"{self.model} [{self.backend}/{self.device}, {self.precision}, max batch {self.max_batch_size}{workers}]"


@dataclass(frozen=True)
class LoadLevel:
    mode: str  # "seed" | "closed" | "open"
    concurrency: int | None = None
    rate: float | None = None

    def describe(self) -> str:
        if self.mode == "closed":
            return f"closed c={self.concurrency}"
        if self.mode == "open":
            return f"open {self.rate:g}/s"
        return "seed"


@dataclass(frozen=True)
class Cell:
    server: ServerSetting
    images_per_request: int
    load: LoadLevel


@dataclass
class SweepConfig:
    models: Sequence[str]
    repository: str | Path  # a directory or s3://bucket/prefix: the servers read it themselves
    out: Path
    pricing: Pricing
    images_per_request: Sequence[int] = (1, 4, 8)
    precisions: Sequence[str] = ("fp32",)
    targets: Sequence[str] = ("onnxruntime/cpu",)  # "backend/device" pairs the server is started with
    max_batch_sizes: Sequence[int] = (16,)
    workers: Sequence[int] = (1,)  # server processes, `saikyo serve --workers`
    modes: Sequence[str] = ("seed",)
    concurrency: Sequence[int] = (1, 2, 4, 8, 16)  # closed-mode levels: enough for the knee to show
    rates: Sequence[float] = ()  # open-mode levels, requests/s
    requests: int = 10  # seed mode
    warmup: int = 1
    seconds: float = 10.0  # closed and open modes
    timeout: float = 120.0
    images: Sequence[tuple[str, bytes]] | None = None
    export_missing: bool = False
    export_weights: str = "random"
    server_args: Sequence[str] = ()
    server_timeout: float = 600.0
    log_dir: Path | None = None
    hardware: Hardware | None = None
    s3_endpoint_url: str | None = None
    model_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
        for t in self.targets:
            backend, _, device = t.partition("/")
            if not backend or not device:
                raise ValueError(f"target {t!r} is not backend/device, e.g. onnxruntime/cpu or torch/cuda")
        if not self.workers or min(self.workers) < 1:
            raise ValueError("--workers needs counts of at least 1")
        if "--workers" in self.server_args:
            raise ValueError("give worker counts with --workers, not in --server-args: records carry them")
        if "bf16" in self.precisions and not any(runs_at(t.partition("/")[0], "bf16") for t in self.targets):
            raise ValueError(f"bf16 needs a target on {' or '.join(PRECISION_BACKENDS)}, e.g. openvino/cpu")
        if "open" in self.modes and not self.rates:
            raise ValueError("open mode needs --rates")
        if not self.models:
            raise ValueError("no models to sweep")


def served_name(model: str, precision: str) -> str:
    """int8 is a file of its own (NAME-int8); fp32 and bf16 serve NAME."""
    return zoo.variant_name(model, "int8") if precision == "int8" else model


def runs_at(backend: str, precision: str) -> bool:
    """Whether a backend can serve a precision: bf16 only where the server's --precision reaches the
    engine; int8 (an ONNX file of its own) not on torch."""
    if precision == "bf16":
        return backend in PRECISION_BACKENDS
    return precision != "int8" or backend not in ONNX_ONLY_BACKENDS


def load_levels(cfg: SweepConfig) -> list[LoadLevel]:
    levels: list[LoadLevel] = []
    for mode in cfg.modes:
        if mode == "seed":
            levels.append(LoadLevel("seed"))
        elif mode == "closed":
            levels += [LoadLevel("closed", concurrency=c) for c in cfg.concurrency]
        elif mode == "open":
            levels += [LoadLevel("open", rate=r) for r in cfg.rates]
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return levels


def plan(cfg: SweepConfig) -> list[Cell]:
    """Every cell, grouped so that cells sharing a server are adjacent."""
    levels = load_levels(cfg)
    cells = []
    for model in cfg.models:
        for precision in cfg.precisions:
            for target in cfg.targets:
                backend, _, device = target.partition("/")
                if not runs_at(backend, precision):
                    continue
                for mbs in cfg.max_batch_sizes:
                    for workers in cfg.workers:
                        server = ServerSetting(served_name(model, precision), backend, device, mbs, workers, precision)
                        for n in cfg.images_per_request:
                            for level in levels:
                                cells.append(Cell(server, n, level))
    return cells


def cell_identity(cell: Cell, cfg: SweepConfig, hw: Hardware) -> dict[str, Any]:
    """What makes two measurements the same measurement (the price is not part of it)."""
    load: dict[str, Any] = {"mode": cell.load.mode}
    if cell.load.mode == "seed":
        load["requests"] = cfg.requests
    else:
        load["seconds"] = cfg.seconds
        load["concurrency" if cell.load.mode == "closed" else "rate"] = cell.load.concurrency or cell.load.rate
    # The precision is named only where the model's name does not say it (bf16), so the cells of sweeps
    # from before bf16 keep their identity.
    precision = {} if cell.server.precision == zoo.precision_of(cell.server.model) else {"precision": cell.server.precision}
    return {
        "model": cell.server.model,
        **precision,
        "backend": cell.server.backend,
        "device": cell.server.device,
        "max_batch_size": cell.server.max_batch_size,
        "workers": cell.server.workers,
        "server_args": list(cfg.server_args),
        "images_per_request": cell.images_per_request,
        **load,
        "cpu_model": hw.cpu_model,
        "cores": hw.cores,
    }


def identity_key(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True)


def completed_keys(out: Path) -> set[str]:
    # Cells recorded before workers were an axis ran one process.
    return {identity_key({"workers": 1, **r["cell"]}) for r in records.read(out) if isinstance(r.get("cell"), dict)}


@dataclass
class SweepSummary:
    ran: int = 0
    already_done: int = 0
    missing_model: int = 0
    failed: int = 0
    messages: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.ran} cells measured, {self.already_done} already in the output, "
            f"{self.missing_model} skipped (model not exported), {self.failed} failed"
        )


class CellCounter:
    """"cell k of N" and an ETA from the cells measured so far (server starts included): the progress a
    sweep of hours prints, one plain line per cell, readable in a log as on a terminal."""

    def __init__(self, total: int) -> None:
        self.total, self.started, self.measured = total, 0, 0
        self._begun = time.monotonic()

    def next(self) -> str:
        self.started += 1
        eta = ""
        if self.measured:
            left = (time.monotonic() - self._begun) / self.measured * (self.total - self.started + 1)
            eta = f", ETA {_duration(left)}"
        return f"cell {self.started} of {self.total}{eta}:"

    def finished(self) -> None:
        self.measured += 1

    def skipped(self, n: int) -> None:
        """Cells that will not run (model missing, server failed): out of the count, not the ETA."""
        self.total -= n


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def run_sweep(cfg: SweepConfig, say: Say = print) -> SweepSummary:
    hw = cfg.hardware or describe()
    settings = Settings(repository=cfg.repository, s3_endpoint_url=cfg.s3_endpoint_url, model_cache_dir=cfg.model_cache_dir)
    repo = open_repository(settings)
    done = completed_keys(cfg.out)
    log_dir = cfg.log_dir or Path(tempfile.mkdtemp(prefix="saikyo-sweep-"))
    summary = SweepSummary()

    groups: dict[ServerSetting, list[Cell]] = {}
    for cell in plan(cfg):
        groups.setdefault(cell.server, []).append(cell)
    say(f"sweep: {sum(map(len, groups.values()))} cells on {len(groups)} server settings; {hw.description}; "
        f"instance {cfg.pricing.instance_type} at {_price(cfg.pricing)}; server logs in {log_dir}")  # fmt: skip
    skipped = [t for t in cfg.targets for p in cfg.precisions if p == "int8" and not runs_at(t.partition("/")[0], p)]
    if skipped:
        say(f"int8 is not measured on {', '.join(sorted(set(skipped)))}: NAME-int8 is an ONNX model the torch runner does not build")
    if "bf16" in cfg.precisions and not all(runs_at(t.partition("/")[0], "bf16") for t in cfg.targets):
        say(f"bf16 is measured on {', '.join(PRECISION_BACKENDS)} targets only")

    todos = {s: [c for c in cells if identity_key(cell_identity(c, cfg, hw)) not in done] for s, cells in groups.items()}
    # Models first (exporting the missing ones if asked), so that "cell k of N" counts what will run.
    problems = {s: _ensure_exported(s.model, repo, cfg, say) for s, todo in todos.items() if todo}
    counter = CellCounter(sum(len(todo) for s, todo in todos.items() if todo and not problems[s]))
    for setting, cells in groups.items():
        todo = todos[setting]
        summary.already_done += len(cells) - len(todo)
        if not todo:
            say(f"{setting.describe()}: all {len(cells)} cells already in {cfg.out}")
            continue
        problem = problems[setting]
        try:
            meta = {} if problem else repo.resolve(setting.model).meta  # meta.json only: servers download
        except RepositoryError as exc:
            problem = str(exc)
        if problem:
            summary.missing_model += len(todo)
            if problems[setting] is None:  # its meta.json could not be read
                counter.skipped(len(todo))
            summary.messages.append(problem)
            say(f"skip {setting.describe()} ({len(todo)} cells): {problem}")
            continue
        try:
            with local_server(
                settings.repository, setting.model, log_dir, [*setting.args(), *_repository_args(cfg), *cfg.server_args],
                timeout=cfg.server_timeout,
            ) as server:
                # The precision the server runs (torch on CUDA: fp16), as it says; else the model name's.
                precision = records.server_info(server.url, setting.model).precision
                say(f"{setting.describe()}: serving at {server.url}{f' in {precision}' if precision else ''}; "
                    f"{len(todo)} cells")  # fmt: skip
                for cell in todo:
                    say(f"{counter.next()} {cell.server.model} x{cell.images_per_request} {cell.load.describe()}")
                    _run_cell(cell, server.url, cfg, hw, meta, precision, summary, say)
                    counter.finished()
        except ServerStartError as exc:
            summary.failed += len(todo)
            counter.skipped(len(todo))  # raised as the server starts: none of them ran
            summary.messages.append(f"{setting.describe()}: {exc}")
            say(f"[failed] {setting.describe()}: the server did not start:\n{exc}")
    say(f"sweep done: {summary.line()}; records in {cfg.out}")
    return summary


def _run_cell(
    cell: Cell,
    url: str,
    cfg: SweepConfig,
    hw: Hardware,
    meta: dict[str, Any],
    precision: str | None,
    summary: SweepSummary,
    say: Say,
) -> None:
    spec = LoadSpec(
        url=url,
        model=cell.server.model,
        mode=cell.load.mode,
        images_per_request=cell.images_per_request,
        requests=cfg.requests,
        warmup=cfg.warmup,
        concurrency=cell.load.concurrency or 1,
        rate=cell.load.rate,
        seconds=cfg.seconds,
        timeout=cfg.timeout,
    )
    try:
        result = asyncio.run(run_load(spec, cfg.images))
    except LoadError as exc:
        summary.failed += 1
        summary.messages.append(str(exc))
        say(f"[failed] {cell.server.model} x{cell.images_per_request} {cell.load.describe()}: {exc}")
        return
    ctx = records.RunContext(
        hardware=hw,
        pricing=cfg.pricing,
        family=meta.get("family") or records.family_of(cell.server.model),
        backend=cell.server.backend,
        device=cell.server.device,
        max_batch_size=cell.server.max_batch_size,
        workers=cell.server.workers,
        weights=meta.get("weights"),
        precision=precision or cell.server.precision,
        quantization=meta.get("quantization"),
        extra={"cell": cell_identity(cell, cfg, hw)},
    )
    rec = records.make_record(result, ctx)
    records.append(cfg.out, rec)
    summary.ran += 1
    say(
        f"  {cell.server.model} x{cell.images_per_request} {cell.load.describe()}: "
        f"{rec['ok']}/{rec['requests']} ok, mean {rec['latency_mean_ms']} ms, p99 {rec['latency_p99_ms']} ms, "
        f"{rec['images_per_s']} img/s, {rec['cost_performance_kimg_per_usd']} k img/$"
    )


def _repository_args(cfg: SweepConfig) -> list[str]:
    """The server flags that reach the same repository (the sweep passes no SAIKYO_* variable on)."""
    args = ["--s3-endpoint-url", cfg.s3_endpoint_url] if cfg.s3_endpoint_url else []
    return args + (["--model-cache-dir", str(cfg.model_cache_dir)] if cfg.model_cache_dir else [])


def _ensure_exported(model: str, repo: Repository, cfg: SweepConfig, say: Say) -> str | None:
    """None when `model` is in the repository (exporting it first if asked to); else why not."""
    try:
        if repo.has(model):
            return None
    except RepositoryError as exc:
        return str(exc)
    missing = str(ModelNotExported(model, repo.location, repo.fix(model)))
    base, quantize = zoo.split_variant(model)
    if not cfg.export_missing:
        return f"{missing} (or pass --export-missing)"
    if not isinstance(repo, ModelRepository):
        return f"{missing}; --export-missing writes a local directory only"
    if base not in zoo.ZOO:
        return f"{missing}; it is not a zoo model, so it cannot be exported here"
    try:
        from saikyo.models.export import export_model
    except ImportError as exc:
        return f"{missing}; exporting needs torch: pip install 'saikyo[export]' ({exc})"
    # For int8, passing weights re-exports the fp32 model too: only do that when it is missing.
    weights = cfg.export_weights if not repo.has(base) else None
    say(f"exporting {model} ({'weights ' + weights if weights else 'from the exported ' + base})")
    try:
        export_model(base, repo, weights=weights, quantize=quantize, progress=lambda m: say(f"  {m}"))
    except Exception as exc:  # export failures are many kinds (torch, onnx, quantizer): report, go on
        return f"export of {model} failed: {exc}"
    return None


def _price(p: Pricing) -> str:
    return f"${p.price_per_hour}/h ({p.source})" if p.price_per_hour is not None else "no price"
