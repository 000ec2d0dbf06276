"""The capacity plan: which measured configuration carries Q requests/s within a p99 budget, cheapest.

For each configuration (model, images per request, backend, device, max batch size, instance type,
machine) its capacity within the budget comes from, in this order:

    searched  a capacity search's record (`saikyo bench capacity`) whose p99 target is within the budget:
              the highest Poisson rate that met that target, found for the purpose;
    levels    else the load levels it was measured at (seed, closed-loop concurrency, open-loop rate):
              a level is feasible when its measured p99 is within the budget and its error rate within
              the allowance; the capacity is the highest request rate among the feasible levels.

Each instance is then planned at `headroom` x that capacity (default 70%: room for bursts and for
the latency at a lower load being no worse than the one measured), so

    instances = ceil(Q / (capacity x headroom)),   monthly cost = instances x $/h x 730 h.

Q is in requests per second of `images_per_request` images each (default 1): only configurations
measured at that size answer (None: every size, each for requests of its own size). `min_top1` keeps
the networks whose published top-1 (for their named weights; an int8 variant is judged by its fp32
weights', its agreement with fp32 shown beside) is at least that many percent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from saikyo.bench.cost import DEFAULT_HEADROOM, HOURS_PER_MONTH, instances_needed, monthly_cost


@dataclass(frozen=True)
class Option:
    model: str
    family: str
    images_per_request: int
    instance_type: str
    backend: str
    device: str
    precision: str
    max_batch_size: int | None
    workers: int  # server processes
    load: str  # what sets the capacity: a level ("seed", "c=4", "20/s") or "searched p99<=100ms"
    p99_ms: float
    capacity_rps: float  # measured requests/s at that level
    planned_rps: float  # capacity x headroom: what one instance is planned to carry
    instances: int
    price_per_hour: float
    monthly_cost: float
    hardware: str
    basis: str = "levels"  # "searched" (a capacity search) | "levels" (the best measured level)
    published_top1: float | None = None  # for the named weights; int8: its fp32 weights'
    top1_agreement_with_fp32: float | None = None  # int8 only
    speed_only: bool | None = None  # measured on other weights than the named ones
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "record"}
        d["monthly_cost"] = round(self.monthly_cost, 2)
        d["planned_rps"] = round(self.planned_rps, 3)
        return d


@dataclass
class Recommendation:
    options: list[Option]  # feasible, cheapest first
    p99_ms: float
    qps: float
    headroom: float
    hours_per_month: float
    rejected: list[str]  # configurations with no feasible level, and why (best p99 seen)


def _load_label(r: dict[str, Any]) -> str:
    if r["mode"] == "closed":
        return f"c={r['concurrency']}"
    if r["mode"] == "open":
        return f"{r['rate']:g}/s"
    return "seed"


def _config_key(r: dict[str, Any]) -> tuple:
    return (
        r["model"], int(r["images_per_request"]), r.get("instance_type"), r.get("backend"),
        r.get("device"), r.get("precision"), r.get("max_batch_size"), r.get("workers") or 1, r.get("hardware"),
    )  # fmt: skip


def recommend(
    records: Iterable[dict[str, Any]],
    p99_ms: float,
    qps: float,
    headroom: float = DEFAULT_HEADROOM,
    images_per_request: int | None = 1,
    models: Sequence[str] | None = None,
    max_error_rate: float = 0.0,
    hours_per_month: float = HOURS_PER_MONTH,
    min_top1: float | None = None,
) -> Recommendation:
    if p99_ms <= 0 or qps <= 0:
        raise ValueError("the p99 budget and the request rate must be positive")
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], not {headroom}")
    if min_top1 is not None and not 0 <= min_top1 <= 100:
        raise ValueError(f"--min-top1 is a percentage in [0, 100], not {min_top1}")
    configs: dict[tuple, list[dict[str, Any]]] = {}
    too_inaccurate: dict[str, str] = {}
    for r in records:
        if r.get("price_per_hour") is None or not r.get("ok") or r.get("latency_p99_ms") is None:
            continue
        if images_per_request is not None and int(r["images_per_request"]) != images_per_request:
            continue
        if models and r["model"] not in models:
            continue
        top1 = r.get("published_top1")
        if min_top1 is not None and (top1 is None or top1 < min_top1):
            too_inaccurate[r["model"]] = (
                f"{r['model']}: published top-1 {top1:g}% < {min_top1:g}%" if top1 is not None
                else f"{r['model']}: no published top-1 (not a zoo network)"
            )
            continue
        configs.setdefault(_config_key(r), []).append(r)

    options: list[Option] = []
    rejected: list[str] = list(too_inaccurate.values())
    for key, rs in configs.items():
        searched = [
            r for r in rs
            if r.get("search") == "capacity" and r.get("capacity_rate") and r.get("p99_target_ms") is not None
            and r["p99_target_ms"] <= p99_ms and r["errors"] / max(r["requests"], 1) <= max_error_rate
        ]  # fmt: skip
        if searched:
            top = max(searched, key=lambda r: r["capacity_rate"])
            options.append(_option(top, float(top["capacity_rate"]), f"searched p99<={top['p99_target_ms']:g}ms",
                                   "searched", qps, headroom, hours_per_month))  # fmt: skip
            continue
        feasible = [
            r for r in rs
            if r["latency_p99_ms"] <= p99_ms and r["errors"] / max(r["requests"], 1) <= max_error_rate
        ]  # fmt: skip
        if not feasible:
            best = min(rs, key=lambda r: r["latency_p99_ms"])
            why = (
                f"best p99 {best['latency_p99_ms']:.1f} ms ({_load_label(best)}) > {p99_ms:g} ms"
                if best["latency_p99_ms"] > p99_ms
                else f"every level within {p99_ms:g} ms had errors over {max_error_rate:.1%}"
            )
            rejected.append(f"{key[0]} bs={key[1]} {key[2]}: {why}")
            continue
        top = max(feasible, key=lambda r: r["requests_per_s"])
        options.append(
            _option(top, float(top["requests_per_s"]), _load_label(top), "levels", qps, headroom, hours_per_month)
        )
    options.sort(key=lambda o: (o.monthly_cost, o.p99_ms, o.model))
    return Recommendation(options, p99_ms, qps, headroom, hours_per_month, sorted(rejected))


def _option(
    top: dict[str, Any], capacity: float, load: str, basis: str, qps: float, headroom: float, hours_per_month: float
) -> Option:
    n = instances_needed(qps, capacity, headroom)
    price = float(top["price_per_hour"])
    return Option(
        model=top["model"],
        family=top.get("family") or top["model"],
        images_per_request=int(top["images_per_request"]),
        instance_type=str(top.get("instance_type")),
        backend=str(top.get("backend")),
        device=str(top.get("device")),
        precision=str(top.get("precision") or "fp32"),
        max_batch_size=top.get("max_batch_size"),
        workers=int(top.get("workers") or 1),
        load=load,
        p99_ms=float(top["latency_p99_ms"]),
        capacity_rps=capacity,
        planned_rps=capacity * headroom,
        instances=n,
        price_per_hour=price,
        monthly_cost=monthly_cost(n, price, hours_per_month),
        hardware=str(top.get("hardware")),
        basis=basis,
        published_top1=top.get("published_top1"),
        top1_agreement_with_fp32=top.get("top1_agreement_with_fp32"),
        speed_only=top.get("speed_only"),
        record=top,
    )
