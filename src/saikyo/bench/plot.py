"""The 2018 figure, accuracy against images per dollar, and the throughput-vs-p99 curves, from records.

The 2018 figure: x = processing time per request (mean response time of the seed method, ms, log
scale), y = cost performance (thousand images per dollar); one point per (network, images per
request, hardware), colour = network family, marker = hardware (instance type; with the device
where one instance type was measured on its CPU and its GPU). Where several
server settings measured the same point (e.g. max batch sizes), the one with the best cost
performance stands for it. The Pareto frontier joins the points nothing beats on both axes.

Accuracy against images per dollar: y = the published ImageNet-1k top-1 of the weights the zoo names
(records' `published_top1`; not measured here), x = the 2018 cost performance, the best of the
network's points on that hardware (so the figure's x values are the 2018 figure's). int8 variants are
drawn hollow at their fp32 weights' top-1, which is all that is published; their agreement with fp32
is in the label. The frontier joins the points no other beats on both accuracy and images per dollar.

Everything plotted is returned as data (`CostPoint`, `AccuracyPoint`, `Curve`), so tests check numbers,
not pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from saikyo.models import zoo

FAMILY_COLOURS = {
    "CaffeNet": "#8c564b",
    "SqueezeNet": "#2ca02c",
    "ResNet": "#1f77b4",
    "ResNeXt": "#d62728",
    "EfficientNet": "#ff7f0e",
}
_SPARE_COLOURS = ["#9467bd", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


@dataclass(frozen=True)
class CostPoint:
    label: str  # "ResNet, bs=1, c7i.large"
    network: str  # the family when it has one model here, else the model name
    model: str
    family: str
    images_per_request: int
    hardware: str  # instance type, "+ device" where one instance type ran on several devices
    time_ms: float  # mean processing time per request
    cost_performance: float  # thousand images per dollar
    images_per_s: float
    pareto: bool = False
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class AccuracyPoint:
    label: str  # the cost point's label: "ResNet int8, bs=8, c7i.large"
    model: str
    family: str
    precision: str
    hardware: str
    top1: float  # published, for the named (fp32) weights
    cost_performance: float  # thousand images per dollar: the best 2018 point of this network here
    agreement: float | None  # int8: top-1 agreement with fp32
    speed_only: bool  # the run served other weights than the named ones
    pareto: bool = False
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class CurvePoint:
    images_per_s: float
    p99_ms: float
    load: str  # "c=4" or "12/s"


@dataclass(frozen=True)
class Curve:
    label: str
    model: str
    family: str
    images_per_request: int
    precision: str
    points: tuple[CurvePoint, ...]


@dataclass
class PlotResult:
    cost_points: list[CostPoint]
    curves: list[Curve]
    files: list[Path]
    notes: list[str] = field(default_factory=list)
    accuracy_points: list[AccuracyPoint] = field(default_factory=list)

    def file(self, stem: str) -> Path | None:
        """The SVG whose name ends in `stem` ("cost", "accuracy", "throughput-p99"), if drawn."""
        return next((f for f in self.files if f.suffix == ".svg" and f.stem.endswith(stem)), None)


def _usable(r: dict[str, Any]) -> bool:
    return bool(r.get("ok")) and r.get("latency_mean_ms") is not None


def cost_points(records: Iterable[dict[str, Any]]) -> list[CostPoint]:
    """One point per (model, images per request, hardware) from seed-mode records with a price.

    Hardware is the instance type, or "instance device" (e.g. "g5.xlarge cuda") where one instance
    type was measured on several devices: its CPU and its GPU are two hardware choices at one price.
    """
    usable = [
        r for r in records
        if r.get("mode") == "seed" and _usable(r) and r.get("cost_performance_kimg_per_usd") is not None
    ]  # fmt: skip
    devices: dict[str, set[str]] = {}
    for r in usable:
        devices.setdefault(str(r.get("instance_type")), set()).add(str(r.get("device")))

    def hardware_of(r: dict[str, Any]) -> str:
        instance = str(r.get("instance_type"))
        return f"{instance} {r.get('device')}" if len(devices[instance]) > 1 else instance

    best: dict[tuple[str, int, str], dict[str, Any]] = {}
    for r in usable:
        key = (r["model"], int(r["images_per_request"]), hardware_of(r))
        if key not in best or r["cost_performance_kimg_per_usd"] > best[key]["cost_performance_kimg_per_usd"]:
            best[key] = r
    # Name a point by its family ("ResNet", as in 2018) when the family has one network here, else by model.
    bases_by_family: dict[str, set[str]] = {}
    for r in best.values():
        bases_by_family.setdefault(r.get("family") or r["model"], set()).add(zoo.base_name(r["model"]))
    points = []
    for (model, n, hw), r in best.items():
        family = r.get("family") or model
        if len(bases_by_family[family]) == 1:
            variant = zoo.split_variant(model)[1]  # "int8" for "resnet50-int8"
            network = f"{family} {variant}" if variant else family
        else:
            network = model
        points.append(
            CostPoint(
                label=f"{network}, bs={n}, {hw}",
                network=network,
                model=model,
                family=family,
                images_per_request=n,
                hardware=hw,
                time_ms=float(r["latency_mean_ms"]),
                cost_performance=float(r["cost_performance_kimg_per_usd"]),
                images_per_s=float(r["images_per_s"]),
                record=r,
            )
        )
    front = {id(p) for p in pareto_front(points)}
    points = [replace(p, pareto=id(p) in front) for p in points]
    return sorted(points, key=lambda p: (p.family, p.model, p.hardware, p.images_per_request))


def pareto_front(points: Sequence[CostPoint]) -> list[CostPoint]:
    """Points no other point beats on both axes (faster and cheaper per image), fastest first."""
    front: list[CostPoint] = []
    best_y = float("-inf")
    for p in sorted(points, key=lambda p: (p.time_ms, -p.cost_performance)):
        if p.cost_performance > best_y:
            front.append(p)
            best_y = p.cost_performance
    return front


def accuracy_points(points: Sequence[CostPoint]) -> list[AccuracyPoint]:
    """One point per (model, hardware) with a published top-1: its best 2018 cost point."""
    best: dict[tuple[str, str], CostPoint] = {}
    for p in points:
        if p.record.get("published_top1") is None:
            continue
        key = (p.model, p.hardware)
        if key not in best or p.cost_performance > best[key].cost_performance:
            best[key] = p
    out = [
        AccuracyPoint(
            label=p.label,
            model=p.model,
            family=p.family,
            precision=str(p.record.get("precision") or zoo.precision_of(p.model)),
            hardware=p.hardware,
            top1=float(p.record["published_top1"]),
            cost_performance=p.cost_performance,
            agreement=p.record.get("top1_agreement_with_fp32"),
            speed_only=bool(p.record.get("speed_only")),
            record=p.record,
        )
        for p in best.values()
    ]
    front = {id(p) for p in accuracy_front(out)}
    out = [replace(p, pareto=id(p) in front) for p in out]
    return sorted(out, key=lambda p: (-p.top1, -p.cost_performance))


def accuracy_front(points: Sequence[AccuracyPoint]) -> list[AccuracyPoint]:
    """Points no other point beats on both accuracy and images per dollar; most images per dollar first."""
    front: list[AccuracyPoint] = []
    best_top1 = float("-inf")
    for p in sorted(points, key=lambda p: (-p.cost_performance, -p.top1)):
        if p.top1 > best_top1:
            front.append(p)
            best_top1 = p.top1
    return front


def throughput_curves(records: Iterable[dict[str, Any]]) -> list[Curve]:
    """Per configuration (model, images per request, backend, device, precision, max batch, workers, instance): throughput
    against p99 over the closed- and open-loop load levels, in order of offered load."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("mode") not in ("closed", "open") or not _usable(r) or r.get("latency_p99_ms") is None:
            continue
        key = (
            r["model"], int(r["images_per_request"]), r.get("backend"), r.get("device"), r.get("precision") or "fp32",
            r.get("max_batch_size"), r.get("workers") or 1, r.get("instance_type"), r["mode"],
        )  # fmt: skip
        groups.setdefault(key, []).append(r)
    curves = []
    for (model, n, backend, device, precision, mbs, workers, hw, mode), rs in groups.items():
        load_key = "concurrency" if mode == "closed" else "rate"
        latest: dict[float, dict[str, Any]] = {}
        for r in rs:  # a rerun of the same level replaces the earlier one
            latest[float(r[load_key])] = r
        pts = tuple(
            CurvePoint(
                float(r["images_per_s"]),
                float(r["latency_p99_ms"]),
                f"c={r['concurrency']}" if mode == "closed" else f"{r['rate']:g}/s",
            )
            for _, r in sorted(latest.items())
        )
        any_r = rs[0]
        label = f"{model} {backend}/{device} {precision} max batch {mbs}{f' {workers} workers' if workers != 1 else ''} {hw}"
        curves.append(Curve(label, model, any_r.get("family") or model, n, precision, pts))
    return sorted(curves, key=lambda c: (c.images_per_request, c.family, c.model, c.label))


