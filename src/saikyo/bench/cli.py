"""`saikyo bench ...`: run, sweep, capacity, plot, recommend, report, prices."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

bench_app = typer.Typer(
    help="The cost lab: load, sweeps, cost performance (thousand images per $), plots, capacity plans.",
    no_args_is_help=True,
)
err = Console(stderr=True, soft_wrap=True)  # messages stay one line each: greppable logs


class _Stdout:
    """stdout as a rich Console, made when printing: a pipe or a file gets wide tables, not ellipses."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        Console(width=None if sys.stdout.isatty() else 160).print(*args, **kwargs)


console = _Stdout()

InstanceOpt = Annotated[Optional[str], typer.Option("--instance-type", help="price row (see `saikyo bench prices`)")]
PriceOpt = Annotated[Optional[float], typer.Option("--price-per-hour", help="$/hour; overrides the price table")]
PricesOpt = Annotated[
    Optional[Path],
    typer.Option("--prices", help="TOML price file merged over the bundled one", exists=True, dir_okay=False),
]
RecordsArg = Annotated[list[Path], typer.Argument(help="JSONL record files", exists=True, dir_okay=False)]
ImagesOpt = Annotated[
    Optional[Path],
    typer.Option(help="directory of images [default: the bundled cat photo]", exists=True, file_okay=False),
]


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(msg)}", highlight=False)  # the message is text: [bench] stays
    return typer.Exit(code)


