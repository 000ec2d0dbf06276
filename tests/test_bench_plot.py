"""The 2018 figure and the throughput curves: check what is plotted (data), not pixels."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from saikyo.bench import records as records_module
from saikyo.bench.cost import cost_performance
from saikyo.bench.plot import (
    accuracy_front,
    accuracy_points,
    best_buy,
    cost_points,
    pareto_front,
    plot_accuracy,
    plot_cost,
    render,
    throughput_curves,
)
from saikyo.bench.records import accuracy_fields
from saikyo.cli import app

PRICES = {"c7i.large": 0.08925, "g4dn.xlarge": 0.526}


def rec(model: str, family: str, n: int, instance: str | None, mean_ms: float, images_per_s: float, **kw: Any) -> dict:
    price = PRICES.get(instance) if instance else None
    r = {
        "schema": records_module.SCHEMA, "model": model, "family": family, "images_per_request": n,
        "instance_type": instance, "price_per_hour": price, "mode": "seed", "concurrency": 1, "rate": None,
        "backend": "onnxruntime", "device": "cpu", "max_batch_size": 16, "precision": "fp32",
        "hardware": "Test CPU, 2 cores", "requests": 10, "ok": 10, "errors": 0,
        "latency_mean_ms": mean_ms, "latency_p50_ms": mean_ms, "latency_p90_ms": mean_ms * 1.2,
        "latency_p99_ms": mean_ms * 1.5, "images_per_s": images_per_s, "requests_per_s": images_per_s / n,
        "cost_performance_kimg_per_usd": cost_performance(images_per_s, price) if price else None,
    }  # fmt: skip
    r.update(kw)
    return r


RECORDS = [
    rec("squeezenet1_1", "SqueezeNet", 1, "c7i.large", 20, 50),
    rec("squeezenet1_1", "SqueezeNet", 8, "c7i.large", 100, 80),
    rec("resnet50", "ResNet", 1, "c7i.large", 80, 12.5),
    rec("resnet50", "ResNet", 1, "c7i.large", 90, 11.1, max_batch_size=1),  # worse setting: not plotted
    rec("resnet152", "ResNet", 1, "c7i.large", 200, 5),
    rec("resnet50", "ResNet", 1, "g4dn.xlarge", 10, 100, device="cuda"),
    rec("resnet50", "ResNet", 4, None, 30, 130),  # no price: no cost point
    rec("resnet50", "ResNet", 1, "c7i.large", 80, 12, mode="closed", concurrency=1, latency_p99_ms=95),
    rec("resnet50", "ResNet", 1, "c7i.large", 150, 20, mode="closed", concurrency=2, latency_p99_ms=160),
    rec("resnet50", "ResNet", 1, "c7i.large", 300, 22, mode="closed", concurrency=4, latency_p99_ms=420),
    rec("squeezenet1_1", "SqueezeNet", 4, "c7i.large", 40, 90, mode="open", rate=20, concurrency=None, latency_p99_ms=60),
    rec("squeezenet1_1", "SqueezeNet", 4, "c7i.large", 60, 150, mode="open", rate=40, concurrency=None, latency_p99_ms=200),
]


def plotted(ax) -> list[tuple[float, float]]:
    """Every marker's (x, y) in the axes, sorted."""
    return sorted(tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets())


def by_label(points):
    return {p.label: p for p in points}


def test_one_point_per_network_size_and_hardware_with_2018_labels() -> None:
    points = by_label(cost_points(RECORDS))
    assert set(points) == {
        "SqueezeNet, bs=1, c7i.large",  # the only SqueezeNet: named by family
        "SqueezeNet, bs=8, c7i.large",
        "resnet50, bs=1, c7i.large",  # two ResNets: named by model
        "resnet152, bs=1, c7i.large",
        "resnet50, bs=1, g4dn.xlarge",
    }
    p = points["resnet50, bs=1, c7i.large"]
    assert p.time_ms == 80  # the better of two server settings stands for the point
    assert p.cost_performance == pytest.approx(12.5 * 3600 / 0.08925 / 1000)
    assert points["resnet50, bs=1, g4dn.xlarge"].cost_performance == pytest.approx(100 * 3600 / 0.526 / 1000)
    assert points["SqueezeNet, bs=8, c7i.large"].family == "SqueezeNet"


def test_pareto_frontier() -> None:
    points = cost_points(RECORDS)
    front = [p.label for p in pareto_front(points)]
    assert front == ["resnet50, bs=1, g4dn.xlarge", "SqueezeNet, bs=1, c7i.large", "SqueezeNet, bs=8, c7i.large"]
    assert {p.label for p in points if p.pareto} == set(front)


