"""The `saikyo` command: serve, models, classify (and the cost lab's bench)."""

from __future__ import annotations

import json
import shutil
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from saikyo import zoo
from saikyo.settings import Settings

app = typer.Typer(help="saikyo: image classification inference, fast and measured.", no_args_is_help=True)
models_app = typer.Typer(help="The model zoo and the model repository.", no_args_is_help=True)
app.add_typer(models_app, name="models")

from saikyo.bench.cli import bench_app  # noqa: E402  (light: typer and rich only until a command runs)

app.add_typer(bench_app, name="bench")

console = Console(width=shutil.get_terminal_size((160, 24)).columns)
err = Console(stderr=True)

RepositoryOpt = Annotated[
    Optional[Path], typer.Option("--repository", help="model repository directory [env SAIKYO_REPOSITORY]")
]


def _settings(**overrides: object) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="address to bind [default 127.0.0.1]")] = None,
    port: Annotated[Optional[int], typer.Option(help="port [default 8080]")] = None,
    models: Annotated[Optional[str], typer.Option(help="comma-separated models; the first is the default")] = None,
    backend: Annotated[Optional[str], typer.Option(help="onnxruntime | torch | auto")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda | auto (CUDA when present)")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="torch: auto (fp16 on CUDA) | fp16 | bf16 | fp32")] = None,
    cuda_graphs: Annotated[
        Optional[bool], typer.Option("--cuda-graphs/--no-cuda-graphs", help="torch: one CUDA graph per batch bucket")
    ] = None,
    device_decode: Annotated[
        Optional[str], typer.Option(help="torch: decode JPEGs on the GPU (nvJPEG): auto | on | off")
    ] = None,
    repository: RepositoryOpt = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help="largest batch one forward pass runs")] = None,
    max_delay_ms: Annotated[Optional[float], typer.Option(help="how long an idle runner waits for more images")] = None,
    max_queue_images: Annotated[Optional[int], typer.Option(help="images queued per model before 503")] = None,
    intra_op_threads: Annotated[Optional[int], typer.Option(help="inference threads per model; 0 = cores")] = None,
    decode_threads: Annotated[Optional[int], typer.Option(help="decode threads; 0 = cores")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug | info | warning")] = None,
    engine: Annotated[Optional[str], typer.Option(help="plain (one process) | ray (Ray Serve replicas)")] = None,
    replicas: Annotated[Optional[str], typer.Option(help="ray: replica count, or auto [default 1]")] = None,
    min_replicas: Annotated[Optional[int], typer.Option(help="ray, auto: fewest replicas")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="ray, auto: most replicas")] = None,
    target_ongoing_requests: Annotated[
        Optional[float], typer.Option(help="ray, auto: requests in flight per replica to scale for")
    ] = None,
    cpus_per_replica: Annotated[Optional[float], typer.Option(help="ray: CPUs per replica, fractional ok")] = None,
    gpus_per_replica: Annotated[Optional[float], typer.Option(help="ray: GPUs per replica, e.g. 0.25")] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option(help="largest request body [64 MiB]; 413")] = None,
    max_images_per_request: Annotated[Optional[int], typer.Option(help="images in one request [64]; 413")] = None,
    max_image_bytes: Annotated[Optional[int], typer.Option(help="largest encoded image [16 MiB]; 413")] = None,
    max_image_pixels: Annotated[
        Optional[int], typer.Option(help="width x height, checked before decoding [40M]; 400")
    ] = None,
    max_concurrent_requests: Annotated[Optional[int], typer.Option(help="requests in flight before 503 [128]")] = None,
    body_timeout_s: Annotated[Optional[float], typer.Option(help="seconds to receive a body [60]; 408")] = None,
    request_timeout_ms: Annotated[
        Optional[float], typer.Option(help="deadline for requests without X-Request-Timeout-Ms; 0 = none; 504")
    ] = None,
    api_keys_file: Annotated[
        Optional[Path], typer.Option(help="API keys, one per line [env SAIKYO_API_KEYS too]; no keys = open")
    ] = None,
    public_endpoints: Annotated[
        Optional[str], typer.Option(help="open without a key: any of health,metrics,docs,demo ('' = none)")
    ] = None,
    shutdown_delay_s: Annotated[
        Optional[float], typer.Option(help="on SIGTERM, keep serving (not ready) this long first [0]")
    ] = None,
    drain_timeout_s: Annotated[
        Optional[float], typer.Option(help="on SIGTERM, wait this long for requests in flight [30]")
    ] = None,
) -> None:
    """Start the HTTP server (the 2018 /classify API and Open Inference Protocol v2)."""
    from saikyo.server import create_app

    settings = _settings(
        host=host,
        port=port,
        models=models,
        backend=backend,
        device=device,
        torch_dtype=dtype,
        cuda_graphs=cuda_graphs,
        device_decode=device_decode,
        repository=repository,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        max_queue_images=max_queue_images,
        intra_op_threads=intra_op_threads,
        decode_threads=decode_threads,
        log_level=log_level,
        engine=engine,
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests,
        cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica,
        max_body_bytes=max_body_bytes,
        max_images_per_request=max_images_per_request,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
        max_concurrent_requests=max_concurrent_requests,
        body_timeout_s=body_timeout_s,
        request_timeout_ms=request_timeout_ms,
        api_keys_file=api_keys_file,
        public_endpoints=public_endpoints,
        shutdown_delay_s=shutdown_delay_s,
        drain_timeout_s=drain_timeout_s,
    )
    from saikyo.repository import ModelRepository

    repo = ModelRepository(settings.repository)
    for name in settings.models:
        # Repository entries describe themselves, so models outside the zoo serve too.
        if zoo.base_name(name) not in zoo.ZOO and not repo.has(name):
            err.print(f"[red]error:[/] {zoo.UnknownModel(name)} (and not in the repository {settings.repository})")
            raise typer.Exit(2)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if settings.engine == "ray":
        _serve_on_ray(settings)
        return
    if settings.engine != "plain":
        err.print(f"[red]error:[/] unknown engine {settings.engine!r}; choose plain or ray")
        raise typer.Exit(2)
    from saikyo.server.auth import AuthConfigError
    from saikyo.server.shutdown import serve as serve_draining

    try:
        server_app = create_app(settings)
    except AuthConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    # SIGTERM: readiness false, drain in-flight requests, exit 0 (server/shutdown.py).
    serve_draining(server_app, settings)


