"""The `saikyo` command: serve, models, classify (and the cost lab's bench)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from saikyo.models import zoo
from saikyo.models.errors import ExportError, UnknownModel
from saikyo.settings import DEFAULT_MODEL, Settings, cli_fields, env_names, flag_of

if TYPE_CHECKING:
    from saikyo.models.repository import Repository

app = typer.Typer(help="saikyo: image classification inference, fast and measured.", no_args_is_help=True)
models_app = typer.Typer(help="The model zoo and the model repository.", no_args_is_help=True)
app.add_typer(models_app, name="models")

from saikyo.bench.cli import bench_app, tune_command  # noqa: E402  (light: typer and rich only until a command runs)

app.add_typer(bench_app, name="bench")
app.command("tune")(tune_command)

console = Console(width=shutil.get_terminal_size((160, 24)).columns)
err = Console(stderr=True, soft_wrap=True)  # one line per message: greppable, copyable commands

# Exit codes (README, "Exit codes"): 0 done; 1 the work failed (a port in use, a server or a measurement
# that failed); 2 the command cannot work as given (a flag, a model, a repository, a missing extra);
# 130 interrupted.
EXIT_FAILED, EXIT_USAGE = 1, 2

RepositoryOpt = Annotated[
    Optional[str],
    typer.Option("--repository", help="model repository: a directory or s3://bucket/prefix [env SAIKYO_REPOSITORY]"),
]
EndpointOpt = Annotated[
    Optional[str],
    typer.Option("--s3-endpoint-url", help="S3-compatible endpoint for s3:// locations [env SAIKYO_S3_ENDPOINT_URL]"),
]


def _error(message: str) -> None:
    """One line on stderr; the message is text, not markup (an exception's "saikyo[export]" stays)."""
    err.print(f"[red]error:[/] {escape(message)}", highlight=False)


def _settings(**overrides: object) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None


def _repository(settings: Settings, location: str | None = None, check: bool = False) -> Repository:
    """The repository at `location` (default: the settings'), or a clear error and exit 2. With `check`,
    one listing proves it can be read: a missing bucket, refused credentials and an unreachable endpoint
    stop here, naming the location."""
    from saikyo.models.errors import RepositoryError
    from saikyo.models.location import open_repository

    try:
        repo = open_repository(settings, location)
        if check:
            repo.check()
    except RepositoryError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    return repo


def _serve_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` one option per Settings field (settings.cli_fields), typed, documented and grouped
    into help panels from the dataclass: a new setting is a new flag without touching this file. Unset
    flags arrive as None, so the environment (SAIKYO_*, including renamed flags' old variables, which
    Settings.from_env reads) and the defaults still apply.

    A renamed flag's old name and a switch's --no- form are hidden options (named FIELD__N) folded into
    the field's value: shown, they would make the help's flag columns too wide for 80 columns."""
    params, annotations = [], {}
    negations: set[str] = set()  # hidden options whose flag sets False

    def add(name: str, kind: type, option: Any) -> None:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind]))
        annotations[name] = Optional[kind]

    for f in cli_fields():
        kind = _FLAG_TYPES.get(str(f.type), str)
        names = [flag_of(f), *f.metadata["aliases"]]
        default = ", ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default  # wraps at 80
        default = str(default).lower() if isinstance(default, bool) else default
        off = [f"{_negative(names[0])} turns it off"] if kind is bool else []
        shown = f" [default: {default}]" if default not in (None, "") else ""
        help = escape("; ".join([f.metadata["help"], *off]) + shown)  # text, not rich markup
        panel, envvar = f.metadata["panel"], env_names(f)[0]
        add(f.name, kind, typer.Option(None, names[0], help=help, rich_help_panel=panel, envvar=envvar, show_envvar=True))
        hidden = [(n, False) for n in names[1:]] + ([(_negative(n), True) for n in names] if kind is bool else [])
        for i, (decl, negates) in enumerate(hidden):
            add(f"{f.name}__{i}", kind, typer.Option(None, decl, hidden=True))
            if negates:
                negations.add(f"{f.name}__{i}")

    def with_settings_flags(ctx: typer.Context, **given: Any) -> None:
        # Typer names each variable in the help; Settings.from_env is what reads them (old names too),
        # so that a flag given, a hidden --no- form included, always wins over a variable.
        flags: dict[str, Any] = {}
        for key, value in given.items():  # the shown flag first, then its hidden names
            name = key.partition("__")[0]
            if getattr(ctx.get_parameter_source(key), "name", None) == "ENVIRONMENT":
                continue
            if value is not None and flags.get(name) is None:
                flags[name] = False if key in negations else value
        command(**flags)

    with_settings_flags.__name__ = command.__name__
    with_settings_flags.__doc__ = command.__doc__
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    with_settings_flags.__signature__ = inspect.Signature([context, *params])  # type: ignore[attr-defined]
    with_settings_flags.__annotations__ = {"ctx": typer.Context, **annotations}
    return with_settings_flags


def _negative(flag: str) -> str:
    return f"--no-{flag[2:]}"


# Flag value types by the field's declared type; tuples are comma-separated strings, as in SAIKYO_* variables.
_FLAG_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "Path": Path, "Path | None": Path}


@app.command()
@_serve_options
def serve(**flags: Any) -> None:
    """Start the HTTP server (the 2018 /classify API and Open Inference Protocol v2).

    Every setting is a flag and a SAIKYO_<NAME> environment variable; a flag wins over the variable.
    API keys are never flags (command lines are visible to `ps`): use SAIKYO_API_KEYS or --api-keys-file.
    """
    from saikyo.server import create_app

    settings = _settings(**flags)
    repo = _repository(settings, check=True)
    for name in settings.models:
        _known(repo, name)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if settings.engine == "ray":
        if settings.workers != "1":
            _error("--workers is for the plain engine; under --engine ray the Ray Serve replicas are the workers: use --replicas")
            raise typer.Exit(2)
        _serve_on_ray(settings)
        return
    if settings.engine != "plain":
        _error(f"unknown engine {settings.engine!r}; choose plain or ray")
        raise typer.Exit(2)
    from saikyo.server.http_protocol import raise_fd_limit
    from saikyo.server.middlewares.auth import AuthConfigError
    from saikyo.server.shutdown import serve as serve_draining
    from saikyo.scale.workers.supervisor import listen, serve_workers, worker_count

    settings = settings.with_overrides(workers=str(worker_count(settings)))
    raise_fd_limit(settings)  # before workers start: they inherit it
    try:
        server_app = create_app(settings)
    except AuthConfigError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    try:
        if settings.workers != "1":
            # Each worker builds its own app; this one only checked the settings.
            raise typer.Exit(serve_workers(settings, int(settings.workers)))
        # Bound here, as the supervisor binds for its workers: a port in use is the same error (exit 1)
        # in either mode, before any model loads.
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        _error(f"{exc}; stop what holds it, or choose another --port")
        raise typer.Exit(EXIT_FAILED) from None
    # SIGTERM: readiness false, drain in-flight requests, exit 0 (server/shutdown.py).
    serve_draining(server_app, settings, sock)


def _known(repo: Repository, name: str) -> None:
    """Exit 2 naming the zoo unless `name` is a zoo model or in the repository (whose entries describe
    themselves, so models outside the zoo serve too)."""
    from saikyo.models.errors import RepositoryError

    try:
        if zoo.base_name(name) in zoo.ZOO or repo.has(name):
            return
    except RepositoryError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    _error(
        f"{UnknownModel(name, list(zoo.ZOO))} (and not in the repository {repo.location}); a model of your own "
        f"goes in with: saikyo models import {name} YOUR_MODEL.onnx; saikyo models list shows the rest"
    )
    raise typer.Exit(EXIT_USAGE)


def _serve_on_ray(settings: Settings) -> None:
    import importlib.util

    # Only looked up, not imported: Ray reads some loopback switches at import time.
    if importlib.util.find_spec("ray") is None:
        _error("--engine ray needs Ray Serve: pip install 'saikyo[ray]'")
        raise typer.Exit(2)
    from saikyo.scale.ray import deployment_options, serve_on_ray

    try:
        deployment_options(settings)
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    try:
        serve_on_ray(settings)
    except ValueError as exc:  # replicas that do not fit this machine
        _error(str(exc))
        raise typer.Exit(2) from None
    except OSError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None


@models_app.command("list")
def models_list(
    repository: RepositoryOpt = None,
    s3_endpoint_url: EndpointOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every zoo model and variant, and every other model in the repository: versions, weights, size."""
    from saikyo.models.catalog import list_models
    from saikyo.models.errors import RepositoryError

    from saikyo.models.location import is_remote
    from saikyo.models.repository import export_command

    settings = _settings(repository=repository, s3_endpoint_url=s3_endpoint_url)
    if not is_remote(settings.repository) and not Path(settings.repository).is_dir():
        # The zoo alone is a fair answer before the first export; a repository someone named must exist.
        fix = export_command(DEFAULT_MODEL, settings.repository)
        if repository is not None or "SAIKYO_REPOSITORY" in os.environ:
            _error(f"no model repository at {settings.repository}; create it with: {fix}")
            raise typer.Exit(EXIT_USAGE)
        err.print(f"no model repository at {settings.repository} yet; the zoo only. Export one: {fix}", highlight=False)
    try:
        rows = list_models(_repository(settings, check=True))
    except RepositoryError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"model zoo (repository: {settings.repository})")
    for col in ("name", "family", "input", "versions", "weights", "size MB", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            r["family"] or "-",
            str(r["input_size"] or "-"),
            ",".join(map(str, r["versions"])) or "-",
            r.get("weights") or "-",
            f"{r['size_mb']:.1f}" if r.get("size_mb") else "-",
            r.get("description", ""),
        )
    console.print(table)


@models_app.command("push")
def models_push(
    name: Annotated[str, typer.Argument(help="model name in the local repository (its latest version)")],
    to: Annotated[str, typer.Option("--to", help="where to publish: s3://bucket/prefix or a directory")],
    version: Annotated[Optional[int], typer.Option(min=1, help="version number [default: the next one there]")] = None,
    repository: RepositoryOpt = None,
    s3_endpoint_url: EndpointOpt = None,
) -> None:
    """Publish an exported model as a new version: its files first, meta.json (with every file's sha256) last.

    A version that exists is never replaced. Servers with --model-control poll pick it up by themselves;
    with explicit, POST /v2/repository/models/NAME/load.
    """
    from saikyo.models.errors import ModelNotExported, RepositoryError
    from saikyo.models.repository import META_FILE

    settings = _settings(repository=repository, s3_endpoint_url=s3_endpoint_url)
    source = _repository(settings)
    target = _repository(settings, to, check=True)
    for repo in (source, target):  # an s3:// source downloads, an s3:// target uploads
        if hasattr(repo, "progress"):
            repo.progress = _transfer_progress
    try:
        entry = source.get(name)
    except (ModelNotExported, RepositoryError) as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    files = sorted((p for p in entry.path.parent.iterdir() if p.is_file() and p.name in _PUBLISHED), key=lambda p: _PUBLISHED.index(p.name))
    # Where it came from; the digests of what is published are added by publish().
    meta = {**{k: v for k, v in entry.meta.items() if k != "files"}, "published_from": f"{source.location} version {entry.version}"}
    try:
        number = target.publish(name, files, meta, version)
    except RepositoryError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    finally:
        entry.release()
    size = sum(f.stat().st_size for f in files)
    console.print(f"published {name} version {number} to {target.location} ({size / 1e6:.1f} MB: {', '.join(f.name for f in files)}, {META_FILE} last)")


@models_app.command("config")
def models_config(
    name: Annotated[str, typer.Argument(help="model name in the repository (its latest version)")],
    max_batch_size: Annotated[Optional[int], typer.Option(help="largest batch one forward pass runs (1..1024)")] = None,
    max_delay_ms: Annotated[Optional[float], typer.Option(help="how long an idle runner waits for more images (0..1000)")] = None,
    backend: Annotated[Optional[str], typer.Option(help="auto | onnxruntime | openvino | torch")] = None,
    precision: Annotated[Optional[str], typer.Option(help="openvino: auto | fp32 | bf16")] = None,
    threads: Annotated[Optional[int], typer.Option(help="inference threads (0 = one per core)")] = None,
    streams: Annotated[Optional[int], typer.Option(help="openvino: batches in flight at once (1..64)")] = None,
    in_flight: Annotated[Optional[int], typer.Option(help="torch: batches in flight on the device (1..16)")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="drop the version's serving settings (then apply those given)")] = False,
    repository: RepositoryOpt = None,
    s3_endpoint_url: EndpointOpt = None,
) -> None:
    """Set a model's own serving settings (its meta.json `serving` block); the server's flags and
    environment stay the defaults for what it does not set.

    Published as the next version with the same files (versions are never replaced); an unversioned
    local export has its meta.json rewritten instead. Servers with --model-control poll pick it up by
    themselves; with explicit, POST /v2/repository/models/NAME/load.
    """
    from saikyo.models.errors import ModelNotExported, RepositoryError
    from saikyo.models.serving import SERVING_KEY, SETTING_OF, ServingConfigError

    given = {"max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms, "backend": backend, "precision": precision,
             "threads": threads, "streams": streams, "in_flight": in_flight}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if not given and not reset:
        flags = ", ".join("--" + k.replace("_", "-") for k in SETTING_OF)
        _error(f"nothing to set: give at least one of {flags}, or --reset")
        raise typer.Exit(2)
    settings = _settings(repository=repository, s3_endpoint_url=s3_endpoint_url)
    repo = _repository(settings, check=True)
    try:
        current = {} if reset else repo.resolve(name).meta.get(SERVING_KEY) or {}
        if not isinstance(current, dict):
            current = {}  # unusable: replaced by what is given
        serving = {**current, **given}
        number = repo.configure(name, serving)
    except ServingConfigError as exc:
        _error(f"{exc}; nothing was written")
        raise typer.Exit(2) from None
    except (ModelNotExported, RepositoryError) as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    console.print(f"{name} version {number} in {repo.location} serves with {json.dumps(serving) if serving else 'the server defaults'}", highlight=False)


def _transfer_progress(what: str, total: int) -> Callable[[int], None]:
    """A byte bar for one file on a terminal; elsewhere (a log) one line as it starts."""
    if not err.is_terminal:
        err.print(f"{what}: {total / 1e6:.1f} MB", markup=False, highlight=False)
        return lambda _n: None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=err)  # fmt: skip
    task = bar.add_task(escape(what), total=total or None)
    bar.start()
    moved = 0

    def advance(n: int) -> None:  # boto3 calls it from its transfer threads
        nonlocal moved
        moved += n
        bar.update(task, completed=moved)
        if total and moved >= total:
            bar.stop()

    return advance


# What a version consists of; derived files (ONNX Runtime's optimised graph) are not published.
_PUBLISHED = ["model.onnx", "weights.pt", "labels.txt"]


@models_app.command("export")
def models_export(
    name: Annotated[str, typer.Argument(help="zoo model name")],
    weights: Annotated[
        Optional[str], typer.Option(help="imagenet | random | PATH to a state dict [default: the model's default]")
    ] = None,
    quantize: Annotated[Optional[str], typer.Option(help="int8: also write the statically quantised NAME-int8")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17)")] = 18,
    if_missing: Annotated[bool, typer.Option("--if-missing", help="do nothing when already exported")] = False,
    calibration_images: Annotated[
        Optional[list[Path]],
        typer.Option("--calibration-image", help="photo to calibrate int8 on (repeat); default: scikit-image's photos"),
    ] = None,
    repository: RepositoryOpt = None,
) -> None:
    """Export a zoo model to ONNX into the repository (needs the export extra: torch)."""
    from saikyo.models.location import is_remote
    from saikyo.models.repository import ModelRepository

    settings = _settings(repository=repository)
    if is_remote(settings.repository):
        _error(f"export writes a local directory; export there, then: saikyo models push {name} --to {settings.repository}")
        raise typer.Exit(2)
    repo = ModelRepository(settings.repository)
    try:
        zoo.get(name)
    except UnknownModel as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    if quantize is not None and quantize not in zoo.VARIANTS:
        _error(f"unknown quantisation {quantize!r}; supported: {', '.join(zoo.VARIANTS)}")
        raise typer.Exit(2)
    target = zoo.variant_name(name, quantize) if quantize else name
    if if_missing and repo.has(target):
        err.print(f"{target} is already exported in {settings.repository}")
        return
    try:
        from saikyo.models.export import export_model
    except ImportError as exc:
        _error(f"exporting needs torch: pip install 'saikyo[export]' ({exc})")
        raise typer.Exit(2) from None
    try:
        entry = export_model(
            name,
            repo,
            weights=weights,
            opset=opset,
            quantize=quantize,
            calibration_images=calibration_images,
            progress=lambda m: err.print(m),
        )
    except ExportError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    console.print(f"exported {entry.name} -> {entry.path} ({entry.size_bytes / 1e6:.1f} MB, weights {entry.meta.get('weights')})")


@models_app.command("import")
def models_import(
    name: Annotated[str, typer.Argument(help="the name to serve it under")],
    source: Annotated[Path, typer.Argument(help="an ONNX file, or with --arch a PyTorch state dict (.pth, .pt, .safetensors)")],
    labels: Annotated[Optional[Path], typer.Option(help="class names: text (one per line), JSON list, {index: name}, or a Hugging Face config.json")] = None,
    preprocessing: Annotated[
        Optional[Path], typer.Option(help="a Hugging Face preprocessor_config.json or a timm pretrained_cfg JSON; flags override it")
    ] = None,
    size: Annotated[Optional[int], typer.Option(min=8, max=4096, help="input side H = W (needed when the file's is dynamic)")] = None,
    resize_size: Annotated[Optional[int], typer.Option(min=8, max=8192, help="shorter side before the centre crop")] = None,
    crop_pct: Annotated[Optional[float], typer.Option(help="crop / resize fraction (timm's crop_pct) [default 0.875]")] = None,
    interpolation: Annotated[Optional[str], typer.Option(help="bilinear | bicubic [default bilinear]")] = None,
    mean: Annotated[Optional[str], typer.Option(help="per-channel mean after --scale, e.g. 0.485,0.456,0.406 [default ImageNet's]")] = None,
    std: Annotated[Optional[str], typer.Option(help="per-channel std after --scale, e.g. 0.229,0.224,0.225 [default ImageNet's]")] = None,
    channel_order: Annotated[Optional[str], typer.Option(help="rgb | bgr: the order the model takes [default rgb]")] = None,
    scale: Annotated[Optional[str], typer.Option(help="pixels 0..255 are multiplied by this before mean/std [default 1/255]")] = None,
    layout: Annotated[Optional[str], typer.Option(help="nchw | nhwc [default: detected from the axis of size 3]")] = None,
    output: Annotated[Optional[str], typer.Option(help="logits | probabilities [default: probabilities when the graph ends in Softmax]")] = None,
    arch: Annotated[Optional[str], typer.Option(help="for a state dict: a zoo architecture (resnet50) or timm:NAME (timm:convnext_tiny)")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset when exporting a state dict (>= 17)")] = 18,
    quantize: Annotated[Optional[str], typer.Option(help="int8: also publish NAME-int8, statically quantised")] = None,
    calibration_dir: Annotated[
        Optional[Path], typer.Option(help="your photos to calibrate int8 on [default: scikit-image's photos]")
    ] = None,
    repository: RepositoryOpt = None,
    s3_endpoint_url: EndpointOpt = None,
) -> None:
    """Import your own image classifier (ONNX file, or a state dict with --arch) with its labels and
    preprocessing as a new version: checked, rewritten to the serving contract, then published.

    On any error nothing is written and the command exits 2.
    """
    from saikyo.models.errors import ImportRejected, RepositoryError
    from saikyo.models.importing import ImportOptions, import_model
    from saikyo.models.onnx_import import LAYOUTS, OUTPUT_KINDS
    from saikyo.models.preprocessing_files import PreprocessingSpec, number, triple

    settings = _settings(repository=repository, s3_endpoint_url=s3_endpoint_url)
    try:
        for flag, value, allowed in (("--layout", layout, LAYOUTS), ("--output", output, OUTPUT_KINDS)):
            if value is not None and value not in allowed:
                raise ImportRejected(f"{flag} {value!r}: expected one of {', '.join(allowed)}")
        if resize_size is not None and crop_pct is not None:
            raise ImportRejected("give --resize-size or --crop-pct, not both")
        flags = PreprocessingSpec(
            size=size,
            resize_size=resize_size,
            crop_pct=crop_pct,
            interpolation=interpolation,
            mean=triple(mean, "mean") if mean is not None else None,
            std=triple(std, "std") if std is not None else None,
            channel_order=channel_order,
            scale=number(scale, "scale") if scale is not None else None,
        )
        options = ImportOptions(labels, preprocessing, flags, layout, output, arch, opset, quantize, calibration_dir)
        repo = _repository(settings, check=True)
        done = import_model(name, source, repo, options, progress=lambda m: err.print(m, highlight=False))
    except (ImportRejected, RepositoryError) as exc:
        err.print(f"[red]error:[/] {exc} (nothing was written)", highlight=False)
        raise typer.Exit(2) from None
    except ExportError as exc:  # the export or its check failed: not the user's input
        err.print(f"[red]error:[/] {exc} (nothing was written)", highlight=False)
        raise typer.Exit(1) from None
    for note in done.notes:
        err.print(f"note: {note}", highlight=False)
    meta = done.meta
    labelled = f"labels {meta['labels']}" if meta.get("labels") else "no labels: answers carry class indices only"
    console.print(
        f"imported {name} version {done.version} into {repo.location}: {meta['num_classes']} classes, "
        f"{meta['input_size']}x{meta['input_size']}, {labelled}",
        highlight=False,
    )
    if done.int8 is not None:
        agreement = done.int8["quantization"]["top1_agreement_with_fp32"]
        console.print(f"and {done.int8['name']}: int8, top-1 agrees with fp32 on {agreement:.0%} of the held-out photos", highlight=False)


@models_app.command("info")
def models_info(name: str, repository: RepositoryOpt = None, s3_endpoint_url: EndpointOpt = None) -> None:
    """The zoo entry and, if the repository has it, its versions and the latest one's meta.json."""
    from saikyo.models.errors import RepositoryError

    settings = _settings(repository=repository, s3_endpoint_url=s3_endpoint_url)
    repo = _repository(settings, check=True)
    try:
        versions = repo.versions(name)
        if zoo.base_name(name) not in zoo.ZOO and not versions:
            zoo.get(name)  # raises UnknownModel
        info: dict[str, Any] = {"zoo": zoo.get(name).to_dict() if zoo.base_name(name) in zoo.ZOO else None}
        info.update(exported=bool(versions), versions=versions)
        if versions:
            info["meta"] = repo.resolve(name).meta
    except UnknownModel as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    except RepositoryError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    print(json.dumps(info, indent=2))


@app.command()
def classify(
    images: Annotated[list[Path], typer.Argument(help="image files", exists=True, dir_okay=False)],
    model: Annotated[Optional[str], typer.Option(help="model name [default: efficientnet_lite0]")] = None,
    topk: Annotated[int, typer.Option(min=1, max=1000)] = 5,
    repository: RepositoryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the /classify JSON shape")] = False,
) -> None:
    """Classify images locally, without a server; prints the top-k with labels."""
    import numpy as np

    from saikyo.inference import imaging
    from saikyo.inference.predictions import top_k
    from saikyo.models.errors import ModelNotExported, RepositoryError
    from saikyo.models.label_files import labels_for
    from saikyo.models.location import open_repository
    from saikyo.runtime import RunnerError, create_runner, runner_inputs

    name = model or DEFAULT_MODEL
    settings = _settings(repository=repository, models=name)
    _known(_repository(settings), name)
    try:
        entry, options = runner_inputs(open_repository(settings).get(name), settings)
        runner = create_runner(entry, options)
        labels = labels_for(entry, runner.num_classes)
    except (ModelNotExported, RepositoryError, RunnerError, UnknownModel) as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    pixels = []
    for path in images:
        try:
            pixels.append(imaging.decode(path.read_bytes(), runner.preprocessing))
        except imaging.ImageError as exc:
            _error(f"{path}: {exc}")
            raise typer.Exit(1) from None
    probs = runner.infer_pixels(np.stack(pixels))
    idx, vals = top_k(probs, topk)
    if as_json:
        print(json.dumps([{str(i): v for i, v in zip(r, p)} for r, p in zip(idx.tolist(), vals.tolist())]))
        return
    for path, row_i, row_v in zip(images, idx.tolist(), vals.tolist()):
        table = Table(title=f"{path} ({name})")
        table.add_column("class", justify="right")
        table.add_column("label")
        table.add_column("probability", justify="right")
        for i, v in zip(row_i, row_v):
            table.add_row(str(i), labels[i] if labels is not None else "-", f"{v:.4f}")
        console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
