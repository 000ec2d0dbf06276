"""Instance prices and the cost arithmetic.

Cost performance is the 2018 study's metric: thousand images classified per dollar of instance time,
    images/s x 3600 s/h / ($/h) / 1000.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

HOURS_PER_MONTH = 730.0  # AWS's convention: 365 days x 24 h / 12
DEFAULT_HEADROOM = 0.7  # plan each instance at this fraction of its measured throughput


def cost_performance(images_per_s: float, price_per_hour: float) -> float:
    """Thousand images per dollar."""
    if price_per_hour <= 0:
        raise ValueError(f"price per hour must be positive, not {price_per_hour}")
    return images_per_s * 3600.0 / price_per_hour / 1000.0


def instances_needed(demand_rps: float, capacity_rps: float, headroom: float = DEFAULT_HEADROOM) -> int:
    """Instances that carry `demand_rps` when each is planned at `headroom` x its measured capacity."""
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], not {headroom}")
    if capacity_rps <= 0:
        raise ValueError("capacity must be positive")
    if demand_rps <= 0:
        raise ValueError("demand must be positive")
    # Round before ceil so that 3.0000000000000004 instances stays 3.
    return max(1, math.ceil(round(demand_rps / (capacity_rps * headroom), 9)))


def monthly_cost(instances: int, price_per_hour: float, hours: float = HOURS_PER_MONTH) -> float:
    return instances * price_per_hour * hours


@dataclass(frozen=True)
class InstancePrice:
    name: str
    price_per_hour: float
    vcpus: int | None = None
    memory_gib: float | None = None
    accelerator: str = ""
    region: str = ""
    as_of: str = ""
    source: str = ""

    def describe_source(self) -> str:
        parts = [self.source or "price table", self.region, f"as of {self.as_of}" if self.as_of else ""]
        return ", ".join(p for p in parts if p)


class UnknownInstanceType(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return (
            f"no price for instance type {self.name!r}; known: {', '.join(self.known)} "
            "(or pass --price-per-hour, or a --prices file)"
        )


class PriceTable:
    def __init__(self, rows: dict[str, InstancePrice]) -> None:
        self.rows = rows

    def __contains__(self, name: str) -> bool:
        return name in self.rows

    def get(self, name: str) -> InstancePrice:
        try:
            return self.rows[name]
        except KeyError:
            raise UnknownInstanceType(name, sorted(self.rows)) from None

    def names(self) -> list[str]:
        return list(self.rows)


def bundled_prices_text() -> str:
    return resources.files("saikyo.bench").joinpath("prices.toml").read_text()


def load_prices(user_file: Path | None = None) -> PriceTable:
    """The bundled table, with a user file's rows merged over it (field by field, meta per file)."""
    rows = _rows(tomllib.loads(bundled_prices_text()))
    if user_file is not None:
        try:
            data = tomllib.loads(Path(user_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read price file {user_file}: {exc}") from None
        for name, row in _rows(data, defaults_from=rows).items():
            rows[name] = row
    return PriceTable(rows)


def _rows(data: dict[str, Any], defaults_from: dict[str, InstancePrice] | None = None) -> dict[str, InstancePrice]:
    meta = data.get("meta", {})
    out: dict[str, InstancePrice] = {}
    for name, raw in data.get("instances", {}).items():
        base = (defaults_from or {}).get(name)
        merged: dict[str, Any] = {}
        if base is not None:
            merged = {k: getattr(base, k) for k in ("price_per_hour", "vcpus", "memory_gib", "accelerator")}
        # A file's meta (region, date, source) describes its own figures.
        merged.update({k: meta[k] for k in ("region", "as_of", "source") if k in meta})
        merged.update(raw)
        if "price_per_hour" not in merged:
            raise ValueError(f"instance type {name!r} has no price_per_hour")
        out[name] = InstancePrice(
            name=name,
            price_per_hour=float(merged["price_per_hour"]),
            vcpus=int(merged["vcpus"]) if merged.get("vcpus") is not None else None,
            memory_gib=float(merged["memory_gib"]) if merged.get("memory_gib") is not None else None,
            accelerator=str(merged.get("accelerator", "")),
            region=str(merged.get("region", "")),
            as_of=str(merged.get("as_of", "")),
            source=str(merged.get("source", "")),
        )
    return out


@dataclass(frozen=True)
class Pricing:
    """What a record says about money: which instance the measurement stands for and what it costs."""

    instance_type: str | None
    price_per_hour: float | None
    source: str

    def cost_performance(self, images_per_s: float) -> float | None:
        if self.price_per_hour is None:
            return None
        return cost_performance(images_per_s, self.price_per_hour)


def resolve_pricing(
    instance_type: str | None, price_per_hour: float | None = None, prices_file: Path | None = None
) -> Pricing:
    """--price-per-hour wins; otherwise the instance type's row; neither: no cost figures."""
    if price_per_hour is not None:
        if price_per_hour <= 0:
            raise ValueError(f"price per hour must be positive, not {price_per_hour}")
        return Pricing(instance_type or "custom", price_per_hour, "--price-per-hour")
    if instance_type is None:
        return Pricing(None, None, "none: pass --instance-type or --price-per-hour")
    row = load_prices(prices_file).get(instance_type)
    return Pricing(instance_type, row.price_per_hour, row.describe_source())


# Compute-optimised Intel instances by vCPU count: what a CPU-only machine of this size rents as.
_C7I_BY_VCPUS = {2: "c7i.large", 4: "c7i.xlarge", 8: "c7i.2xlarge", 16: "c7i.4xlarge"}


def default_instance_type(vcpus: int) -> str:
    """The c7i size with at least this many vCPUs (c7i.large for a 2-core machine)."""
    for n, name in sorted(_C7I_BY_VCPUS.items()):
        if vcpus <= n:
            return name
    return _C7I_BY_VCPUS[16]