def _colour_map(families: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    spare = iter(_SPARE_COLOURS * 4)
    for fam in sorted(set(families)):
        out[fam] = FAMILY_COLOURS.get(fam) or next(spare)
    return out


def _subtitle(records: Sequence[dict[str, Any]]) -> str:
    hw = sorted({str(r.get("hardware")) for r in records if r.get("hardware")})
    prices = sorted(
        {f"{r['instance_type']} ${r['price_per_hour']}/h" for r in records if r.get("price_per_hour") is not None}
    )
    parts = []
    if hw:
        parts.append("measured on " + "; ".join(hw))
    if prices:
        parts.append("priced as " + ", ".join(prices))
    # "$" starts mathtext in matplotlib: escape it so that prices print as prices.
    return " | ".join(parts).replace("$", r"\$")


def _plain_ticks(axis: Any, span: float = 1.0) -> None:
    """Log-axis ticks as 20, 50, 200 rather than 2x10^1: read at a glance. Over more than a decade
    (`span` = max / min of the data) only the 2s and 5s of the minor ticks are labelled."""
    import math

    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _pos: int) -> str:
        if v <= 0:
            return ""
        lead = round(v / 10 ** math.floor(math.log10(v)))
        return f"{v:g}" if span < 10 or lead in (2, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))
    axis.set_tick_params(which="minor", labelsize=7)