def parse_ms(text: str) -> float:
    """'200ms', '0.2s', '200' (milliseconds) -> 200.0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", text)
    if not m:
        raise typer.BadParameter(f"not a duration: {text!r} (e.g. 200ms, 0.2s)")
    value = float(m.group(1))
    return value * 1000 if m.group(2) == "s" else value


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, not {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, not {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _pricing(instance_type: str | None, price_per_hour: float | None, prices: Path | None) -> Any:
    from saikyo.bench.cost import UnknownInstanceType, resolve_pricing

    try:
        return resolve_pricing(instance_type, price_per_hour, prices)
    except (UnknownInstanceType, ValueError) as exc:
        raise _fail(str(exc)) from None


def _local_pricing(
    targets: list[str], instance_type: str | None, price_per_hour: float | None, prices: Path | None, hw: Any
) -> Any:
    """The price of this machine for a local server: as named, else the c7i size of its cores (CPU only)."""
    from saikyo.bench.cost import default_instance_type

    if instance_type is None and price_per_hour is None:
        if any(not t.endswith("/cpu") for t in targets) or hw.accelerator:
            raise _fail("name the machine's price: --instance-type (e.g. g5.xlarge) or --price-per-hour")
        instance_type = default_instance_type(hw.cores or 1)
        err.print(f"pricing as {instance_type} (a {hw.cores}-vCPU machine); --instance-type changes it")
    return _pricing(instance_type, price_per_hour, prices)


def _api_key(api_key_file: Path | None) -> str | None:
    # Never a flag: `ps` would show it.
    key = api_key_file.read_text().strip() if api_key_file else os.environ.get("SAIKYO_BENCH_API_KEY")
    return key or None


ApiKeyFileOpt = Annotated[
    Optional[Path],
    typer.Option(help="file holding the server's API key [env SAIKYO_BENCH_API_KEY]", exists=True, dir_okay=False),
]
HardwareOpt = Annotated[Optional[str], typer.Option(help="the server's hardware [default: this machine]")]
TimeoutOpt = Annotated[float, typer.Option(help="per-request timeout, seconds")]
RecordOutOpt = Annotated[Optional[Path], typer.Option(help="append the record (one JSON line) to this file")]


def _need_bench_extra(module: str = "aiohttp", what: str = "the load generator") -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise _fail(f"{what} needs {module}: pip install 'saikyo[bench]'") from None


@bench_app.command()
def run(
    url: Annotated[str, typer.Option(help="server base URL")] = "http://127.0.0.1:8080",
    model: Annotated[Optional[str], typer.Option(help="model name [default: the server's default model]")] = None,
    mode: Annotated[str, typer.Option(help="seed (2018: sequential) | closed | open")] = "seed",
    protocol: Annotated[str, typer.Option(help="classify (multipart POST /classify) | v2 (Open Inference Protocol "
                                                "infer, images as a BYTES input: also a Triton server's)")] = "classify",
    images_per_request: Annotated[int, typer.Option(min=1, help="images in each request (2018: batch size)")] = 1,
    requests: Annotated[int, typer.Option(min=1, help="seed mode: measured sequential requests")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="unmeasured requests first")] = 1,
    concurrency: Annotated[int, typer.Option(min=1, help="closed mode: workers")] = 1,
    rate: Annotated[Optional[float], typer.Option(help="open mode: Poisson arrivals, requests/s")] = None,
    seconds: Annotated[float, typer.Option(help="closed/open mode: how long to offer load")] = 10.0,
    timeout: TimeoutOpt = 60.0,
    max_outstanding: Annotated[int, typer.Option(min=1, help="open mode: in flight at once; beyond: dropped")] = 256,
    seed: Annotated[int, typer.Option(help="open mode: arrival schedule seed")] = 0,
    images: ImagesOpt = None,
    out: RecordOutOpt = None,
    instance_type: InstanceOpt = None,
    price_per_hour: PriceOpt = None,
    prices: PricesOpt = None,
    backend: Annotated[Optional[str], typer.Option(help="record this backend [default: ask the server]")] = None,
    device: Annotated[Optional[str], typer.Option(help="record this device [default: ask the server]")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help="record the server's max batch size")] = None,
    hardware: HardwareOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the record as JSON")] = False,
) -> None:
    """Measure one server: one record (mean/p50/p90/p99, images/s, thousand images per $)."""
    from saikyo.bench import records
    from saikyo.bench.load import LoadError, LoadSpec, read_images, rich_progress, run_load

    _need_bench_extra()
    pricing = _pricing(instance_type, price_per_hour, prices)
    try:
        spec = LoadSpec(
            url=url, model=model, mode=mode, protocol=protocol, images_per_request=images_per_request, requests=requests,
            warmup=warmup, concurrency=concurrency, rate=rate, seconds=seconds, timeout=timeout,
            max_outstanding=max_outstanding, seed=seed, api_key=_api_key(api_key_file),
        )  # fmt: skip
        files = read_images(images)
    except (ValueError, LoadError) as exc:
        raise _fail(str(exc)) from None
    hw = _hardware(hardware)
    info = records.server_info(url, model, api_key=spec.api_key)
    bar = rich_progress(spec, enabled=sys.stdout.isatty() and not as_json)
    try:
        if bar is not None:
            with bar:
                result = asyncio.run(run_load(spec, files, progress=bar))
        else:
            result = asyncio.run(run_load(spec, files))
    except LoadError as exc:
        raise _fail(str(exc), 1) from None
    ctx = records.RunContext(
        hardware=hw,
        pricing=pricing,
        family=info.family,
        backend=backend or info.backend,
        device=device or info.device,
        max_batch_size=max_batch_size or info.max_batch_size,
        workers=info.workers,
        weights=info.weights,
        precision=info.precision,
    )
    rec = records.make_record(result, ctx)
    if out is not None:
        records.append(out, rec)
    if as_json:
        print(json.dumps(rec))
    else:
        _print_record(rec, out)
    if pricing.price_per_hour is None and not as_json:
        err.print("no price: pass --instance-type or --price-per-hour for cost performance")


def _hardware(described: str | None) -> Any:
    """This machine, or the hardware the user names for a server elsewhere."""
    from dataclasses import replace

    from saikyo.bench.hardware import describe

    hw = describe()
    if described:
        hw = replace(hw, cpu_model=described, cores=None, memory_gib=None, accelerator="", virtualised=False)
    return hw


PERCENTILE_KEYS = ("mean", "p50", "p90", "p99")


def _top1_text(top1: float | None, agreement: float | None) -> str:
    """"80.9", or for int8 "80.9 (int8 agrees 90%)"; "-" where nothing is published."""
    if top1 is None:
        return "-"
    return f"{top1:.1f}" + (f" (int8 agrees {agreement:.0%})" if agreement is not None else "")


def _print_record(rec: dict[str, Any], out: Path | None) -> None:
    table = Table(title=f"{rec['model']} x{rec['images_per_request']} ({rec['mode']}) at {rec['url']}")
    table.add_column("")
    table.add_column("value", justify="right")
    load = {"closed": f"concurrency {rec['concurrency']}", "open": f"{rec['rate']} req/s offered"}.get(
        rec["mode"], "sequential"
    )
    rows = [
        ("load", load),
        ("requests / errors", f"{rec['requests']} / {rec['errors']} {rec['errors_by_kind'] or ''}"),
        ("latency mean / p50 / p90 / p99 ms", " / ".join(str(rec[f"latency_{k}_ms"]) for k in PERCENTILE_KEYS)),
        ("images/s", str(rec["images_per_s"])),
        ("instance, $/h", f"{rec['instance_type']}, {rec['price_per_hour']}"),
        ("thousand images per $", str(rec["cost_performance_kimg_per_usd"])),
        ("hardware", rec["hardware"]),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if out is not None:
        console.print(f"appended to {out}")


@bench_app.command()
def sweep(
    out: Annotated[Path, typer.Option(help="JSONL file: records are appended; finished cells are skipped")],
    models: Annotated[str, typer.Option(help="comma-separated models, or 'all' for the zoo")] = "all",
    images_per_request: Annotated[str, typer.Option(help="comma-separated sizes")] = "1,4,8",
    precisions: Annotated[str, typer.Option(help="fp32,bf16,int8 (int8 serves NAME-int8; bf16 on openvino targets)")] = "fp32",
    targets: Annotated[str, typer.Option(help="comma-separated backend/device pairs, e.g. onnxruntime/cpu, openvino/cpu, torch/cuda")] = "onnxruntime/cpu",
    max_batch_sizes: Annotated[str, typer.Option(help="comma-separated server --max-batch-size values")] = "16",
    workers: Annotated[str, typer.Option(help="comma-separated server --workers counts (processes)")] = "1",
    modes: Annotated[str, typer.Option(help="seed,closed,open")] = "seed",
    concurrency: Annotated[str, typer.Option(help="closed-mode levels (where the throughput-p99 curve bends)")] = "1,2,4,8,16",
    rates: Annotated[str, typer.Option(help="open-mode levels, requests/s")] = "",
    requests: Annotated[int, typer.Option(min=1, help="seed mode: measured requests per cell")] = 10,
    warmup: Annotated[int, typer.Option(min=0)] = 1,
    seconds: Annotated[float, typer.Option(help="closed/open mode: seconds per cell")] = 10.0,
    timeout: TimeoutOpt = 120.0,
    repository: Annotated[
        Optional[str], typer.Option(help="model repository: a directory or s3://bucket/prefix [env SAIKYO_REPOSITORY]")
    ] = None,
    s3_endpoint_url: Annotated[
        Optional[str], typer.Option(help="S3-compatible endpoint for s3:// [env SAIKYO_S3_ENDPOINT_URL]")
    ] = None,
    export_missing: Annotated[bool, typer.Option("--export-missing", help="export missing models first")] = False,
    export_weights: Annotated[str, typer.Option(help="weights for --export-missing: random | imagenet | PATH")] = "random",
    server_args: Annotated[str, typer.Option(help="extra `saikyo serve` flags, e.g. '--max-delay-ms 2'")] = "",
    log_dir: Annotated[Optional[Path], typer.Option(help="server logs [default: a temporary directory]")] = None,
    images: ImagesOpt = None,
    instance_type: InstanceOpt = None,
    price_per_hour: PriceOpt = None,
    prices: PricesOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the cells and exit")] = False,
) -> None:
    """Measure the matrix on this machine, one local server per setting; rerun to resume."""
    from saikyo.models import zoo
    from saikyo.bench.hardware import describe
    from saikyo.bench.load import LoadError, read_images
    from saikyo.bench.sweep import SweepConfig, cell_identity, completed_keys, identity_key, plan, run_sweep
    from saikyo.settings import Settings

    _need_bench_extra()
    hw = describe()
    pricing = _local_pricing(_names(targets), instance_type, price_per_hour, prices, hw)
    settings = Settings.from_env(repository=repository, s3_endpoint_url=s3_endpoint_url)
    model_list = list(zoo.ZOO) if models.strip() == "all" else _names(models)
    try:
        cfg = SweepConfig(
            models=model_list, repository=settings.repository, out=out, pricing=pricing,
            images_per_request=_ints(images_per_request), precisions=_names(precisions),
            targets=_names(targets), max_batch_sizes=_ints(max_batch_sizes), workers=_ints(workers),
            modes=_names(modes), concurrency=_ints(concurrency), rates=_floats(rates), requests=requests,
            warmup=warmup, seconds=seconds, timeout=timeout, images=read_images(images),
            export_missing=export_missing, export_weights=export_weights, server_args=shlex.split(server_args),
            log_dir=log_dir, hardware=hw, s3_endpoint_url=settings.s3_endpoint_url,
            model_cache_dir=settings.model_cache_dir,
        )  # fmt: skip
        cells = plan(cfg)
    except (ValueError, LoadError) as exc:
        raise _fail(str(exc)) from None
    if dry_run:
        done = completed_keys(out)
        for c in cells:
            state = "done" if identity_key(cell_identity(c, cfg, hw)) in done else "todo"
            console.print(f"{state}  {c.server.describe()}  x{c.images_per_request}  {c.load.describe()}", markup=False)
        return
    from saikyo.models.errors import RepositoryError
    from saikyo.models.location import open_repository

    try:
        open_repository(settings).check()  # a bad location stops here, not in every server's log
    except RepositoryError as exc:
        raise _fail(str(exc)) from None
    try:
        summary = run_sweep(cfg, say=lambda m: err.print(m, markup=False, highlight=False))
    except KeyboardInterrupt:
        err.print(f"interrupted: finished cells are in {out}; run the same command again to resume")
        raise typer.Exit(130) from None
    if summary.failed:
        raise typer.Exit(1)


@bench_app.command()
def capacity(
    p99: Annotated[str, typer.Option(help="the latency target for p99, e.g. 100ms or 0.1s")],
    model: Annotated[Optional[str], typer.Option(help="model (needed without --url) [default: the server's]")] = None,
    url: Annotated[Optional[str], typer.Option(help="server base URL [default: serve --model locally]")] = None,
    images_per_request: Annotated[int, typer.Option(min=1, help="images in each request")] = 1,
    rate_precision: Annotated[float, typer.Option(help="stop when lo and hi are this fraction apart")] = 0.05,
    start_rate: Annotated[
        Optional[float], typer.Option(help="first rate, req/s [default: half of one sequential client's]")
    ] = None,
    max_rate: Annotated[Optional[float], typer.Option(help="never offer more than this, req/s")] = None,
    max_steps: Annotated[int, typer.Option(min=2, help="open-loop runs at most")] = 20,
    min_requests: Annotated[int, typer.Option(min=1, help="per step: requests offered (1% lie beyond the p99)")] = 1000,
    min_seconds: Annotated[float, typer.Option(help="per step: measured seconds at least")] = 10.0,
    max_seconds: Annotated[float, typer.Option(help="per step: measured seconds at most")] = 120.0,
    warmup_seconds: Annotated[float, typer.Option(help="per step: seconds of the same load first, not measured")] = 3.0,
    timeout: TimeoutOpt = 60.0,
    max_outstanding: Annotated[int, typer.Option(min=1, help="in flight at once; beyond: dropped (an error)")] = 256,
    seed: Annotated[int, typer.Option(help="arrival schedule seed (step i uses seed + i)")] = 0,
    images: ImagesOpt = None,
    out: RecordOutOpt = None,
    instance_type: InstanceOpt = None,
    price_per_hour: PriceOpt = None,
    prices: PricesOpt = None,
    repository: Annotated[
        Optional[Path], typer.Option(help="model repository: what a local server serves; meta.json for the record")
    ] = None,
    backend: Annotated[str, typer.Option(help="local server: --backend")] = "onnxruntime",
    device: Annotated[str, typer.Option(help="local server: --device")] = "cpu",
    max_batch_size: Annotated[int, typer.Option(help="local server: --max-batch-size")] = 16,
    server_args: Annotated[str, typer.Option(help="local server: more `saikyo serve` flags")] = "",
    log_dir: Annotated[Optional[Path], typer.Option(help="local server: its log [default: a temporary dir]")] = None,
    hardware: HardwareOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the record as JSON")] = False,
) -> None:
    """The highest Poisson request rate whose p99 meets --p99 with no errors: bracket, then bisect.

    Each step is an open-loop run of --min-requests requests or more (the p99 rests on >= 10 beyond it),
    --min-seconds to --max-seconds long, after --warmup-seconds of the same load, unmeasured.

    Without --url, a local server is started for --model from --repository, as a sweep does."""
    import contextlib
    import tempfile
    from dataclasses import replace

    from saikyo.bench import records
    from saikyo.bench.capacity import CapacitySpec, StepRule, run_capacity
    from saikyo.bench.load import LoadError, LoadSpec, read_images
    from saikyo.bench.localserver import ServerStartError, local_server
    from saikyo.bench.sweep import ServerSetting
    from saikyo.models.errors import ModelNotExported
    from saikyo.models.repository import ModelRepository
    from saikyo.settings import Settings

    _need_bench_extra()
    if url is None and not model:
        raise _fail("name the --model to serve locally, or the --url of a running server")
    repo = ModelRepository(Settings.from_env(**({"repository": repository} if repository else {})).repository)
    hw = _hardware(hardware)
    if url is None:
        pricing = _local_pricing([f"{backend}/{device}"], instance_type, price_per_hour, prices, hw)
    else:
        pricing = _pricing(instance_type, price_per_hour, prices)
    try:
        # A local server's URL is known once it listens; the spec is checked before starting one.
        load = LoadSpec(
            url=url or "http://127.0.0.1", model=model, mode="seed", images_per_request=images_per_request,
            timeout=timeout, max_outstanding=max_outstanding, seed=seed, api_key=_api_key(api_key_file),
        )  # fmt: skip
        spec = CapacitySpec(
            load, parse_ms(p99), precision=rate_precision, start_rate=start_rate, max_rate=max_rate,
            max_steps=max_steps, rule=StepRule(min_requests, min_seconds, max_seconds, warmup_seconds),
        )  # fmt: skip
        files = read_images(images)
        meta = repo.get(model).meta if model and (url is None or repo.has(model)) else {}
    except (ValueError, LoadError, ModelNotExported) as exc:
        raise _fail(str(exc)) from None
    say = lambda m: err.print(m, markup=False, highlight=False)  # noqa: E731
    with contextlib.ExitStack() as stack:
        try:
            if url is None:
                setting = ServerSetting(str(model), backend, device, max_batch_size)
                logs = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="saikyo-capacity-")))
                server = stack.enter_context(
                    local_server(repo.root, setting.model, logs, [*setting.args(), *shlex.split(server_args)])
                )
                say(f"{setting.describe()}: serving at {server.url}")
                spec = replace(spec, load=replace(spec.load, url=server.url))
            info = records.server_info(spec.load.url, model, api_key=spec.load.api_key)
            found = run_capacity(spec, files, say=say)
        except (LoadError, ServerStartError) as exc:
            raise _fail(str(exc), 1) from None
        except KeyboardInterrupt:
            raise _fail("interrupted: no record written", 130) from None
    ctx = records.RunContext(
        hardware=hw, pricing=pricing, family=info.family, backend=info.backend or (backend if url is None else None),
        device=info.device or (device if url is None else None),
        max_batch_size=info.max_batch_size or (max_batch_size if url is None else None),
        weights=info.weights or meta.get("weights"), precision=info.precision, quantization=meta.get("quantization"),
    )  # fmt: skip
    rec = records.capacity_record(found, ctx)
    if out is not None:
        records.append(out, rec)
    if as_json:
        print(json.dumps(rec))
    else:
        _print_capacity(rec, out)
    if found.capacity is None:
        raise typer.Exit(1)


def _print_capacity(rec: dict[str, Any], out: Path | None) -> None:
    target = f"p99 <= {rec['p99_target_ms']:g} ms"
    table = Table(title=f"capacity of {rec['model']} x{rec['images_per_request']} at {target}, {rec['url']}")
    for col in ("step", "phase", "rate req/s", "seconds", "requests", "errors", "p99 ms", "beyond p99", "images/s", ""):
        table.add_column(col, justify="left" if col in ("phase", "") else "right")
    for i, s in enumerate(rec["capacity_steps"], 1):
        table.add_row(
            str(i), s["phase"], f"{s['rate']:g}", f"{s.get('seconds', 0):g}", str(s.get("requests", "-")),
            str(s.get("errors", "-")), "-" if s.get("p99_ms") is None else f"{s['p99_ms']:.1f}",
            str(s.get("beyond_p99", "-")), f"{s.get('images_per_s', 0):.2f}", "pass" if s["passed"] else s["why"],
        )  # fmt: skip
    console.print(table)
    price = f"{rec['instance_type']} ${rec['price_per_hour']}/h" if rec.get("price_per_hour") else "no price"
    if rec["capacity_rate"] is None:
        console.print(f"no rate met {target} without errors")
    else:
        above = (f"lowest failing rate {rec['capacity_upper_rate']:g}/s, resolution {rec['capacity_resolution']:.1%}"
                 if rec["capacity_upper_rate"] else "no failing rate found above it: a lower bound")  # fmt: skip
        console.print(
            f"capacity at {target}: {rec['capacity_rate']:g} req/s = "
            f"{rec['capacity_images_per_s']:g} images/s = {rec['capacity_cost_performance_kimg_per_usd'] or '-'} "
            f"thousand images per $ ({price}); {above}"
        )
    console.print(
        f"peak (any latency): {rec['peak_images_per_s']} images/s = "
        f"{rec['peak_cost_performance_kimg_per_usd'] or '-'} thousand images per $"
    )
    if out is not None:
        console.print(f"appended to {out}")


@bench_app.command()
def plot(
    records_files: RecordsArg,
    out_dir: Annotated[Optional[Path], typer.Option(help="where the PNG/SVG go [default: beside the first file]")] = None,
    stem: Annotated[str, typer.Option(help="file name prefix, e.g. 'c7i-'")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="print the plotted data as JSON")] = False,
) -> None:
    """The 2018 figure (cost performance vs time per request), accuracy vs images per dollar (both with their
    Pareto frontiers) and throughput-vs-p99 curves."""
    from dataclasses import asdict

    from saikyo.bench import records

    _need_bench_extra("matplotlib", "plotting")
    from saikyo.bench.plot import render

    recs = records.read(records_files)
    if not recs:
        raise _fail(f"no benchmark records in {', '.join(map(str, records_files))}")
    result = render(recs, out_dir or records_files[0].parent, stem)
    if as_json:
        data = {
            "cost_points": [{k: v for k, v in asdict(p).items() if k != "record"} for p in result.cost_points],
            "accuracy_points": [{k: v for k, v in asdict(p).items() if k != "record"} for p in result.accuracy_points],
            "curves": [asdict(c) for c in result.curves],
            "files": [str(f) for f in result.files],
        }
        print(json.dumps(data, indent=2))
        return
    for note in result.notes:
        err.print(note)
    for f in result.files:
        console.print(f"wrote {f}")
    front = [p.label for p in sorted(result.cost_points, key=lambda p: p.time_ms) if p.pareto]
    if front:
        console.print("Pareto frontier (fastest first): " + "; ".join(front))
    accurate = [f"{p.label} ({p.top1:g}%)" for p in result.accuracy_points if p.pareto]
    if accurate:
        console.print("accuracy frontier (most accurate first): " + "; ".join(accurate))


@bench_app.command()
def recommend(
    records_files: RecordsArg,
    p99: Annotated[str, typer.Option(help="latency budget for p99, e.g. 200ms or 0.5s")],
    qps: Annotated[float, typer.Option(help="requests per second to carry")],
    headroom: Annotated[float, typer.Option(help="plan each instance at this fraction of its measured throughput")] = 0.7,
    images_per_request: Annotated[int, typer.Option(min=1, help="images in each of the --qps requests")] = 1,
    model: Annotated[Optional[str], typer.Option(help="only these models (comma-separated)")] = None,
    max_error_rate: Annotated[float, typer.Option(help="largest error fraction a feasible load level may have")] = 0.0,
    hours_per_month: Annotated[float, typer.Option(help="hours billed per month")] = 730.0,
    min_top1: Annotated[
        Optional[float],
        typer.Option(help="only networks whose published ImageNet top-1 is at least this, percent (int8: its fp32's)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every measured configuration meeting the p99 budget, instances for --qps, monthly cost; cheapest first.

    Searched capacities (`saikyo bench capacity` at a p99 target within the budget) come before measured
    levels."""
    from saikyo.bench import records
    from saikyo.bench.recommend import recommend as plan

    recs = records.read(records_files)
    try:
        rec = plan(
            recs, parse_ms(p99), qps, headroom=headroom, images_per_request=images_per_request,
            models=_names(model) if model else None, max_error_rate=max_error_rate, hours_per_month=hours_per_month,
            min_top1=min_top1,
        )  # fmt: skip
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(json.dumps({
            "p99_ms": rec.p99_ms, "qps": rec.qps, "headroom": rec.headroom, "hours_per_month": rec.hours_per_month,
            "options": [o.to_dict() for o in rec.options], "rejected": rec.rejected,
        }, indent=2))  # fmt: skip
        return
    accuracy = f"; published top-1 >= {min_top1:g}%" if min_top1 is not None else ""
    table = Table(
        title=f"p99 <= {rec.p99_ms:g} ms at {rec.qps:g} req/s{accuracy}; each instance planned at {rec.headroom:.0%} "
        f"of measured throughput; {rec.hours_per_month:g} h/month"
    )
    for col, just in [("#", "right"), ("model", "left"), ("top-1 %", "right"), ("instance", "left"),
                      ("backend/device", "left"), ("precision", "left"), ("img/req", "right"),
                      ("capacity from", "left"), ("p99 ms", "right"), ("req/s each", "right"), ("instances", "right"),
                      ("$/h each", "right"), ("monthly", "right")]:  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for i, o in enumerate(rec.options, 1):
        table.add_row(
            str(i), o.model, _top1_text(o.published_top1, o.top1_agreement_with_fp32), o.instance_type,
            f"{o.backend}/{o.device}", o.precision, str(o.images_per_request), o.load, f"{o.p99_ms:.1f}",
            f"{o.capacity_rps:.2f}", str(o.instances), f"{o.price_per_hour:g}", f"${o.monthly_cost:,.2f}",
        )  # fmt: skip
    console.print(table)
    if rec.options:
        console.print("top-1: published ImageNet-1k accuracy of each network's named weights, not measured here "
                      "(int8: its fp32 weights', with how often int8 agreed with fp32)")  # fmt: skip
    if not rec.options:
        sizes = sorted({int(r["images_per_request"]) for r in recs})
        console.print(f"no measured configuration meets the budget (sizes measured: {sizes})")
    for line in rec.rejected:
        err.print(f"not feasible: {line}")