def test_cost_figure_plots_every_point_and_names_the_frontier_and_the_best_buy() -> None:
    import matplotlib.pyplot as plt

    points = cost_points(RECORDS)
    fig = plot_cost(points, RECORDS)
    try:
        ax = fig.axes[0]
        assert ax.get_xscale() == "log"
        marks = [c for c in ax.collections if c.get_label() != "best buy"]
        assert sorted(tuple(map(float, xy)) for c in marks for xy in c.get_offsets()) == sorted(
            (p.time_ms, p.cost_performance) for p in points
        )
        # Colour by network, not family: resnet50 and resnet152 (both ResNet) differ; a network's points agree.
        colours: dict[str, set] = {}
        for c in marks:
            face, edge = tuple(c.get_facecolor()[0][:3]), tuple(c.get_edgecolor()[0][:3])
            colours.setdefault(c.get_label().split(" / ")[0], set()).add(edge if face == (1.0, 1.0, 1.0) else face)
        assert {"resnet50", "resnet152"} <= set(colours) and all(len(v) == 1 for v in colours.values())
        assert colours["resnet50"] != colours["resnet152"]
        # Only the frontier is labelled, in words ("images/request", never "bs"); the best buy is ringed.
        front = pareto_front(points)
        best = best_buy(points)
        assert best in front and best == max(points, key=lambda p: p.cost_performance)
        texts = [t.get_text() for t in ax.texts]
        assert len(texts) == len(front) and not any("bs=" in t for t in texts)
        assert all("image" in t and "/request" in t for t in texts)
        assert sum(t.startswith("best buy: ") for t in texts) == 1
        (ring,) = [c for c in ax.collections if c.get_label() == "best buy"]
        assert tuple(map(float, ring.get_offsets()[0])) == (best.time_ms, best.cost_performance)
        (line,) = [line for line in ax.lines if line.get_label() == "frontier"]
        assert list(line.get_xdata()) == [p.time_ms for p in front]
        titles = {leg.get_title().get_text() for leg in ax.artists + [ax.get_legend()] if hasattr(leg, "get_title")}
        assert {"network", "images per request", "hardware and marks"} <= titles
    finally:
        plt.close(fig)


def test_cpu_and_gpu_of_one_instance_are_two_hardware_points() -> None:
    on_gpu_box = [
        rec("resnet50", "ResNet", 1, "g4dn.xlarge", 10, 100, device="cuda"),
        rec("resnet50", "ResNet", 1, "g4dn.xlarge", 60, 16, device="cpu"),
        rec("resnet50", "ResNet", 1, "c7i.large", 80, 12.5),
    ]
    assert {p.label for p in cost_points(on_gpu_box)} == {
        "ResNet, bs=1, g4dn.xlarge cuda", "ResNet, bs=1, g4dn.xlarge cpu", "ResNet, bs=1, c7i.large",
    }  # fmt: skip


def test_throughput_curves_follow_load_order() -> None:
    curves = throughput_curves(RECORDS)
    assert len(curves) == 2
    closed = next(c for c in curves if c.model == "resnet50")
    assert [p.load for p in closed.points] == ["c=1", "c=2", "c=4"]
    assert [(p.images_per_s, p.p99_ms) for p in closed.points] == [(12, 95), (20, 160), (22, 420)]
    opened = next(c for c in curves if c.model == "squeezenet1_1")
    assert [p.load for p in opened.points] == ["20/s", "40/s"] and opened.images_per_request == 4


def test_one_curve_per_precision_of_one_model_and_backend() -> None:
    """bf16 is not in the model's name: the precision alone tells the two OpenVINO servers apart."""
    runs = [
        rec("resnet50", "ResNet", 8, "c7i.large", ms, ips, mode="closed", concurrency=c, backend="openvino",
            precision=precision, latency_p99_ms=ms * 1.5)
        for precision, scale in (("fp32", 1), ("bf16", 2))
        for c, ms, ips in ((1, 400 / scale, 20 * scale), (4, 1000 / scale, 30 * scale))
    ]  # fmt: skip
    curves = throughput_curves(runs)
    assert sorted((c.precision, [p.images_per_s for p in c.points]) for c in curves) == [
        ("bf16", [40, 60]), ("fp32", [20, 30])
    ]
    assert len({c.label for c in curves}) == 2