def _scatter_figure(points: Sequence[CostPoint] | Sequence[AccuracyPoint]) -> tuple[Any, Any, dict, dict]:
    """A figure for one point per (network, hardware): colour = family, marker = hardware."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 7.5), dpi=110)
    colours = _colour_map(p.family for p in points)
    markers = {hw: MARKERS[i % len(MARKERS)] for i, hw in enumerate(sorted({p.hardware for p in points}))}
    return fig, ax, colours, markers


def _legends(ax: Any, colours: dict[str, str], markers: dict[str, str], extra: Sequence[Any]) -> None:
    """The network (colour) and hardware (marker, + `extra`) legends, outside the axes so that they never
    cover a point or a label."""
    from matplotlib.lines import Line2D

    fam_handles = [
        Line2D([], [], marker="o", linestyle="", markerfacecolor=c, markeredgecolor="black", markersize=8, label=f)
        for f, c in colours.items()
    ]
    hw_handles = [
        Line2D([], [], marker=m, linestyle="", color="0.5", markeredgecolor="black", markersize=8, label=hw)
        for hw, m in markers.items()
    ]
    leg1 = ax.legend(handles=fam_handles, title="network", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.add_artist(leg1)
    ax.legend(handles=[*hw_handles, *extra], title="hardware", loc="lower left", bbox_to_anchor=(1.01, 0), fontsize=8)


def _draw_frontier(ax: Any, xy: Sequence[tuple[float, float]], where: str) -> None:
    if len(xy) > 1:
        ax.step([x for x, _ in xy], [y for _, y in xy], where=where, color="0.35", linestyle="--", linewidth=1.2,
                zorder=2)  # fmt: skip


def _frontier_handle() -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color="0.35", linestyle="--", label="Pareto frontier (bold labels)")


def best_buy(points: Sequence[CostPoint]) -> CostPoint | None:
    """What to pay for: the most images per dollar (the faster of equals). It is on the frontier."""
    return max(points, key=lambda p: (p.cost_performance, -p.time_ms), default=None)


def _model_colours(models: Iterable[str]) -> dict[str, str]:
    """One colour per network (base model: NAME and NAME-int8 share it), so that resnet50 and resnet152
    are told apart; int8 is drawn hollow instead."""
    import matplotlib

    palette = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
    return {m: palette[i % len(palette)] for i, m in enumerate(sorted(set(models)))}


def _point_text(p: CostPoint, single_hw: bool) -> str:
    """"squeezenet1_1 int8, 4 images/request": the legend's network name, the precision, the size."""
    base, variant = zoo.split_variant(p.model)
    images = f"{p.images_per_request} image{'s' if p.images_per_request > 1 else ''}/request"
    return f"{base}{' ' + variant if variant else ''}, {images}" + ("" if single_hw else f", {p.hardware}")


