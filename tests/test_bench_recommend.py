"""The capacity plan picks the cheapest configuration that meets the p99 budget, on a crafted result set;
and the HTML report carries the plots, the tables and the plan."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from saikyo.bench import records as records_module
from saikyo.bench.recommend import recommend
from saikyo.bench.report import build_report
from saikyo.cli import app

PRICES = {"c7i.large": 0.08925, "c7i.xlarge": 0.1785, "g4dn.xlarge": 0.526}


def level(model: str, instance: str, rps: float, p99: float, n: int = 1, concurrency: int = 1, errors: int = 0,
          device: str = "cpu", mode: str = "closed") -> dict[str, Any]:  # fmt: skip
    price = PRICES[instance]
    return {
        "schema": records_module.SCHEMA, "model": model, "family": model, "images_per_request": n,
        "instance_type": instance, "price_per_hour": price, "backend": "onnxruntime", "device": device,
        "max_batch_size": 16, "hardware": f"{instance} box", "mode": mode, "concurrency": concurrency,
        "rate": None, "requests": 200, "ok": 200 - errors, "errors": errors, "latency_mean_ms": p99 / 2,
        "latency_p50_ms": p99 / 2, "latency_p90_ms": p99 * 0.8, "latency_p99_ms": p99, "requests_per_s": rps,
        "images_per_s": rps * n, "cost_performance_kimg_per_usd": rps * n * 3.6 / price,
    }  # fmt: skip


RECORDS = [
    # A: squeezenet on c7i.large. c=4 is the best level within 200 ms; c=8 is too slow; c=16 errs.
    level("squeezenet1_1", "c7i.large", 50, 30, concurrency=1),
    level("squeezenet1_1", "c7i.large", 90, 120, concurrency=4),
    level("squeezenet1_1", "c7i.large", 95, 350, concurrency=8),
    level("squeezenet1_1", "c7i.large", 200, 150, concurrency=16, errors=5),
    # B: resnet50 on a GPU: fast and dear.
    level("resnet50", "g4dn.xlarge", 300, 50, concurrency=8, device="cuda"),
    # C: resnet50 on c7i.large never meets 200 ms.
    level("resnet50", "c7i.large", 12, 250, concurrency=1),
    # D: resnet50 on c7i.xlarge meets it at 25 req/s.
    level("resnet50", "c7i.xlarge", 25, 150, concurrency=2),
    # E: 8 images per request: answers only for requests of 8 images.
    level("squeezenet1_1", "c7i.large", 40, 100, n=8, concurrency=2),
]


def test_cheapest_feasible_first_with_instances_and_monthly_cost() -> None:
    rec = recommend(RECORDS, p99_ms=200, qps=100, headroom=0.7, images_per_request=1)
    got = [(o.model, o.instance_type, o.load, o.instances) for o in rec.options]
    assert got == [
        ("squeezenet1_1", "c7i.large", "c=4", 2),  # 100 / (90 x 0.7) = 1.59 -> 2
        ("resnet50", "g4dn.xlarge", "c=8", 1),  # 100 / 210 -> 1
        ("resnet50", "c7i.xlarge", "c=2", 6),  # 100 / 17.5 = 5.7 -> 6
    ]
    assert [o.monthly_cost for o in rec.options] == pytest.approx(
        [2 * 0.08925 * 730, 1 * 0.526 * 730, 6 * 0.1785 * 730]
    )
    assert rec.options[0].capacity_rps == 90 and rec.options[0].planned_rps == pytest.approx(63)
    assert len(rec.rejected) == 1 and rec.rejected[0].startswith("resnet50 bs=1 c7i.large")


def test_each_precision_is_an_option_of_its_own() -> None:
    fp32 = {**level("resnet50", "c7i.large", 10, 150, concurrency=2), "backend": "openvino", "precision": "fp32"}
    bf16 = {**level("resnet50", "c7i.large", 20, 150, concurrency=2), "backend": "openvino", "precision": "bf16"}
    rec = recommend([fp32, bf16], p99_ms=200, qps=30, images_per_request=1)
    assert [(o.precision, o.instances) for o in rec.options] == [("bf16", 3), ("fp32", 5)]


def test_model_filter_budget_and_headroom_change_the_answer() -> None:
    only_resnet = recommend(RECORDS, p99_ms=200, qps=100, models=["resnet50"], images_per_request=1)
    assert only_resnet.options[0].instance_type == "g4dn.xlarge"
    # A looser budget admits c=8 for squeezenet (95 req/s) and resnet50 on c7i.large.
    loose = recommend(RECORDS, p99_ms=400, qps=100, headroom=1.0, images_per_request=1)
    first = loose.options[0]
    assert (first.model, first.load, first.instances) == ("squeezenet1_1", "c=8", 2)
    assert any(o.model == "resnet50" and o.instance_type == "c7i.large" for o in loose.options)
    # Allowing errors admits the c=16 level: 200 req/s at headroom 1 -> one instance.
    lenient = recommend(RECORDS, p99_ms=200, qps=100, headroom=1.0, images_per_request=1, max_error_rate=0.05)
    assert (lenient.options[0].load, lenient.options[0].instances) == ("c=16", 1)
    # Requests of 8 images: only the 8-image measurement answers.
    eight = recommend(RECORDS, p99_ms=200, qps=10, images_per_request=8)
    assert [(o.model, o.images_per_request) for o in eight.options] == [("squeezenet1_1", 8)]
    # Nothing meets 10 ms.
    assert recommend(RECORDS, p99_ms=10, qps=1).options == []
    with pytest.raises(ValueError):
        recommend(RECORDS, p99_ms=200, qps=100, headroom=1.5)


def test_recommend_cli_json_and_table(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    runner = CliRunner()
    result = runner.invoke(
        app, ["bench", "recommend", str(path), "--p99", "0.2s", "--qps", "100", "--images-per-request", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["p99_ms"] == 200 and data["headroom"] == 0.7
    assert [o["instance_type"] for o in data["options"]] == ["c7i.large", "g4dn.xlarge", "c7i.xlarge"]
    assert data["options"][0]["monthly_cost"] == pytest.approx(130.31, abs=0.01)
    table = runner.invoke(app, ["bench", "recommend", str(path), "--p99", "200ms", "--qps", "100"])
    assert table.exit_code == 0 and "squeezenet1_1" in table.stdout and "$130.31" in table.stdout


def test_report_is_one_self_contained_html_page(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    seed = [dict(r, mode="seed", concurrency=1) for r in RECORDS[:2]]
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS + seed))
    out = tmp_path / "report.html"
    result = CliRunner().invoke(
        app, ["bench", "report", str(path), "--out", str(out), "--p99", "200ms", "--qps", "100"]
    )
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # The 2018 figure, accuracy vs images per dollar (zoo networks: published top-1) and the curves, inline.
    assert page.count("<svg") == 3
    assert "published, for the named weights" in page
    assert "src=" not in page and "href=\"http" not in page  # nothing fetched from elsewhere
    assert "c7i.large box" in page  # names the hardware
    assert "Recommendation" in page and "$130.31" in page
    assert build_report(RECORDS).count("<svg") == 1  # no seed records: curves only


def searched(model: str, instance: str, capacity: float, target_ms: float, measured_p99: float) -> dict[str, Any]:
    """A capacity search's record: the open-loop record of its highest passing step, with the search's fields."""
    r = level(model, instance, capacity * 0.98, measured_p99, mode="open")
    r.update(rate=capacity, concurrency=None, search="capacity", p99_target_ms=target_ms, capacity_rate=capacity)
    return r


def test_searched_capacities_come_before_measured_levels() -> None:
    # squeezenet on c7i.large: levels say 90 req/s within 200 ms (closed loop, c=4); a search at a 100 ms
    # target found 60 req/s; one at 300 ms (looser than the budget) found 120 req/s and does not count.
    recs = RECORDS + [
        searched("squeezenet1_1", "c7i.large", 60, 100, 80),
        searched("squeezenet1_1", "c7i.large", 120, 300, 280),
    ]
    rec = recommend(recs, p99_ms=200, qps=100, headroom=0.7, images_per_request=1)
    squeeze = next(o for o in rec.options if o.model == "squeezenet1_1")
    assert (squeeze.basis, squeeze.capacity_rps, squeeze.load) == ("searched", 60, "searched p99<=100ms")
    assert squeeze.instances == 3  # 100 / (60 x 0.7) = 2.4
    # Configurations without a search keep their levels.
    assert {o.basis for o in rec.options if o.model == "resnet50"} == {"levels"}
    # At a budget tighter than every search's target, the levels decide again.
    tight = recommend(recs, p99_ms=90, qps=10, headroom=0.7, images_per_request=1)
    squeeze = next(o for o in tight.options if o.model == "squeezenet1_1")
    assert (squeeze.basis, squeeze.load) == ("levels", "60/s")  # the search's own step, p99 80 ms, as a level


def test_min_top1_keeps_networks_whose_published_accuracy_is_high_enough(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))  # read() adds the published accuracy
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "recommend", str(path), "--p99", "200ms", "--qps", "100", "--min-top1", "75",
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {o["model"] for o in data["options"]} == {"resnet50"}  # squeezenet1_1: 58.2% published
    assert all(o["published_top1"] == 80.858 for o in data["options"])
    assert "squeezenet1_1: published top-1 58.178% < 75%" in data["rejected"]
    table = runner.invoke(app, ["bench", "recommend", str(path), "--p99", "200ms", "--qps", "100", "--min-top1", "75"])
    assert table.exit_code == 0 and "80.9" in table.stdout and "squeezenet1_1" not in table.stdout
    bad = runner.invoke(app, ["bench", "recommend", str(path), "--p99", "200ms", "--qps", "100", "--min-top1", "175"])
    assert bad.exit_code == 2 and "percentage" in bad.output


def test_the_report_tells_machines_apart_and_keeps_a_margin() -> None:
    import re

    from saikyo.bench.report import machines

    page = build_report(RECORDS)
    named = machines(RECORDS)
    assert list(named) == list(dict.fromkeys(r["hardware"] for r in RECORDS)) and len(named) >= 3
    assert f"These records come from {len(named)} machines" in page
    for hw, letter in named.items():
        assert f"{letter} = {hw}" in page
    # Every row of the records table starts with its machine's letter, as many rows per letter as records.
    body = page.split("<h2>All records</h2>", 1)[1]
    letters = re.findall(r'<tr><td class="l">([A-Z])</td>', body)
    assert sorted(letters) == sorted(named[r["hardware"]] for r in RECORDS)
    assert "padding: 0 2rem" in page and 'class="scroll"' in page
    one = build_report([r for r in RECORDS if r["hardware"] == "c7i.large box"])
    assert "These records come from" not in one  # one machine: nothing to warn about