def _serve_on_ray(settings: Settings) -> None:
    import importlib.util

    # Only looked up, not imported: Ray reads some loopback switches at import time.
    if importlib.util.find_spec("ray") is None:
        err.print("[red]error:[/] --engine ray needs Ray Serve: pip install 'saikyo[ray]'")
        raise typer.Exit(2)
    from saikyo.scale.ray import deployment_options, serve_on_ray

    try:
        deployment_options(settings)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    try:
        serve_on_ray(settings)
    except ValueError as exc:  # replicas that do not fit this machine
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


@models_app.command("list")
def models_list(
    repository: RepositoryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every zoo model and variant: exported or not, weights, size."""
    from saikyo.export import list_models
    from saikyo.repository import ModelRepository

    settings = _settings(repository=repository)
    rows = list_models(ModelRepository(settings.repository))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"model zoo (repository: {settings.repository})")
    for col in ("name", "family", "input", "exported", "weights", "size MB", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            r["family"],
            str(r["input_size"]),
            "yes" if r["exported"] else "no",
            r.get("weights") or "-",
            f"{r['size_mb']:.1f}" if r.get("size_mb") else "-",
            r.get("description", ""),
        )
    console.print(table)


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
    from saikyo.repository import ModelRepository

    settings = _settings(repository=repository)
    repo = ModelRepository(settings.repository)
    try:
        zoo.get(name)
    except zoo.UnknownModel as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    target = f"{name}-{quantize}" if quantize else name
    if if_missing and repo.has(target):
        err.print(f"{target} is already exported in {settings.repository}")
        return
    if quantize not in (None, "int8"):
        err.print(f"[red]error:[/] unknown quantisation {quantize!r}; supported: int8")
        raise typer.Exit(2)
    try:
        from saikyo.export import ExportError, export_model
    except ImportError as exc:
        err.print(f"[red]error:[/] exporting needs torch: pip install 'saikyo[export]' ({exc})")
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
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"exported {entry.name} -> {entry.path} ({entry.size_bytes / 1e6:.1f} MB, weights {entry.meta.get('weights')})")


@models_app.command("info")
def models_info(name: str, repository: RepositoryOpt = None) -> None:
    """The zoo entry and, if exported, the repository's meta.json."""
    from saikyo.repository import ModelRepository

    settings = _settings(repository=repository)
    try:
        spec = zoo.get(name)
    except zoo.UnknownModel as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    repo = ModelRepository(settings.repository)
    info = {"zoo": spec.to_dict(), "exported": repo.has(name)}
    if repo.has(name):
        info["meta"] = repo.get(name).meta
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

    from saikyo import imaging
    from saikyo import labels as imagenet_labels
    from saikyo.predictions import top_k
    from saikyo.repository import ModelNotExported
    from saikyo.runtime import RunnerError, create_runner

    name = model or zoo.DEFAULT_MODEL
    settings = _settings(repository=repository, models=name)
    try:
        runner = create_runner(name, settings)
    except (ModelNotExported, RunnerError, zoo.UnknownModel) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    pixels = []
    for path in images:
        try:
            pixels.append(imaging.decode(path.read_bytes(), runner.preprocessing))
        except imaging.ImageError as exc:
            err.print(f"[red]error:[/] {path}: {exc}")
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
            table.add_row(str(i), imagenet_labels.name(i), f"{v:.4f}")
        console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
