"""Cost arithmetic and the price table."""

from __future__ import annotations

import pytest

from saikyo.bench.cost import (
    UnknownInstanceType,
    cost_performance,
    default_instance_type,
    instances_needed,
    load_prices,
    monthly_cost,
    resolve_pricing,
)


def test_cost_performance_is_thousand_images_per_dollar() -> None:
    # 10 images/s for an hour is 36,000 images; at $0.36/h that is 100,000 images per dollar.
    assert cost_performance(10.0, 0.36) == pytest.approx(100.0)
    # The 2018 shape: 8 images in 0.5 s on a $0.90/h GPU -> 16 img/s -> 64 thousand images per $.
    assert cost_performance(8 / 0.5, 0.90) == pytest.approx(64.0)
    with pytest.raises(ValueError):
        cost_performance(1.0, 0.0)


def test_instances_needed_applies_headroom_and_rounds_up() -> None:
    assert instances_needed(100, 50, headroom=1.0) == 2
    assert instances_needed(100, 50, headroom=0.7) == 3  # 100 / 35 = 2.86
    assert instances_needed(70, 100, headroom=0.7) == 1  # exactly full, float noise must not add one
    assert instances_needed(0.5, 100) == 1
    with pytest.raises(ValueError):
        instances_needed(10, 10, headroom=0)
    with pytest.raises(ValueError):
        instances_needed(10, 0)


def test_monthly_cost_uses_730_hours() -> None:
    assert monthly_cost(3, 0.1) == pytest.approx(219.0)
    assert monthly_cost(1, 1.0, hours=24) == 24.0


def test_bundled_table_has_cpu_gpu_and_inferentia_rows_with_provenance() -> None:
    table = load_prices()
    for name in ("c7i.large", "c7i.xlarge", "c6i.large", "m7i.large", "c7g.large", "g4dn.xlarge", "g5.xlarge",
                 "g6.xlarge", "inf2.xlarge"):  # fmt: skip
        row = table.get(name)
        assert row.price_per_hour > 0
        assert row.vcpus and row.memory_gib
        assert row.region == "us-east-1" and row.as_of and "AWS" in row.source
    assert table.get("c7i.large").vcpus == 2 and table.get("c7i.large").accelerator == ""
    assert "T4" in table.get("g4dn.xlarge").accelerator
    assert "Inferentia2" in table.get("inf2.xlarge").accelerator
    # Sizes within a family scale linearly in price.
    assert table.get("c7i.xlarge").price_per_hour == pytest.approx(2 * table.get("c7i.large").price_per_hour)
    # The H200 rows: the 8-GPU instance and one GPU's share of it, each dated and sourced.
    whole, share = table.get("p5en.48xlarge"), table.get("p5en.48xlarge-1gpu")
    assert "8x NVIDIA H200" in whole.accelerator and "1x NVIDIA H200" in share.accelerator
    assert share.price_per_hour == pytest.approx(whole.price_per_hour / 8)
    assert (share.vcpus, share.memory_gib) == (whole.vcpus // 8, whole.memory_gib / 8)
    assert share.as_of == whole.as_of == "2026-08" and "not re-checked" in share.source


def test_user_file_merges_over_the_bundled_table(tmp_path) -> None:
    user = tmp_path / "prices.toml"
    user.write_text(
        '[meta]\nregion = "eu-west-1"\nas_of = "2026-01"\nsource = "my invoice"\n'
        '[instances."c7i.large"]\nprice_per_hour = 0.1\n'
        '[instances."onprem.box"]\nvcpus = 64\nmemory_gib = 256\nprice_per_hour = 1.5\n'
    )
    table = load_prices(user)
    c7i = table.get("c7i.large")
    assert c7i.price_per_hour == 0.1 and c7i.vcpus == 2  # price overridden, the rest kept
    assert c7i.region == "eu-west-1" and c7i.source == "my invoice"
    assert table.get("onprem.box").price_per_hour == 1.5
    assert table.get("g5.xlarge").price_per_hour == pytest.approx(1.006)  # untouched rows stay


def test_resolve_pricing_precedence(tmp_path) -> None:
    assert resolve_pricing("c7i.large").price_per_hour == pytest.approx(0.08925)
    override = resolve_pricing("c7i.large", price_per_hour=0.05)
    assert override.price_per_hour == 0.05 and override.instance_type == "c7i.large"
    assert override.source == "--price-per-hour"
    assert resolve_pricing(None, 0.2).instance_type == "custom"
    none = resolve_pricing(None)
    assert none.price_per_hour is None and none.cost_performance(100.0) is None
    with pytest.raises(UnknownInstanceType, match="c7i.large"):
        resolve_pricing("x99.huge")


def test_default_instance_type_by_cores() -> None:
    assert default_instance_type(2) == "c7i.large"
    assert default_instance_type(4) == "c7i.xlarge"
    assert default_instance_type(1) == "c7i.large"
    assert default_instance_type(6) == "c7i.2xlarge"
