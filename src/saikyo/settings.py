"""The one place for defaults. Environment variables SAIKYO_<FIELD> override them; CLI flags override both."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


# The model served when none is named, and where models live unless a flag or SAIKYO_REPOSITORY says
# otherwise. Here, the first layer, so that models/ (the zoo, the repository) and every layer after it
# read the same values.
DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_LOCATION = "model-repository"

BACKENDS = ("auto", "onnxruntime", "openvino", "torch")
PRECISIONS = ("auto", "fp32", "bf16")  # what --precision takes; NAME-int8 is chosen by name


MODEL_CONTROL = ("none", "explicit", "poll")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# The sections of `saikyo serve --help`, in the order it shows them; every setting names one.
PANELS = ("Server", "Models & repository", "Engine", "GPU", "Batching", "Limits", "Auth", "Workers & Ray")


def setting(
    default: Any,
    help: str,
    *,
    panel: str,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    cli: bool = True,
    repr: bool = True,
) -> Any:
    """A Settings field with what `saikyo serve --help` says of it, under `panel`. Every field is a CLI flag
    (named after the field, or `flag`; its variable is SAIKYO_ and the flag's name) unless cli=False:
    secrets never are, since command lines are visible to `ps`. `aliases`: older flags that still work;
    SAIKYO_<FIELD> always works too, so renaming a flag keeps the old flag and variable."""
    if panel not in PANELS:
        raise ValueError(f"unknown settings panel {panel!r}; one of {', '.join(PANELS)}")
    metadata = {"help": help, "panel": panel, "flag": flag, "aliases": aliases, "cli": cli}
    return field(default=default, repr=repr, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    host: str = setting("127.0.0.1", "address to bind", panel="Server")
    port: int = setting(8080, "port to listen on", panel="Server")
    # The first model is the default for requests that name none.
    models: tuple[str, ...] = setting((DEFAULT_MODEL,), "comma-separated models; the first is the default", panel="Models & repository")
    # A directory, or s3://bucket/prefix (credentials from the standard AWS chain, never a setting).
    repository: str = setting(DEFAULT_LOCATION, "model repository: a directory or s3://bucket/prefix", panel="Models & repository")
    s3_endpoint_url: str | None = setting(None, "S3-compatible endpoint for s3:// repositories (SeaweedFS, MinIO, R2, Ceph); default AWS", panel="Models & repository")
    # Versions downloaded from an s3:// repository, keyed by digest and shared by every server on the host.
    model_cache_dir: Path | None = setting(None, "where s3:// downloads are cached; default ~/.cache/saikyo/models", panel="Models & repository")
    model_cache_bytes: int = setting(10 * 1024**3, "cache size; least recently used versions no server holds are evicted", panel="Models & repository")
    # Repository I/O (listings, meta.json, downloads' S3 calls) is bounded and runs on threads of its own,
    # never the request path's: a store that stops answering costs an index row or a load, not inference.
    s3_connect_timeout_s: float = setting(5.0, "s3://: seconds to connect to the store", panel="Models & repository")
    s3_read_timeout_s: float = setting(20.0, "s3://: seconds the store may stay silent within one call", panel="Models & repository")
    s3_max_attempts: int = setting(3, "s3://: tries per S3 call, the first included (botocore's retry budget)", panel="Models & repository")
    repository_threads: int = setting(4, "threads for repository I/O (listings, meta.json), apart from the request path's", panel="Models & repository")
    # botocore's and urllib3's debug lines carry request headers (the access key id, session tokens).
    s3_debug_log: bool = setting(False, "s3://: log botocore/urllib3 at debug too (credentials redacted); else WARNING", panel="Models & repository")
    # none: the models given at start, fixed. explicit: POST /v2/repository/models/{m}/load|unload.
    # poll: explicit, plus every repository_poll_s the served models move to their repository's latest version.
    model_control: str = setting("none", "none | explicit (load/unload endpoints) | poll (explicit + follow new versions)", panel="Models & repository")
    repository_poll_s: float = setting(30.0, "poll: seconds between looks at the repository", panel="Models & repository")
    # Triton's --exit-on-error: a server that cannot serve what it was asked to must not sit unready.
    exit_on_error: bool = setting(True, "exit non-zero when a model given at start cannot load; off: serve the rest", panel="Models & repository")
    backend: str = setting("auto", "auto (the fastest installed for the device: README) | onnxruntime | openvino | torch", panel="Engine")
    # A model's tuning for this CPU model and core count (`saikyo tune`, models/tunings.py) sets its
    # serving options over its meta.json block and these settings; off, those apply as they are.
    tuning: bool = setting(True, "apply each model's tuning for this CPU (saikyo tune) where the repository has one", panel="Engine")
    device: str = setting("auto", "cpu | cuda | auto (CUDA when present)", panel="Engine")
    log_level: str = setting("info", "debug | info | warning", panel="Server")

    intra_op_threads: int = setting(0, "inference threads per model (ONNX Runtime intra-op, OpenVINO); 0 = one per core", panel="Engine")
    decode_threads: int = setting(0, "threads that decode images, shared by all models; 0 = one per core", panel="Engine")
    # How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The runner
    # thread gives the GIL up around every native call and has to wait this long to get it back while
    # the event loop or a decode thread runs Python, so a forward pass of a few ms stretches by several
    # times this. See benchmarks/gil_switch.py.
    gil_switch_interval_ms: float = setting(5.0, "how long a thread may hold the GIL while another waits (Python's default 5)", panel="Engine")
    # Whether ONNX Runtime worker threads spin while waiting for work. Spinning steals the cores that
    # decode threads need between batches, so it is off unless measured to help.
    ort_spinning: bool = setting(False, "ONNX Runtime threads spin while waiting for work", panel="Engine")
    ort_cache_optimized: bool = setting(False, "write ONNX Runtime's optimised graph beside the model and reuse it", panel="Engine")
    # OpenVINO runner (backend "openvino"). auto follows OpenVINO's own default: bf16 on CPUs that compute
    # it natively (AVX512_BF16, AMX), fp32 elsewhere. NAME-int8 runs its quantised layers in int8 either way.
    precision: str = setting("auto", "openvino: auto (bf16 where the CPU has it natively, else fp32) | fp32 | bf16", panel="Engine", flag="--openvino-precision", aliases=("--precision",))
    # Streams split the threads: N batches run at once, each on threads/N cores. On 2 cores one stream
    # was as fast with 8-image requests and faster with 1-image requests (README, "The CPU engines").
    openvino_streams: int = setting(1, "openvino: batches in flight at once (streams), each on its share of the threads", panel="Engine")

    # PyTorch runner (backend "torch").
    torch_dtype: str = setting("auto", "torch: auto (fp16 on CUDA, fp32 on CPU) | fp16 | bf16 | fp32", panel="GPU", flag="--torch-dtype", aliases=("--dtype",))
    # Batch sizes a forward pass runs at on CUDA: a batch pads up to the next one (sizes above
    # max_batch_size dropped, max_batch_size added), so each is captured once as a CUDA graph.
    # Above 64, every 32: a batch of 96 or 160 images (requests of 32) runs as it is instead of padding
    # to 128 or 256, i.e. at most 32 padded rows where powers of two waste up to half the forward pass.
    batch_buckets: tuple[int, ...] = setting(
        (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256),
        "torch: comma-separated batch sizes a forward pass pads up to (CUDA graphs)",
        panel="GPU", flag="--torch-batch-buckets", aliases=("--batch-buckets",),
    )
    cuda_graphs: bool = setting(True, "torch: one CUDA graph per batch bucket", panel="GPU")
    torch_compile: bool = setting(False, "torch: torch.compile before capture (minutes at start)", panel="GPU")
    # Batches launched before the first is back (runtime/torch/pipelining.py): while the GPU runs one, the host
    # stages the next and copies the last one out. Each slot has its own buffers and CUDA graphs.
    torch_in_flight: int = setting(2, "torch: batches in flight on the device at once (CUDA, or padded batches)", panel="GPU")
    # Decode JPEGs on the runner's device (nvJPEG) instead of the CPU pool: auto = when it is CUDA.
    device_decode: str = setting("auto", "torch: decode JPEGs on the GPU (nvJPEG): auto | on | off", panel="GPU", flag="--torch-device-decode", aliases=("--device-decode",))

    # Dynamic batching (one batcher per model).
    max_batch_size: int = setting(16, "largest batch one forward pass runs", panel="Batching")
    max_delay_ms: float = setting(0.0, "how long an idle runner waits for more images", panel="Batching")
    max_queue_images: int = setting(256, "images queued per model before 503", panel="Batching")
    # A forward pass taking longer means its runner hangs: the model is marked failed (readiness false,
    # its requests 503 with the reason) instead of leaving requests waiting for ever.
    batch_timeout_s: float = setting(120.0, "longest a forward pass may take before its model counts as hung", panel="Batching")

    # Request limits.
    max_body_bytes: int = setting(64 * 1024 * 1024, "largest request body; 413", panel="Limits")
    max_images_per_request: int = setting(64, "images in one request; 413", panel="Limits")
    max_image_bytes: int = setting(16 * 1024 * 1024, "largest encoded image; 413", panel="Limits")
    max_image_pixels: int = setting(40_000_000, "width x height, checked before decoding; 400", panel="Limits")  # decompression bombs
    # Decoding cost per request: the sum of width x height over its images, counted from their headers
    # as they are decoded (64 small files each claiming 40 MP would otherwise cost tens of CPU-seconds).
    max_request_pixels: int = setting(256_000_000, "width x height summed over a request's images; 413", panel="Limits")
    # v2 bodies sent with Content-Encoding gzip/deflate: far below max_body_bytes, since a few kB of gzip
    # expand to megabytes.
    max_decompressed_bytes: int = setting(16 * 1024 * 1024, "v2: largest body after gzip/deflate; 413", panel="Limits")
    # The JSON part of a v2 request is parsed in one call that holds the GIL (~10 ms per MB of numbers):
    # larger tensors go as binary data (Triton's binary tensor extension), which needs no parsing.
    max_json_bytes: int = setting(8 * 1024 * 1024, "v2: largest JSON part of a request; 413", panel="Limits")
    # Requests being read, decoded or waiting for inference; one more gets 503 + Retry-After at once.
    # Worst-case memory held by request bodies is about max_concurrent_requests x max_body_bytes.
    max_concurrent_requests: int = setting(128, "requests in flight before 503", panel="Limits")
    # Bytes of request bodies (and their parsed and inflated copies) held at once; one more gets 503 +
    # Retry-After. 0 = half the memory this process may use: its cgroup limit, else the machine's.
    memory_budget_bytes: int = setting(0, "bytes of request bodies held at once; 0 = half the cgroup/machine memory; 503", panel="Limits")
    # A request's head (request line + headers) is refused before it is buffered past this (431), and
    # when it is not complete this long after its first byte (408): a 50 MB header or a slowloris client.
    max_header_bytes: int = setting(64 * 1024, "request line + headers; 431", panel="Limits")
    header_timeout_s: float = setting(10.0, "seconds to receive a request's headers; 408", panel="Limits")
    # A kept-alive connection idle this long is closed. Above the load balancer's idle timeout (ALB: 60 s),
    # else the balancer sends a request down a connection the server is closing and answers 502.
    keep_alive_timeout_s: float = setting(75.0, "seconds an idle kept-alive connection stays open; above the load balancer's", panel="Limits")
    # Connections one process holds open (idle ones too); one more is answered 503 and closed.
    max_connections: int = setting(2048, "open connections per process; one more is answered 503 and closed", panel="Limits")
    # Slow uploads cannot hold a slot forever.
    body_timeout_s: float = setting(60.0, "seconds to receive a body; 408", panel="Limits")
    request_timeout_ms: float = setting(0.0, "deadline for requests without X-Request-Timeout-Ms; 0 = none; 504", panel="Limits")

    # API keys (`Authorization: Bearer <key>`): SAIKYO_API_KEYS (comma-separated) and/or a file with one
    # key per line. No keys = no authentication. Never a CLI flag: command lines are visible to `ps`.
    api_keys: tuple[str, ...] = setting((), "", cli=False, repr=False, panel="Auth")
    api_keys_file: Path | None = setting(None, "API keys, one per line (SAIKYO_API_KEYS works too); no keys = open", panel="Auth")
    # Endpoint groups that stay open when keys are set: any of health, metrics, docs, demo (the page at /;
    # its calls to /classify still need a key).
    public_endpoints: tuple[str, ...] = setting(("health", "metrics", "docs", "demo"), "open without a key: any of health,metrics,docs,demo ('' = none)", panel="Auth")
    # Model control (/v2/repository/*) changes what every client gets: it takes an admin key
    # (SAIKYO_ADMIN_KEYS, comma-separated), never a client key. Admin keys also work as client keys.
    admin_keys: tuple[str, ...] = setting((), "", cli=False, repr=False, panel="Auth")

    # SIGTERM/SIGINT: readiness goes false at once; requests keep being accepted for shutdown_delay_s
    # (so load balancers see it), then the listener closes and in-flight requests get up to
    # drain_timeout_s to finish before the process exits 0.
    shutdown_delay_s: float = setting(0.0, "on SIGTERM, keep serving (not ready) this long first", panel="Server")
    drain_timeout_s: float = setting(30.0, "on SIGTERM, wait this long for requests in flight", panel="Server")

    # Several server processes on one port (scale/workers/supervisor.py), each the whole app with its own runner,
    # batchers and share of the cores. auto: one per core up to 8 on the CPU (separate processes keep
    # the cores busy where one ONNX Runtime run with several threads waits at every operator's barrier),
    # two per GPU when serving on GPUs. The CPU policy is in scale/workers/supervisor.py:auto_workers.
    workers: str = setting(
        "1",
        "server processes on one port, each with its share of the cores: N, or auto = on the CPU one per core "
        "up to 8, on GPUs two per GPU (README: --workers)",
        panel="Workers & Ray",
    )
    # A worker whose event loop stops (SIGSTOP, a deadlock) stops beating; the supervisor replaces it.
    heartbeat_timeout_s: float = setting(5.0, "--workers: a worker silent this long is killed and replaced", panel="Workers & Ray")
    # A load or unload under --workers answers once every worker has applied it, or fails naming the rest.
    control_timeout_s: float = setting(300.0, "--workers: how long a load or unload waits for every worker", panel="Workers & Ray")

    # Scale-out (`--engine ray`): Ray Serve replicas, each running this whole app with its own runner
    # and batchers. See src/saikyo/scale/ray.py.
    engine: str = setting("plain", "plain (this machine's processes, see --workers) | ray (Ray Serve replicas)", panel="Workers & Ray")
    replicas: str = setting("1", "ray: replica count, or auto", panel="Workers & Ray")  # auto: between min and max
    min_replicas: int = setting(1, "ray, auto: fewest replicas", panel="Workers & Ray")
    max_replicas: int = setting(4, "ray, auto: most replicas", panel="Workers & Ray")
    target_ongoing_requests: float = setting(8.0, "ray, auto: requests in flight per replica to scale for", panel="Workers & Ray")
    cpus_per_replica: float = setting(1.0, "ray: CPUs per replica, fractional ok", panel="Workers & Ray")
    gpus_per_replica: float = setting(0.0, "ray: GPUs per replica, e.g. 0.25", panel="Workers & Ray")
    # Ray's default of 5 in-flight requests per replica would cap batches at 5 single-image requests.
    max_ongoing_requests: int = setting(64, "ray: requests one replica takes at once", panel="Workers & Ray")
    max_queued_requests: int = setting(256, "ray: requests waiting for a replica before 503", panel="Workers & Ray")

    def __post_init__(self) -> None:
        if self.torch_in_flight < 1:
            raise ValueError(f"setting 'torch_in_flight' must be at least 1, not {self.torch_in_flight!r}")
        if self.openvino_streams < 1:
            raise ValueError(f"setting 'openvino_streams' must be at least 1, not {self.openvino_streams!r}")
        for name, allowed in (("backend", BACKENDS), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"setting {name!r} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        # A path given as a Path (Settings built in code) is kept as text, like one from a flag.
        object.__setattr__(self, "repository", os.fspath(self.repository))
        if self.model_control not in MODEL_CONTROL:
            raise ValueError(f"setting 'model_control' must be one of {', '.join(MODEL_CONTROL)}, not {self.model_control!r}")
        for name in ("heartbeat_timeout_s", "control_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"setting {name!r} must be a positive number of seconds, not {getattr(self, name)!r}")
        if not self.repository_poll_s > 0:
            raise ValueError(f"setting 'repository_poll_s' must be a positive number of seconds, not {self.repository_poll_s!r}")
        # sys.setswitchinterval refuses what is not positive and finite; say so before serving starts.
        if not 0 < self.gil_switch_interval_ms < 1000:
            raise ValueError(
                "setting 'gil_switch_interval_ms' must be a positive number of milliseconds below 1000, "
                f"not {self.gil_switch_interval_ms!r}"
            )
        if self.s3_endpoint_url is not None:
            parts = urllib.parse.urlsplit(self.s3_endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"setting 's3_endpoint_url' must be a URL with its scheme, such as http://{self.s3_endpoint_url}, "
                    f"not {self.s3_endpoint_url!r}"
                )
        for name in ("s3_connect_timeout_s", "s3_read_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"setting {name!r} must be a positive number of seconds, not {getattr(self, name)!r}")
        for name in ("s3_max_attempts", "repository_threads", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"setting {name!r} must be at least 1, not {getattr(self, name)!r}")
        if self.workers != "auto" and not (self.workers.isdigit() and int(self.workers) >= 1):
            raise ValueError(f"setting 'workers' must be a count of at least 1 or 'auto', not {self.workers!r}")

    @property
    def default_model(self) -> str:
        return self.models[0]

    def resolved_intra_op_threads(self) -> int:
        return self.intra_op_threads or available_cores()

    def resolved_decode_threads(self) -> int:
        return self.decode_threads or available_cores()

    def sized_to(self, threads: int) -> "Settings":
        """These settings for one of several processes sharing the machine, `threads` cores its share:
        inference and decode threads left at 0 (one per core) become `threads`, so the processes
        together run one thread per core instead of each running one per core."""
        return self.with_overrides(
            intra_op_threads=self.intra_op_threads or threads, decode_threads=self.decode_threads or threads
        )

    def with_overrides(self, **overrides: Any) -> "Settings":
        """Apply overrides whose value is not None (unset CLI flags)."""
        clean = {k: _coerce(k, v) for k, v in overrides.items() if v is not None}
        return replace(self, **clean)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        environ = dict(os.environ if environ is None else environ)
        from_env: dict[str, Any] = {}
        for f in fields(cls):
            # The flag's variable wins over the field's own name (the older one, where a flag was renamed).
            for key in reversed(env_names(f)):
                if key in environ:
                    from_env[f.name] = environ[key]
        return cls().with_overrides(**from_env).with_overrides(**overrides)


_TYPES = {f.name: f.type for f in fields(Settings)}


def cli_fields() -> list[Field[Any]]:
    """The settings `saikyo serve` takes as flags, in declaration order."""
    return [f for f in fields(Settings) if f.metadata.get("cli", True)]


def flag_of(f: Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def env_names(f: Field[Any]) -> list[str]:
    """The variables that set `f`: SAIKYO_ and its flag's name first, then SAIKYO_ and the field's name
    (the same unless the flag was renamed, whose old variable keeps working)."""
    names = [f"SAIKYO_{flag_of(f)[2:].replace('-', '_').upper()}", f"SAIKYO_{f.name.upper()}"]
    return list(dict.fromkeys(names))


def setting_source(settings: Settings, name: str, environ: Mapping[str, str]) -> str:
    """Where a setting's value came from, as far as can be told: "default" (the field's), "env" (one of
    its SAIKYO_ variables holds it) or "flag" (set some other way: a flag, or the code that built Settings)."""
    value = getattr(settings, name)
    f = next(f for f in fields(Settings) if f.name == name)
    if value == f.default:
        return "default"
    for key in env_names(f):
        try:
            if key in environ and _coerce(name, environ[key]) == value:
                return "env"
        except ValueError:
            pass
    return "flag"


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
        if not value and name in ("api_keys", "admin_keys"):
            # Present but empty (SAIKYO_API_KEYS="" or ","): a mistake that would silently serve without
            # authentication. Unset the variable to serve without keys.
            raise ValueError(f"setting {name!r} (SAIKYO_{name.upper()}) is set but holds no key; unset it to serve without")
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
    if kind == "str | None":
        return str(value) if value not in (None, "") else None
    if kind == "str" and isinstance(value, os.PathLike):
        return os.fspath(value)
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
    if kind == "str":
        return str(value)
    return value