@bench_app.command()
def report(
    records_files: RecordsArg,
    out: Annotated[Path, typer.Option(help="HTML file to write")] = Path("bench-report.html"),
    title: Annotated[str, typer.Option()] = "saikyo cost lab",
    p99: Annotated[Optional[str], typer.Option(help="with --qps: add a recommendation")] = None,
    qps: Annotated[Optional[float], typer.Option()] = None,
    headroom: Annotated[float, typer.Option()] = 0.7,
    images_per_request: Annotated[int, typer.Option(min=1, help="images in each of the --qps requests")] = 1,
) -> None:
    """One self-contained HTML page: hardware, the plots inline, the tables, a recommendation."""
    from saikyo.bench import records
    from saikyo.bench.recommend import recommend as plan

    _need_bench_extra("matplotlib", "the report's plots")
    from saikyo.bench.report import write_report

    recs = records.read(records_files)
    if not recs:
        raise _fail(f"no benchmark records in {', '.join(map(str, records_files))}")
    recommendation = None
    if (p99 is None) != (qps is None):
        raise _fail("--p99 and --qps go together")
    if p99 is not None and qps is not None:
        try:
            recommendation = plan(recs, parse_ms(p99), qps, headroom=headroom, images_per_request=images_per_request)
        except ValueError as exc:
            raise _fail(str(exc)) from None
    write_report(out, recs, recommendation=recommendation, title=title, sources=[str(p) for p in records_files])
    console.print(f"wrote {out}")


