"""One self-contained HTML page: the hardware, the plots (inline SVG), accuracy, capacities at a latency
target, the tables, a recommendation."""

from __future__ import annotations

import datetime as _dt
import html
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saikyo import __version__
from saikyo.bench.plot import AccuracyPoint, render
from saikyo.bench.recommend import Recommendation

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; padding: 0 2rem; max-width: 1300px; color: #222;
       line-height: 1.45; }
.scroll { overflow-x: auto; } .machine { font-weight: bold; color: #8b1a1a; }
h1 { margin-bottom: 0.2rem; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.pareto td { font-weight: bold; }
figure { margin: 1rem 0; } figure svg { max-width: 100%; height: auto; }
code { background: #f4f4f4; padding: 0 0.2rem; }
"""


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1, classes: Sequence[str] = ()) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_esc(h)}</th>' for i, h in enumerate(headers))
    body = []
    for j, row in enumerate(rows):
        cls = f' class="{classes[j]}"' if j < len(classes) and classes[j] else ""
        cells = "".join(f'<td class="{"l" if i < left else ""}">{_esc(v)}</td>' for i, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    # Wide tables scroll inside the page's margins instead of running past them.
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _fmt(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _inline_svg(path: Path) -> str:
    text = path.read_text()
    start = text.find("<svg")  # drop the XML prolog and DOCTYPE: inline SVG in HTML needs neither
    return text[start:] if start >= 0 else text


def build_report(
    records: Sequence[dict[str, Any]],
    recommendation: Recommendation | None = None,
    title: str = "saikyo cost lab",
    sources: Sequence[str] = (),
) -> str:
    with tempfile.TemporaryDirectory(prefix="saikyo-report-") as tmp:
        plots = render(records, Path(tmp))
        figures = {
            stem: f"<figure>{_inline_svg(f)}<figcaption>{_esc(f.stem)}</figcaption></figure>"
            for stem in ("cost", "accuracy", "throughput-p99")
            if (f := plots.file(stem)) is not None
        }
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">{len(records)} records from {_esc(", ".join(sources) or "-")}; generated '
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC by saikyo {__version__}</p>",
        "<h2>Machines and prices</h2>",
        _machines_note(records),
        _hardware_table(records),
        "<p>Cost performance = images/s &times; 3600 / price per hour / 1000: thousand images per dollar "
        "(the 2018 metric). Latency percentiles are nearest-rank over successful requests; open-loop latency "
        "counts from each request's scheduled send time. <code>client_colocated</code>: the load generator "
        "ran on the server's machine and shared its cores.</p>",
        "<h2>The 2018 figure</h2>",
        figures.get("cost", ""),
    ]
    if plots.cost_points:
        ranked = sorted(plots.cost_points, key=lambda p: -p.cost_performance)
        rows = [
            [p.label, p.model, _fmt(p.time_ms), _fmt(p.images_per_s, 2), _fmt(p.cost_performance),
             "yes" if p.pareto else ""]
            for p in ranked
        ]  # fmt: skip
        headers = ["point", "model", "mean ms", "images/s", "k images/$", "Pareto"]
        parts.append(_table(headers, rows, left=2, classes=["pareto" if p.pareto else "" for p in ranked]))
    if plots.accuracy_points:
        parts += ["<h2>Accuracy vs images per dollar</h2>", _ACCURACY_NOTE, figures.get("accuracy", ""),
                  _accuracy_table(plots.accuracy_points)]  # fmt: skip
    capacities = [r for r in records if r.get("search") == "capacity"]
    if capacities:
        parts += ["<h2>Capacity at a latency target</h2>", _CAPACITY_NOTE, _capacity_table(capacities, machines(records))]
    if plots.curves:
        parts += ["<h2>Throughput vs p99</h2>", figures.get("throughput-p99", "")]
    if recommendation is not None:
        parts += ["<h2>Recommendation</h2>", _recommendation_html(recommendation)]
    parts += ["<h2>All records</h2>", _records_table(records), "</body></html>"]
    return "\n".join(parts)


_ACCURACY_NOTE = (
    "<p>Top-1 / top-5: ImageNet-1k validation accuracy <b>published, for the named weights</b> (below, with "
    "the source); not measured here. A run on other weights (random, as the committed sweeps use: speed does "
    "not depend on them) measures speed only and says so. An int8 variant has no published accuracy of its "
    "own: it is drawn at its fp32 weights' top-1 (hollow), with how often its top-1 agreed with fp32 on the "
    "photos named (held out from calibration, or not).</p>"
)
_CAPACITY_NOTE = (
    "<p>The highest Poisson request rate whose p99 met the target with no errors (<code>saikyo bench "
    "capacity</code>: bracket by doubling, then bisect, each step an open-loop run), beside the peak "
    "throughput any step reached at whatever latency. Images per dollar at the target is the number to "
    "budget with.</p>"
)


def _accuracy_table(points: Sequence[AccuracyPoint]) -> str:
    rows = []
    for p in points:
        r = p.record
        if p.agreement is None:
            agreement = "-"
        else:
            held = "held-out" if r.get("agreement_held_out") else "calibration"
            agreement = f"{p.agreement:.0%} of {r.get('agreement_photos')} {held} photos"
        rows.append([
            p.label, _fmt(p.top1, 1), _fmt(r.get("published_top5"), 1), r.get("published_for"),
            f"{r.get('weights')} (speed only)" if p.speed_only else r.get("weights"), agreement,
            _fmt(p.cost_performance), "yes" if p.pareto else "", r.get("published_source"),
        ])  # fmt: skip
    headers = ["point", "top-1 %", "top-5 %", "published for", "measured with weights", "int8 agrees with fp32",
               "k images/$", "Pareto", "source"]  # fmt: skip
    return _table(headers, rows, left=1, classes=["pareto" if p.pareto else "" for p in points])


def _capacity_table(capacities: Sequence[dict[str, Any]], named: dict[str, str]) -> str:
    rows = []
    for r in sorted(capacities, key=lambda r: (r["model"], r["p99_target_ms"])):
        upper = r.get("capacity_upper_rate")
        rows.append([
            named[_machine_of(r)] + ": " + _machine_of(r), r["model"], f"{r.get('backend')}/{r.get('device')}", r["images_per_request"], _fmt(r["p99_target_ms"], 0),
            _fmt(r.get("capacity_rate"), 2), "-" if upper is None else _fmt(upper, 2),
            _fmt(r.get("capacity_images_per_s"), 2), _fmt(r.get("capacity_cost_performance_kimg_per_usd")),
            _fmt(r.get("peak_images_per_s"), 2), _fmt(r.get("peak_cost_performance_kimg_per_usd")),
            len(r.get("capacity_steps") or []), r.get("instance_type"),
        ])  # fmt: skip
    headers = ["machine", "model", "backend/device", "images/req", "p99 target ms", "capacity req/s", "lowest failing req/s",
               "images/s at target", "k images/$ at target", "peak images/s", "peak k images/$", "steps",
               "priced as"]  # fmt: skip
    return _table(headers, rows, left=3)


_HARDWARE_KEYS = ("hardware", "instance_type", "price_per_hour", "price_source", "client_colocated")


def machines(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """A letter per machine the records were measured on (A, B, ...), in order of first appearance: every
    table names the machine of each row, so numbers from different machines are never read as one."""
    names: dict[str, str] = {}
    for r in records:
        names.setdefault(_machine_of(r), chr(ord("A") + len(names) % 26))
    return names


def _machine_of(r: dict[str, Any]) -> str:
    return str(r.get("hardware") or "unknown machine")


def _machines_note(records: Sequence[dict[str, Any]]) -> str:
    named = machines(records)
    if len(named) < 2:
        return ""
    return (f'<p class="machine">These records come from {len(named)} machines ('
            + ", ".join(f"{k} = {_esc(hw)}" for hw, k in named.items())
            + "): compare numbers within one machine; each table names the machine of each row.</p>")


def _hardware_table(records: Sequence[dict[str, Any]]) -> str:
    named = machines(records)
    seen: dict[tuple, int] = {}
    for r in records:
        key = tuple(r.get(k) for k in _HARDWARE_KEYS)
        seen[key] = seen.get(key, 0) + 1
    rows = [
        [named[str(hw or "unknown machine")], hw, it, "-" if p is None else f"${p}/h", src, "yes" if co else "no", n]
        for (hw, it, p, src, co), n in seen.items()
    ]
    headers = ["machine", "measured on", "priced as", "price", "price source", "client colocated", "records"]
    return _table(headers, rows, left=3)


def _records_table(records: Sequence[dict[str, Any]]) -> str:
    headers = ["machine", "model", "backend/device", "precision", "top-1 % (published)", "max batch", "workers", "images/req",
               "mode", "load", "requests", "errors", "mean ms", "p50 ms", "p90 ms", "p99 ms", "images/s",
               "k images/$"]  # fmt: skip
    rows = []
    named = machines(records)

    def order(r: dict[str, Any]) -> tuple:
        return (named[_machine_of(r)], r["model"], r["images_per_request"], r["mode"], r.get("concurrency") or 0,
                r.get("rate") or 0)  # fmt: skip

    for r in sorted(records, key=order):
        load = {"closed": f"c={r.get('concurrency')}", "open": f"{r.get('rate')}/s"}.get(r["mode"], "sequential")
        if r.get("search") == "capacity":
            load += f" (capacity at p99 <= {r['p99_target_ms']:g} ms)"
        top1 = _fmt(r.get("published_top1"), 1) + (" (speed only)" if r.get("speed_only") else "")
        rows.append([
            named[_machine_of(r)], r["model"], f"{r.get('backend')}/{r.get('device')}", r.get("precision"), top1,
            r.get("max_batch_size"),
            r.get("workers") or 1, r["images_per_request"],
            r["mode"], load, r["requests"], r["errors"], _fmt(r.get("latency_mean_ms")), _fmt(r.get("latency_p50_ms")),
            _fmt(r.get("latency_p90_ms")), _fmt(r.get("latency_p99_ms")), _fmt(r.get("images_per_s"), 2),
            _fmt(r.get("cost_performance_kimg_per_usd")),
        ])  # fmt: skip
    return _table(headers, rows, left=3)


def _recommendation_html(rec: Recommendation) -> str:
    intro = (
        f"<p>Budget p99 &le; {rec.p99_ms:g} ms at {rec.qps:g} requests/s; each instance planned at "
        f"{rec.headroom:.0%} of its measured throughput (a searched capacity where one was searched at a "
        f"target within the budget); {rec.hours_per_month:g} hours a month.</p>"
    )
    if not rec.options:
        return intro + "<p>No measured configuration meets the budget.</p>"
    rows = [
        [o.model, o.instance_type, f"{o.backend}/{o.device}", o.precision, _fmt(o.published_top1, 1),
         o.images_per_request, o.load, _fmt(o.p99_ms), _fmt(o.capacity_rps, 2), o.instances, f"${o.monthly_cost:,.2f}"]
        for o in rec.options
    ]  # fmt: skip
    headers = ["model", "instance", "backend/device", "precision", "top-1 % (published)", "images/req",
               "capacity from", "p99 ms", "req/s each", "instances", "monthly"]  # fmt: skip
    return intro + _table(headers, rows, left=3)


def write_report(path: Path, records: Sequence[dict[str, Any]], **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(records, **kwargs), encoding="utf-8")
    return path
