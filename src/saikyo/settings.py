"""The one place for defaults. Environment variables SAIKYO_<FIELD> override them; CLI flags override both."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from saikyo import zoo


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # The first model is the default for requests that name none.
    models: tuple[str, ...] = (zoo.DEFAULT_MODEL,)
    repository: Path = Path("model-repository")
    backend: str = "onnxruntime"  # "onnxruntime" | "torch" | "auto"
    device: str = "auto"  # "cpu" | "cuda" | "auto" (CUDA when present)
    log_level: str = "info"

    # Inference threads per model (ONNX Runtime intra-op); 0 = one per core.
    intra_op_threads: int = 0
    # Threads that decode and preprocess images, shared by all models; 0 = one per core.
    decode_threads: int = 0
    # How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The runner
    # thread gives the GIL up around every native call and has to wait this long to get it back while
    # the event loop or a decode thread runs Python, so a forward pass of a few ms stretches by several
    # times this. See benchmarks/gil_switch.py.
    gil_switch_interval_ms: float = 5.0
    # Whether ONNX Runtime worker threads spin while waiting for work. Spinning steals the cores that
    # decode threads need between batches, so it is off unless measured to help.
    ort_spinning: bool = False
    # Write ONNX Runtime's optimised graph beside the model and reuse it on the next start.
    ort_cache_optimized: bool = False

    # PyTorch runner (backend "torch").
    torch_dtype: str = "auto"  # "auto" (fp16 on CUDA, fp32 on CPU) | "fp16" | "bf16" | "fp32"
    # Batch sizes a forward pass runs at on CUDA: a batch pads up to the next one (sizes above
    # max_batch_size dropped, max_batch_size added), so each is captured once as a CUDA graph.
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    cuda_graphs: bool = True
    torch_compile: bool = False  # torch.compile before capture: minutes at start, for a few % more
    # Decode JPEGs on the runner's device (nvJPEG) instead of the CPU pool: auto = when it is CUDA.
    device_decode: str = "auto"  # "auto" | "on" | "off"

    # Dynamic batching (one batcher per model).
    max_batch_size: int = 16
    max_delay_ms: float = 0.0
    max_queue_images: int = 256

    # Request limits.
    max_body_bytes: int = 64 * 1024 * 1024
    max_images_per_request: int = 64
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # refused before decoding: decompression bombs
    # Requests being read, decoded or waiting for inference; one more gets 503 + Retry-After at once.
    # Worst-case memory held by request bodies is about max_concurrent_requests x max_body_bytes.
    max_concurrent_requests: int = 128
    # A body still arriving after this many seconds gets 408: slow uploads cannot hold a slot forever.
    body_timeout_s: float = 60.0
    # Deadline for requests that send no X-Request-Timeout-Ms header; 0 = none. Past it: 504.
    request_timeout_ms: float = 0.0

    # API keys (`Authorization: Bearer <key>`): SAIKYO_API_KEYS (comma-separated) and/or a file with one
    # key per line. No keys = no authentication. Never a CLI flag: command lines are visible to `ps`.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: Path | None = None
    # Endpoint groups that stay open when keys are set: any of health, metrics, docs, demo (the page at /;
    # its calls to /classify still need a key).
    public_endpoints: tuple[str, ...] = ("health", "metrics", "docs", "demo")

    # SIGTERM/SIGINT: readiness goes false at once; requests keep being accepted for shutdown_delay_s
    # (so load balancers see it), then the listener closes and in-flight requests get up to
    # drain_timeout_s to finish before the process exits 0.
    shutdown_delay_s: float = 0.0
    drain_timeout_s: float = 30.0

    # Scale-out (`--engine ray`): Ray Serve replicas, each running this whole app with its own runner
    # and batchers. See src/saikyo/scale/ray.py.
    engine: str = "plain"  # "plain" (one uvicorn process) | "ray"
    replicas: str = "1"  # a count, or "auto": autoscale between min_replicas and max_replicas
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0  # autoscaling keeps about this many requests per replica
    cpus_per_replica: float = 1.0  # fractional is fine: 0.5 puts two replicas on one core
    gpus_per_replica: float = 0.0  # fractional shares one GPU between replicas, e.g. 0.25 = four
    # Ray's default of 5 in-flight requests per replica would cap batches at 5 single-image requests.
    max_ongoing_requests: int = 64
    # Requests waiting for a free replica slot; beyond this Ray answers 503 + Retry-After at once.
    max_queued_requests: int = 256

    def __post_init__(self) -> None:
        # sys.setswitchinterval refuses what is not positive and finite; say so before serving starts.
        if not 0 < self.gil_switch_interval_ms < 1000:
            raise ValueError(
                "setting 'gil_switch_interval_ms' must be a positive number of milliseconds below 1000, "
                f"not {self.gil_switch_interval_ms!r}"
            )

    @property
    def default_model(self) -> str:
        return self.models[0]

    def resolved_intra_op_threads(self) -> int:
        return self.intra_op_threads or available_cores()

    def resolved_decode_threads(self) -> int:
        return self.decode_threads or available_cores()

    def with_overrides(self, **overrides: Any) -> "Settings":
        """Apply overrides whose value is not None (unset CLI flags)."""
        clean = {k: _coerce(k, v) for k, v in overrides.items() if v is not None}
        return replace(self, **clean)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        environ = dict(os.environ if environ is None else environ)
        from_env: dict[str, Any] = {}
        for f in fields(cls):
            key = f"SAIKYO_{f.name.upper()}"
            if key in environ:
                from_env[f.name] = environ[key]
        return cls().with_overrides(**from_env).with_overrides(**overrides)


_TYPES = {f.name: f.type for f in fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    if name not in _TYPES:
        raise ValueError(f"unknown setting {name!r}")
    kind = _TYPES[name]
    if kind == "tuple[str, ...]":
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        value = tuple(value)
        if not value and name == "models":
            raise ValueError(f"setting {name!r} needs at least one value")
        return value
    if kind == "tuple[int, ...]":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        value = tuple(int(v) for v in value)
        if not value or min(value) < 1:
            raise ValueError(f"setting {name!r} needs positive integers, got {value!r}")
        return value
    if kind == "Path":
        return Path(value)
    if kind == "Path | None":
        return Path(value) if value not in (None, "") else None
    if kind == "bool":
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"setting {name!r} must be true or false, not {value!r}")
        return bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return value