def test_render_writes_png_and_svg(tmp_path) -> None:
    result = render(RECORDS, tmp_path, stem="t-")
    names = sorted(f.name for f in result.files)
    assert names == ["t-cost.png", "t-cost.svg", "t-throughput-p99.png", "t-throughput-p99.svg"]
    assert (tmp_path / "t-cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "t-cost.svg").read_text()
    assert len(result.cost_points) == 5 and len(result.curves) == 2


def test_plot_cli_json_reports_the_plotted_data(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + '{"torn line')
    result = CliRunner().invoke(app, ["bench", "plot", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["cost_points"]) == 5
    assert sum(p["pareto"] for p in data["cost_points"]) == 3
    assert (tmp_path / "cost.png").exists() and (tmp_path / "throughput-p99.svg").exists()


# Accuracy: the records carry the published top-1 (records.accuracy_fields, as make_record writes it).
HELD_OUT = {"top1_agreement_with_fp32": 0.9, "calibration_photos": ["skimage.data.coins"],
            "agreement_photos": ["skimage.data.chelsea", "skimage.data.coffee"]}  # fmt: skip
ACC_RECORDS = [
    rec("squeezenet1_1", "SqueezeNet", 1, "c7i.large", 20, 50, **accuracy_fields("squeezenet1_1", "random")),
    rec("squeezenet1_1", "SqueezeNet", 8, "c7i.large", 100, 80, **accuracy_fields("squeezenet1_1", "random")),
    rec("resnet50", "ResNet", 1, "c7i.large", 80, 12.5, **accuracy_fields("resnet50", "imagenet-pretrained")),
    rec("resnet50-int8", "ResNet", 1, "c7i.large", 40, 25, precision="int8",
        **accuracy_fields("resnet50-int8", "random", HELD_OUT)),
    rec("resnet152", "ResNet", 1, "c7i.large", 200, 5, **accuracy_fields("resnet152", "random")),
    rec("resnet50", "ResNet", 1, "g4dn.xlarge", 10, 100, device="cuda", **accuracy_fields("resnet50", "random")),
    rec("tiny", "Test", 1, "c7i.large", 5, 200, **accuracy_fields("tiny", "random")),  # nothing published
]  # fmt: skip


def test_accuracy_figure_data_equals_the_records() -> None:
    import matplotlib.pyplot as plt

    points = accuracy_points(cost_points(ACC_RECORDS))
    assert {(p.model, p.hardware) for p in points} == {
        ("squeezenet1_1", "c7i.large"), ("resnet50", "c7i.large"), ("resnet50-int8", "c7i.large"),
        ("resnet152", "c7i.large"), ("resnet50", "g4dn.xlarge"),
    }  # fmt: skip
    for p in points:
        # y is the record's published top-1, x its cost performance: the best of that network's records there.
        assert p.top1 == p.record["published_top1"] is not None
        same = [r for r in ACC_RECORDS if r["model"] == p.model and r["instance_type"] == p.hardware]
        assert p.cost_performance == p.record["cost_performance_kimg_per_usd"] == max(
            r["cost_performance_kimg_per_usd"] for r in same
        )
        assert p.speed_only == p.record["speed_only"] and p.agreement == p.record["top1_agreement_with_fp32"]
    squeeze = next(p for p in points if p.model == "squeezenet1_1")
    assert squeeze.record["images_per_request"] == 8 and squeeze.top1 == 58.178
    assert [p.label for p in accuracy_front(points)] == [
        "SqueezeNet, bs=8, c7i.large", "resnet50-int8, bs=1, c7i.large", "resnet152, bs=1, c7i.large",
    ]  # fmt: skip
    assert {p.label for p in points if p.pareto} == {p.label for p in accuracy_front(points)}

    fig = plot_accuracy(points, ACC_RECORDS)
    try:
        ax = fig.axes[0]
        assert ax.get_xscale() == "log"
        assert plotted(ax) == sorted((p.cost_performance, p.top1) for p in points)
        hollow = [c for c in ax.collections if c.get_label().endswith("/ int8")]
        assert len(hollow) == 1 and hollow[0].get_facecolor().size == 0  # int8: no fill
        assert any(t.get_text().startswith("resnet50-int8") and "(agrees 90%)" in t.get_text() for t in ax.texts)
    finally:
        plt.close(fig)


def test_plot_cli_json_has_the_accuracy_points(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith(("published", "speed"))}) + "\n"
                            for r in ACC_RECORDS))  # fmt: skip
    result = CliRunner().invoke(app, ["bench", "plot", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # Records written before the accuracy fields existed get them from the zoo when read.
    got = {(p["model"], p["hardware"]): p["top1"] for p in data["accuracy_points"]}
    assert got[("resnet152", "c7i.large")] == 82.284 and len(got) == 5
    assert (tmp_path / "accuracy.svg").exists()
