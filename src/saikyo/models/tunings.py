"""Tunings: what `saikyo tune` measured to be the fastest accurate way to serve a model on one CPU.

They live beside the model's versions, one file per CPU model and core count, so that one repository
holds the tunings of several instance types:

    <root>/<name>/tunings/<cpu-slug>-<N>core.json

Listings never see them as versions (a version directory is a number). `serve` applies the tuning of
its own CPU only; tunings for other CPUs are ignored, and the log says so.

Precedence of each serving option, highest first: the tuning for this CPU, the version's own `serving`
block (written for any CPU), the server's flags, SAIKYO_* variables and defaults (settings for every
model). A measurement here wins over a value written for any CPU, as the block wins over the server's
settings; `--no-tuning` serves without tunings (runtime/options.py:resolve_serving applies the chain).

The file is read as hostile input: size-capped, known keys only, exact types, bounded values.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from saikyo.models.errors import RepositoryError
from saikyo.models.serving import parse_serving
from saikyo.models.zoo import precision_of

SCHEMA = "saikyo.tuning/1"
TUNINGS_DIR = "tunings"
MAX_TUNING_BYTES = 64 * 1024
MAX_TUNING_FILES = 256  # listed per model; more are ignored (a listing stays bounded)


def cpu_slug(cpu_model: str, cores: int) -> str:
    """File stem naming a CPU model and core count: "amd-epyc-7b13-2core"."""
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model.lower()).strip("-")[:100] or "unknown-cpu"
    return f"{slug}-{cores}core"


def file_name(cpu_model: str, cores: int) -> str:
    return f"{cpu_slug(cpu_model, cores)}.json"


@dataclass(frozen=True)
class Tuning:
    model: str
    cpu_model: str
    cores: int
    tuned_at: str  # ISO 8601, UTC
    serving: dict[str, Any]  # a `serving` block (models/serving.py): what serve applies
    images_per_request: int
    p99_ms: float
    capacity_images_per_s: float
    kimg_per_usd: float | None = None
    agreement: float | None = None  # top-1 agreement with fp32 of the chosen precision (None: fp32)
    version: int | None = None  # the version measured
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. an int8 variant that would be faster

    @property
    def choice(self) -> str:
        """'openvino bf16, max batch 16, delay 2 ms, 2 streams'; NAME-int8's 'openvino int8, ...' (its block
        asks the engine for fp32: the precision of the layers the file leaves in float)."""
        s = self.serving
        precision = "int8" if precision_of(self.model) == "int8" else s.get("precision", "fp32")
        parts = [f"{s.get('backend', '?')} {precision}"]
        if "max_batch_size" in s:
            parts.append(f"max batch {s['max_batch_size']}")
        if "max_delay_ms" in s:
            parts.append(f"delay {s['max_delay_ms']:g} ms")
        if s.get("streams", 1) != 1:
            parts.append(f"{s['streams']} streams")
        if s.get("threads"):
            parts.append(f"{s['threads']} threads")
        return ", ".join(parts)

    def describe(self) -> str:
        """The line the start-up log and /v2/models/{m} show."""
        day = self.tuned_at[:10]
        agreed = f" (top-1 agreement with fp32 {self.agreement:.1%})" if self.agreement is not None else ""
        return (
            f"tuned on {self.cpu_model} ({self.cores} cores) at {day}: {self.choice}{agreed}, "
            f"{self.capacity_images_per_s:.1f} img/s at p99 <= {self.p99_ms:g} ms "
            f"({self.images_per_request} image(s) per request)"
        )

    def to_json(self) -> bytes:
        return (json.dumps({"schema": SCHEMA, **asdict(self)}, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> "Tuning":
        """Parse and check a tuning file; RepositoryError naming `where` and the problem otherwise."""
        if len(raw) > MAX_TUNING_BYTES:
            raise RepositoryError(f"{where}: over {MAX_TUNING_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise RepositoryError(f"{where}: not JSON") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise RepositoryError(f"{where}: not a tuning (schema {SCHEMA!r} expected)")

        def need(key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
            value = data.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise RepositoryError(f"{where}: {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
            return value

        number = (int, float)
        tuning = cls(
            model=need("model", str),
            cpu_model=need("cpu_model", str),
            cores=need("cores", int),
            tuned_at=need("tuned_at", str),
            # The keys and checks of a version's `serving` block (models/serving.py).
            serving=parse_serving(need("serving", dict), f"{where}: serving").overrides(),
            images_per_request=need("images_per_request", int),
            p99_ms=float(need("p99_ms", number)),
            capacity_images_per_s=float(need("capacity_images_per_s", number)),
            kimg_per_usd=need("kimg_per_usd", number, optional=True),
            agreement=need("agreement", number, optional=True),
            version=need("version", int, optional=True),
            extra=need("extra", dict, optional=True) or {},
        )
        for key in ("cpu_model", "tuned_at", "model"):
            if len(getattr(tuning, key)) > 200:
                raise RepositoryError(f"{where}: {key!r} is over 200 characters")
        if not all(math.isfinite(x) and x >= 0 for x in (tuning.p99_ms, tuning.capacity_images_per_s)):
            raise RepositoryError(f"{where}: p99_ms and capacity_images_per_s must be finite and not negative")
        return tuning


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Found:
    """What a repository holds for one model on one CPU."""

    tuning: Tuning | None  # the tuning for this CPU, None when there is none (or it is unusable)
    others: tuple[str, ...] = ()  # tuning files for other CPUs: ignored
    problem: str | None = None  # why this CPU's file was not used


def find(repository: Any, name: str, cpu_model: str, cores: int) -> Found:
    """The tuning of `name` for this CPU in `repository` (a models.repository.Repository). Never raises for
    a bad file: an unusable tuning is reported in `problem` and serving goes on untuned."""
    mine = file_name(cpu_model, cores)
    try:
        files = repository.tuning_files(name)
        others = tuple(f for f in files if f != mine)
        if mine not in files:
            return Found(None, others)
        raw = repository.read_tuning(name, mine)
        if raw is None:
            return Found(None, others)
        tuning = Tuning.from_json(raw, f"{name}/{TUNINGS_DIR}/{mine}")
    except RepositoryError as exc:
        return Found(None, (), str(exc))
    if (tuning.cpu_model, tuning.cores) != (cpu_model, cores):
        # Two CPU names with one slug: the file is another CPU's.
        return Found(None, others + (mine,))
    return Found(tuning, others)