# Marker area by images per request: a request of 8 images reads as a bigger dot than one of 1.
def _marker_area(n: int) -> float:
    return 30 + 18 * n


def plot_cost(points: Sequence[CostPoint], records: Sequence[dict[str, Any]]) -> Any:
    """The 2018 figure made to answer "which network, precision and images per request do I pay for on
    this machine": colour = network, hollow = int8, size = images per request, marker = hardware; the
    frontier drawn solid with its points labelled, the rest faded, the best buy ringed and named."""
    from matplotlib.lines import Line2D

    fig, ax, _, markers = _scatter_figure(points)
    colours = _model_colours(zoo.base_name(p.model) for p in points)
    hardware = list(markers)
    for p in points:
        colour = colours[zoo.base_name(p.model)]
        int8 = zoo.split_variant(p.model)[1] is not None
        ax.scatter(
            [p.time_ms], [p.cost_performance], marker=markers[p.hardware], s=_marker_area(p.images_per_request),
            facecolors="white" if int8 else colour, edgecolors=colour if int8 else "black",
            linewidths=1.6 if int8 else 0.6, alpha=1.0 if p.pareto else 0.4, zorder=4 if p.pareto else 3,
            label=f"{zoo.base_name(p.model)} / {p.hardware}",
        )  # fmt: skip
    front = sorted((p for p in points if p.pareto), key=lambda p: p.time_ms)
    # Faster is better here: the best value within a time holds until the next frontier point.
    if len(front) > 1:
        ax.step([p.time_ms for p in front], [p.cost_performance for p in front], where="post", color="0.15",
                linewidth=2.0, zorder=2, label="frontier")  # fmt: skip
    ax.set_xscale("log")
    ys = [p.cost_performance for p in points]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis, max(ys) / min(ys))
    xs = [p.time_ms for p in points]
    _plain_ticks(ax.xaxis, max(xs) / min(xs))
    ax.margins(y=0.12)
    ax.set_xlabel("processing time per request (ms, mean of sequential requests; log scale)  \u2190 faster")
    ax.set_ylabel("cost performance (thousand images per $)  cheaper \u2192")
    ax.set_title("What to pay for: images per dollar against time per request", fontsize=13)
    sub = _subtitle(records)
    if sub:
        fig.text(0.5, 0.005, sub, ha="center", va="bottom", fontsize=8, color="0.3")
    ax.grid(True, which="both", alpha=0.25)
    # Legends outside the axes: network (colour), images per request (size), hardware and the rest.
    net = [Line2D([], [], marker="o", linestyle="", markerfacecolor=c, markeredgecolor="black", markersize=8, label=m)
           for m, c in colours.items()]  # fmt: skip
    sizes = sorted({p.images_per_request for p in points})
    size = [Line2D([], [], marker="o", linestyle="", color="0.6", markeredgecolor="black",
                   markersize=_marker_area(n) ** 0.5, label=str(n)) for n in sizes]  # fmt: skip
    other = [Line2D([], [], marker=m, linestyle="", color="0.6", markeredgecolor="black", markersize=8, label=hw)
             for hw, m in markers.items()]  # fmt: skip
    other += [Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="0.3",
                     markeredgewidth=1.6, markersize=8, label="int8 (hollow)")]  # fmt: skip
    if front:
        other.append(Line2D([], [], color="0.15", linewidth=2, label="frontier: nothing is both faster and cheaper"))
    leg = ax.legend(handles=net, title="network", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.add_artist(leg)
    leg = ax.legend(handles=size, title="images per request", loc="center left", bbox_to_anchor=(1.01, 0.42),
                    fontsize=8, labelspacing=1.2)  # fmt: skip
    ax.add_artist(leg)
    ax.legend(handles=other, title="hardware and marks", loc="lower left", bbox_to_anchor=(1.01, 0), fontsize=8)
    ax.set_xlim(min(xs) / 1.3, max(xs) * 1.6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    single_hw = len(hardware) == 1
    best = best_buy(points)
    if best is not None:
        ax.scatter([best.time_ms], [best.cost_performance], s=_marker_area(best.images_per_request) * 4.5,
                   facecolors="none", edgecolors="#d62728", linewidths=2.2, zorder=5, label="best buy")  # fmt: skip
        ax.annotate(
            f"best buy: {_point_text(best, single_hw)}\n{best.cost_performance:,.0f} thousand images per $, "
            f"{best.time_ms:.0f} ms per request", (best.time_ms, best.cost_performance), textcoords="offset points",
            xytext=(34, 14), ha="left", va="bottom", fontsize=8.5, fontweight="bold", color="#8b1a1a", zorder=6,
            bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "#d62728", "alpha": 0.95},
            arrowprops={"arrowstyle": "-", "color": "#d62728", "lw": 1.0},
        )  # fmt: skip
    # Only the frontier is labelled (bold): the choices worth paying for; the legend names the rest.
    _place_labels(fig, ax, [
        Label(p.time_ms, p.cost_performance, _point_text(p, single_hw), True)
        for p in sorted(front, key=lambda p: -p.cost_performance) if p is not best
    ])  # fmt: skip
    return fig


def _accuracy_text(p: AccuracyPoint, single_hw: bool) -> str:
    text = p.label.rsplit(", ", 1)[0] if single_hw else p.label
    if p.agreement is not None:
        text += f" (agrees {p.agreement:.0%})"
    return text


def plot_accuracy(points: Sequence[AccuracyPoint], records: Sequence[dict[str, Any]]) -> Any:
    from matplotlib.lines import Line2D

    fig, ax, colours, markers = _scatter_figure(points)
    hardware = list(markers)
    for hw in hardware:
        for fam in sorted(colours):
            for int8 in (False, True):
                sel = [p for p in points if p.hardware == hw and p.family == fam and (p.precision == "int8") == int8]
                if not sel:
                    continue
                ax.scatter(
                    [p.cost_performance for p in sel], [p.top1 for p in sel],
                    facecolors="none" if int8 else colours[fam], edgecolors=colours[fam] if int8 else "black",
                    marker=markers[hw], s=70, linewidths=1.4 if int8 else 0.6, zorder=3,
                    label=f"{fam} / {hw}{' / int8' if int8 else ''}",
                )  # fmt: skip
    front = sorted((p for p in points if p.pareto), key=lambda p: p.cost_performance)
    # More is better on both axes: up to a point's images per dollar, its accuracy is reachable.
    _draw_frontier(ax, [(p.cost_performance, p.top1) for p in front], where="pre")
    ax.set_xscale("log")
    xs = [p.cost_performance for p in points]
    _plain_ticks(ax.xaxis, max(xs) / min(xs))
    ax.set_xlim(min(xs) / 1.6, max(xs) * 2.2)
    ax.margins(y=0.1)
    ax.set_xlabel("cost performance (thousand images per $, best of the 2018 method's points; log scale)")
    ax.set_ylabel("ImageNet-1k top-1 % (published, for the named weights)")
    ax.set_title("Accuracy vs images per dollar", fontsize=13)
    sub = _subtitle(records)
    speed_only = sorted({zoo.base_name(p.model) for p in points if p.speed_only})
    note = (
        "top-1 is published for each network's named weights, not measured here; "
        + (f"measured on other weights (speed only): {', '.join(speed_only)}; " if speed_only else "")
        + "int8 (hollow) is drawn at its fp32 weights' top-1, with its agreement with fp32"
    )
    fig.text(0.5, 0.005, " | ".join(x for x in (note, sub) if x), ha="center", va="bottom", fontsize=7.5,
             color="0.3", wrap=True)  # fmt: skip
    ax.grid(True, which="both", alpha=0.25)
    hollow = Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="0.3", markersize=8,
                    label="int8 (hollow)")  # fmt: skip
    _legends(ax, colours, markers, [hollow, _frontier_handle()] if front else [hollow])
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    single_hw = len(hardware) == 1
    _place_labels(fig, ax, [
        Label(p.cost_performance, p.top1, _accuracy_text(p, single_hw), p.pareto)
        for p in sorted(points, key=lambda p: (not p.pareto, -p.top1))
    ])  # fmt: skip
    return fig