@bench_app.command()
def prices(
    prices_file: PricesOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The price table: bundled prices.toml merged with --prices."""
    from dataclasses import asdict

    from saikyo.bench.cost import load_prices

    try:
        table_data = load_prices(prices_file)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    rows = [table_data.get(n) for n in table_data.names()]
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return
    table = Table(title="on-demand prices (saikyo bench prices --prices FILE merges your own)")
    for col in ("instance", "vCPUs", "GiB", "accelerator", "$/hour", "region", "as of"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, str(r.vcpus or "-"), f"{r.memory_gib:g}" if r.memory_gib else "-", r.accelerator or "-",
                      f"{r.price_per_hour:g}", r.region, r.as_of)  # fmt: skip
    console.print(table)
    console.print("sources: " + "; ".join(sorted({r.source for r in rows if r.source})))


def tune_command(
    model: Annotated[str, typer.Argument(help="model in the repository (NAME; NAME-int8 is compared too when present)")],
    p99: Annotated[str, typer.Option(help="the latency target for p99, e.g. 100ms or 0.1s")] = "100ms",
    images_per_request: Annotated[int, typer.Option(min=1, max=64, help="images in each request: the traffic shape")] = 1,
    budget: Annotated[float, typer.Option(min=10, help="seconds to spend, about; more covers more configurations")] = 180.0,
    min_agreement: Annotated[
        float,
        typer.Option(min=0, max=1, envvar="SAIKYO_TUNE_MIN_AGREEMENT",
                     help="a precision other than fp32 is eligible only when its top-1 agrees with fp32 this often"),
    ] = 0.99,  # fmt: skip
    calibration_dir: Annotated[
        Optional[Path],
        typer.Option(help="your own photos to compare precisions on as well (imported models)", exists=True, file_okay=False),
    ] = None,
    repository: Annotated[Optional[str], typer.Option(help="model repository: a directory or s3://bucket/prefix [env SAIKYO_REPOSITORY]")] = None,
    out: Annotated[Path, typer.Option(help="append the benchmark records (one per configuration served) here")] = Path("tune-records.jsonl"),
    write: Annotated[bool, typer.Option("--write/--no-write", help="store the tuning beside the model's versions")] = True,
    quantize: Annotated[
        bool, typer.Option("--quantize/--no-quantize", help="make NAME-int8 from the calibration photos when missing (zoo models, local repository)")
    ] = True,
    instance_type: InstanceOpt = None,
    price_per_hour: PriceOpt = None,
    log_dir: Annotated[Optional[Path], typer.Option(help="the servers' logs and scratch repositories [default: a temporary dir]")] = None,
) -> None:
    """Measure the fastest accurate way to serve MODEL on this machine and store it for `serve`.

    Stage 1 runs every installed engine x precision in process at a few batch sizes (a precision other
    than fp32 must agree with fp32's top-1 on held-out photos); stage 2 serves the front-runners over HTTP
    and searches each configuration's capacity at --p99 with --images-per-request images per request.
    The best is written to MODEL/tunings/<cpu>-<N>core.json in the repository; `serve` applies it on
    this CPU model and core count only."""
    import contextlib
    import tempfile

    from saikyo.bench import records
    from saikyo.bench.cost import default_instance_type
    from saikyo.bench.hardware import describe
    from saikyo.bench.load import read_images
    from saikyo.bench.tune import Candidate, ForwardMeasure, agreement_pixels, candidates_for, load_candidate, measure_served, tune
    from saikyo.models import zoo
    from saikyo.runtime import openvino_installed

    _need_bench_extra()
    p99_ms = parse_ms(p99)
    settings, repo, pre = _tune_target(model, repository)
    hw = describe()
    pricing = _pricing(instance_type or (None if price_per_hour else default_instance_type(hw.cores or 1)), price_per_hour, None)
    bf16 = _native_bf16()
    entries: dict[str, Any] = {}

    def entry(name: str) -> Any:
        if name not in entries:
            entries[name] = repo.get(name)
        return entries[name]

    try:
        extra = sorted(p for p in calibration_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")) if calibration_dir else []
        pixels = agreement_pixels(pre, extra[:200])
    except Exception as exc:  # an unreadable photo, or scikit-image missing
        raise _fail(f"the photos to compare precisions on: {exc}") from None
    reference: list[Any] = []

    # What agreement is measured against: fp32, i.e. NAME's file when MODEL is NAME-int8.
    base = zoo.base_name(model)
    reference_model = base if base != model and repo.has(base) else model

    def fp32() -> Any:
        if not reference:
            runner = load_candidate(entry(reference_model), settings, Candidate(reference_model, "onnxruntime", "fp32"))
            reference.append(runner.infer_pixels(pixels))
            runner.close()
        return reference[0]

    def context(config: Any) -> Any:
        c = config.candidate
        m = entry(c.model).meta
        return records.RunContext(
            hardware=hw, pricing=pricing, family=m.get("family"), backend=c.backend, device="cpu",
            max_batch_size=config.max_batch_size, workers=config.workers, weights=m.get("weights"), precision=c.precision,
            quantization=m.get("quantization"),
        )  # fmt: skip

    say = lambda m: err.print(m, markup=False, highlight=False)  # noqa: E731
    if quantize:
        _make_int8(repo, model, extra, say)
    candidates = candidates_for(model, lambda n: repo.has(n), openvino_installed(), bf16)
    say(f"tuning {model} on {hw.description}: {len(candidates)} engine x precision candidates, "
        f"{images_per_request} image(s) per request, p99 <= {p99_ms:g} ms, budget {budget:g} s")  # fmt: skip
    with contextlib.ExitStack() as stack:
        work = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="saikyo-tune-")))
        stage2 = measure_served(entry, work, read_images(None), images_per_request, p99_ms, context)
        stage1 = ForwardMeasure(entry, settings, pixels, fp32)
        stack.callback(stage1.close)
        try:
            result = tune(
                model, candidates, stage1, stage2, images_per_request,
                p99_ms, budget, min_agreement, hw.cores or 1, say,
            )  # fmt: skip
        except KeyboardInterrupt:
            raise _fail("interrupted: no tuning written", 130) from None
        finally:
            for e in entries.values():
                e.release()
    _store_tune_result(result, model, repo, hw, p99_ms, images_per_request, out, write)


def _tune_target(model: str, repository: str | None) -> tuple[Any, Any, Any]:
    """The settings, the repository and MODEL's preprocessing `saikyo tune` works with; exit 2 naming
    what is wrong."""
    from saikyo.inference.preprocessing import Preprocessing
    from saikyo.models.errors import ModelNotExported, RepositoryError
    from saikyo.models.location import open_repository
    from saikyo.settings import Settings

    try:
        settings = Settings.from_env(**({"repository": repository} if repository else {}))
        repo = open_repository(settings)
        repo.check()
        pre = Preprocessing.from_dict(repo.resolve(model).meta["preprocessing"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _fail(f"{model}: unusable settings or meta.json ({exc})") from None
    except (ModelNotExported, RepositoryError) as exc:
        raise _fail(str(exc)) from None
    return settings, repo, pre


def _native_bf16() -> bool:
    from saikyo.runtime import openvino_installed

    if not openvino_installed():
        return False
    from saikyo.runtime.openvino import cpu_has_native_bf16

    return cpu_has_native_bf16()


def _store_tune_result(
    result: Any, model: str, repo: Any, hw: Any, p99_ms: float, images_per_request: int, out: Path, write: bool
) -> None:
    """After `saikyo tune`: every served configuration as a benchmark record in `out`, the choice for
    MODEL (and a faster accurate variant's) as tunings beside its versions, and what to do printed."""
    from saikyo.bench import records
    from saikyo.models import tunings
    from saikyo.models.errors import RepositoryError

    mine, overall = result.best(model), result.best()
    stage1 = [s.summary() for s in result.screened]
    for served in result.served:
        if not served.record:
            continue
        c = served.config.candidate
        rec = {**served.record, "tune_model": model, "tune_config": served.config.serving(), "tune_candidate": c.model,
               "tune_agreement": result.agreement_of(c), "tune_chosen": served is mine,
               "tune_p99_target_ms": p99_ms, "tune_stage1": stage1}  # fmt: skip
        records.append(out, rec)
    _print_tune(result, mine)
    if mine is None:
        raise _fail(f"no configuration of {model} met p99 <= {p99_ms:g} ms at any rate: raise --p99 or lower --images-per-request", 1)
    written = [(model, mine)] + ([(overall.config.candidate.model, overall)] if overall is not None and overall is not mine else [])
    processes = result.with_workers()
    # --workers is the whole server's setting, not one model's: advised beside the tuning, not applied.
    advice = {}
    if processes is not None and (processes.capacity_images_per_s or 0) > (mine.capacity_images_per_s or 0):
        advice = {"workers": processes.config.workers, "workers_capacity_images_per_s": processes.capacity_images_per_s}
    for name, best in written:
        c = best.config.candidate
        tuning = tunings.Tuning(
            model=name, cpu_model=hw.cpu_model, cores=hw.cores or 1, tuned_at=tunings.now(), serving=best.config.serving(),
            images_per_request=images_per_request, p99_ms=p99_ms, capacity_images_per_s=float(best.capacity_images_per_s or 0),
            kimg_per_usd=best.record.get("capacity_cost_performance_kimg_per_usd"), agreement=result.agreement_of(c),
            version=repo.resolve(name).version, extra=advice if name == model else {},
        )  # fmt: skip
        where = "not written (--no-write)"
        if write:
            try:
                where = repo.write_tuning(name, tunings.file_name(hw.cpu_model, hw.cores or 1), tuning.to_json())
            except RepositoryError as exc:
                raise _fail(f"the tuning could not be stored: {exc}", 1) from None
        console.print(f"{name}: {tuning.describe()}\n  -> {where}", markup=False, highlight=False)
    if overall is not None and overall is not mine:
        console.print(f"faster with accuracy kept: serve {overall.config.candidate.model} "
                      f"(top-1 agreement with fp32 {result.agreement_of(overall.config.candidate):.1%})", markup=False)  # fmt: skip
    if advice:
        console.print(f"faster in {advice['workers']} server processes: {advice['workers_capacity_images_per_s']:.1f} img/s "
                      f"against {mine.capacity_images_per_s:.1f} in one; serve with --workers {advice['workers']}", markup=False)  # fmt: skip
    console.print(f"records: {out}", markup=False, highlight=False)


def _make_int8(repo: Any, model: str, calibration: list[Path], say: Any) -> None:
    """NAME-int8 for a zoo model in a local repository that lacks it, calibrated on `calibration` (or the
    bundled photos), so that stage 1 can weigh it; its agreement with fp32 decides whether it may win."""
    from saikyo.models import zoo
    from saikyo.models.errors import ExportError
    from saikyo.models.repository import ModelRepository

    base, variant = zoo.split_variant(model)
    if variant is not None or base not in zoo.ZOO or not isinstance(repo, ModelRepository):
        return
    if repo.has(zoo.variant_name(model, "int8")):
        return
    from saikyo.models.quantize import quantize_int8

    try:
        quantize_int8(zoo.get(model), repo, calibration or None, progress=say)
    except ExportError as exc:
        say(f"no int8 variant: {str(exc).splitlines()[0]}")


def _print_tune(result: Any, mine: Any) -> None:
    from saikyo.bench.tune import eligible, stage1_score

    k, p99 = result.images_per_request, result.p99_ms
    one = Table(title=f"stage 1: {result.model}, forward passes in process (ms per batch)")
    for col in ("file", "engine precision", "batch sizes", f"img/s at batch {k}", "top-1 agreement", "eligible"):
        one.add_column(col)
    for s in result.screened:
        times = "error: " + s.error if s.error else ", ".join(f"{b}: {t * 1000:.1f}" for b, t in sorted(s.seconds.items()))
        one.add_row(s.candidate.model, s.candidate.label, times, f"{stage1_score(s, k, p99):.1f}",
                    "-" if s.agreement is None else f"{s.agreement:.1%}", "yes" if eligible(s, result.min_agreement) else "no")  # fmt: skip
    console.print(one)
    two = Table(title=f"stage 2: capacity at p99 <= {p99:g} ms, {k} image(s) per request (over HTTP)")
    for col in ("file", "configuration", "img/s", "kimg/$", "chosen"):
        two.add_column(col)
    for s in result.served:
        kimg = s.record.get("capacity_cost_performance_kimg_per_usd")
        two.add_row(s.config.candidate.model, s.config.label,
                    f"{s.capacity_images_per_s:.1f}" if s.capacity_images_per_s else s.record.get("error", "no rate passed"),
                    f"{kimg:g}" if kimg else "-", "<-" if s is mine else "")  # fmt: skip
    console.print(two)
