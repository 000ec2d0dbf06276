"""What one model serves with: its effective serving configuration, each value with where it came from,
and the small options object a runner receives instead of all of Settings.

Precedence, highest first: this CPU's tuning ("tuning", models/tunings.py), the version's own
`serving` block in meta.json ("model"), any further layers the caller passes, then the server's
settings ("flag", "env" or "default"). `resolve_serving` is the one place that applies it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saikyo.models.serving import SETTING_OF, ServingConfigError, serving_of
from saikyo.settings import Settings, setting_source


@dataclass(frozen=True)
class RunnerOptions:
    """Everything a runner reads: the model's effective values and the server-wide runner settings."""

    backend: str = "auto"  # auto | onnxruntime | openvino | torch
    device: str = "auto"
    precision: str = "auto"  # openvino: auto | fp32 | bf16
    threads: int = 1  # inference threads, already resolved (never 0)
    streams: int = 1  # openvino
    max_batch_size: int = 16
    ort_spinning: bool = False
    ort_cache_optimized: bool = False
    torch_dtype: str = "auto"
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    cuda_graphs: bool = True
    torch_compile: bool = False
    device_decode: str = "auto"
    in_flight: int = 2  # torch


@dataclass(frozen=True)
class Sourced:
    value: Any
    source: str  # "model", a caller's layer name, or the setting's: "flag" | "env" | "default"


@dataclass(frozen=True)
class ServingConfig:
    """A model's effective serving values (the keys of a `serving` block), each with its source."""

    values: Mapping[str, Sourced]

    def __getitem__(self, key: str) -> Any:
        return self.values[key].value

    @property
    def max_batch_size(self) -> int:
        return int(self["max_batch_size"])

    @property
    def max_delay_ms(self) -> float:
        return float(self["max_delay_ms"])

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """As /v2/models/{m} shows it: {key: {"value": ..., "source": ...}}."""
        return {key: {"value": s.value, "source": s.source} for key, s in self.values.items()}

    def runner_options(self, settings: Settings) -> RunnerOptions:
        """The runner's options: this model's values, and the runner settings no model overrides."""
        # 0 = one per core: this process's share of them (settings.sized_to under --workers).
        threads = int(self["threads"]) or settings.resolved_intra_op_threads()
        return RunnerOptions(
            backend=self["backend"],
            device=settings.device,
            precision=self["precision"],
            threads=threads,
            streams=int(self["streams"]),
            max_batch_size=self.max_batch_size,
            ort_spinning=settings.ort_spinning,
            ort_cache_optimized=settings.ort_cache_optimized,
            torch_dtype=settings.torch_dtype,
            batch_buckets=settings.batch_buckets,
            cuda_graphs=settings.cuda_graphs,
            torch_compile=settings.torch_compile,
            device_decode=settings.device_decode,
            in_flight=int(self["in_flight"]),
        )


def resolve_serving(
    meta: Mapping[str, Any],
    settings: Settings,
    layers: Sequence[tuple[str, Mapping[str, Any]]] = (),
    environ: Mapping[str, str] | None = None,
    where: str = "serving",
    over: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> ServingConfig:
    """The effective serving values of a version whose meta.json is `meta`. `layers` are (source,
    values) pairs checked after the model's own block and before the server's settings; `over` ones
    before the block (this CPU's tuning: a measurement here wins over a value written for any CPU).
    Raises ServingConfigError when the block is unusable or asks for what this server cannot give."""
    environ = os.environ if environ is None else environ
    chain = [*over, ("model", serving_of(dict(meta), where).overrides()), *layers]
    values: dict[str, Sourced] = {}
    for key, name in SETTING_OF.items():
        found = next(((source, layer[key]) for source, layer in chain if key in layer), None)
        if found is not None:
            values[key] = Sourced(found[1], found[0])
        else:
            values[key] = Sourced(getattr(settings, name), setting_source(settings, name, environ))
    config = ServingConfig(values)
    if config.max_batch_size > settings.max_queue_images:
        raise ServingConfigError(
            f"{where}: max_batch_size {config.max_batch_size} is above this server's max_queue_images "
            f"{settings.max_queue_images}: lower it, or start the server with a larger --max-queue-images"
        )
    return config