# Label positions tried in turn (offset in points, alignment); the far ones get a leader line.
_NEAR = [(6, 3, "left", "bottom"), (6, -3, "left", "top"), (-6, 3, "right", "bottom"), (-6, -3, "right", "top"),
         (0, 8, "center", "bottom"), (0, -8, "center", "top")]  # fmt: skip
_FAR = [(18, 16, "left", "bottom"), (18, -16, "left", "top"), (-18, 16, "right", "bottom"),
        (-18, -16, "right", "top"), (0, 24, "center", "bottom"), (0, -24, "center", "top"),
        (30, 0, "left", "center"), (-30, 0, "right", "center")]  # fmt: skip


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    bold: bool  # Pareto points: bold, and placed first


def _place_labels(fig: Any, ax: Any, labels: Sequence[Label]) -> None:
    """Greedy placement, in the given order: each label takes the first position that overlaps no
    marker and no label placed before it, else the least-overlapping one. Readable without a layout
    library."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = []
    for p in labels:
        x, y = ax.transData.transform((p.x, p.y))
        taken.append((x - 6, y - 6, x + 6, y + 6))

    def overlap(box: tuple[float, float, float, float]) -> float:
        x0, y0, x1, y1 = box
        total = sum(
            max(0.0, min(x1, b[2]) - max(x0, b[0])) * max(0.0, min(y1, b[3]) - max(y0, b[1])) for b in taken
        )
        outside = (x1 - x0) * (y1 - y0) if x0 < frame.x0 or x1 > frame.x1 or y0 < frame.y0 or y1 > frame.y1 else 0
        return total + outside

    for p in labels:
        best: tuple[float, Any, tuple] | None = None
        for dx, dy, ha, va in _NEAR + _FAR:
            far = (dx, dy, ha, va) in _FAR
            t = ax.annotate(
                p.text, (p.x, p.y), textcoords="offset points", xytext=(dx, dy),
                ha=ha, va=va, fontsize=7.5, fontweight="bold" if p.bold else "normal", color="0.15", zorder=4,
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if far else None,
            )  # fmt: skip
            bb = t.get_window_extent(renderer)
            box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
            cost = overlap(box)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, box)
            else:
                t.remove()
            if cost == 0:
                break
        assert best is not None
        taken.append(best[2])


def _short_labels(curves: Sequence[Curve]) -> dict[str, str]:
    """Legend text: the model, plus only those settings that differ between curves."""
    parts = {c.label: c.label.split(" ") for c in curves}  # model, backend/device, precision, "max", "batch", N, hardware
    varying = [i for i in range(1, 7) if len({tuple(p[i : i + 1]) for p in parts.values()}) > 1]
    return {label: " ".join([p[0], *(p[i] for i in varying)]) for label, p in parts.items()}


def plot_curves(curves: Sequence[Curve], records: Sequence[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({c.images_per_request for c in curves})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes) + 2.6, 5.8), dpi=110, squeeze=False)
    colours = _model_colours(zoo.base_name(c.model) for c in curves)
    models = sorted({zoo.base_name(c.model) for c in curves})
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}
    short = _short_labels(curves)
    handles: dict[str, Any] = {}
    for ax, n in zip(axes[0], sizes):
        for c in (c for c in curves if c.images_per_request == n):
            (line,) = ax.plot(
                [p.images_per_s for p in c.points], [p.p99_ms for p in c.points],
                color=colours[zoo.base_name(c.model)], marker=markers[zoo.base_name(c.model)],
                linestyle="--" if c.precision == "int8" else "-", label=short[c.label], markersize=5,
            )  # fmt: skip
            handles.setdefault(short[c.label], line)
            for p in c.points:
                ax.annotate(p.load, (p.images_per_s, p.p99_ms), textcoords="offset points", xytext=(4, 4),
                            fontsize=6, color="0.35")  # fmt: skip
        ips = [p.images_per_s for c in curves if c.images_per_request == n for p in c.points]
        p99s = [p.p99_ms for c in curves if c.images_per_request == n for p in c.points]
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_ticks(ax.xaxis, max(ips) / min(ips))
        _plain_ticks(ax.yaxis, max(p99s) / min(p99s))
        ax.set_title(f"{n} image{'s' if n > 1 else ''} per request", fontsize=11)
        ax.set_xlabel("throughput (images/s, log scale)")
        ax.set_ylabel("p99 latency (ms, log scale)")
        ax.grid(True, which="both", alpha=0.25)
    # One legend for all panels, beside them: the curves stay uncovered. Dashed = int8.
    fig.legend(handles=list(handles.values()), loc="center right", fontsize=7.5, title="dashed: int8")
    fig.suptitle("Throughput vs p99 latency as load rises (closed loop: concurrency c; open loop: rate)", fontsize=12)
    sub = _subtitle(records)
    if sub:
        fig.text(0.5, 0.005, sub, ha="center", va="bottom", fontsize=8, color="0.3")
    legend_width = 2.6 / fig.get_size_inches()[0]
    fig.tight_layout(rect=(0, 0.03, 1 - legend_width, 0.95))
    return fig


def render(records: Sequence[dict[str, Any]], out_dir: Path, stem: str = "") -> PlotResult:
    """Write <stem>cost, <stem>accuracy and <stem>throughput-p99 .png/.svg (those that have data)."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    points = cost_points(records)
    curves = throughput_curves(records)
    result = PlotResult(points, curves, [], accuracy_points=accuracy_points(points))
    if points:
        fig = plot_cost(points, records)
        result.files += _save(fig, out_dir / f"{stem}cost")
        plt.close(fig)
    else:
        result.notes.append("no seed-mode records with a price: no cost figure")
    if result.accuracy_points:
        fig = plot_accuracy(result.accuracy_points, records)
        result.files += _save(fig, out_dir / f"{stem}accuracy")
        plt.close(fig)
    elif points:
        result.notes.append("no zoo networks with a published top-1 among the cost points: no accuracy figure")
    if curves:
        fig = plot_curves(curves, records)
        result.files += _save(fig, out_dir / f"{stem}throughput-p99")
        plt.close(fig)
    else:
        result.notes.append("no closed- or open-loop records: no throughput-vs-p99 curves")
    return result


def _save(fig: Any, base: Path) -> list[Path]:
    paths = [base.parent / f"{base.name}.png", base.parent / f"{base.name}.svg"]
    # A fixed SVG hash salt and no date keep the SVG byte-stable for the same data (clean diffs).
    import matplotlib

    matplotlib.rcParams["svg.hashsalt"] = "saikyo"
    fig.savefig(paths[0], metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Date": None})
    return paths
