"""The zoo beside the repository: which models exist, which are exported or published, in which versions,
with what weights. Reads listings and meta.json files only: nothing is downloaded."""

from __future__ import annotations

from typing import Any

from saikyo.models import zoo
from saikyo.models.repository import Repository, Version


def list_models(repository: Repository) -> list[dict[str, Any]]:
    """One row per zoo model and per exported variant (NAME-int8), in zoo order, then one per model the
    repository holds that the zoo does not know."""
    versions: dict[str, list[Version]] = {}
    for v in repository.listing():
        versions.setdefault(v.name, []).append(v)
    rows = []
    for spec in zoo.ZOO.values():
        size = spec.preprocessing.input_size
        rows.append(_row(repository, versions, spec.name, spec.family, size, spec.description))
        for variant in zoo.VARIANTS:
            name = zoo.variant_name(spec.name, variant)
            if name in versions:
                rows.append(_row(repository, versions, name, spec.family, size, f"{spec.description}, {variant} quantised"))
    listed = {r["name"] for r in rows}
    for name in sorted(set(versions) - listed):
        rows.append(_row(repository, versions, name, None, None, None))
    return rows


def _row(
    repository: Repository,
    versions: dict[str, list[Version]],
    name: str,
    family: str | None,
    input_size: int | None,
    description: str | None,
) -> dict[str, Any]:
    """One listing row; a model the zoo does not know describes itself (an import: family "imported",
    its source, its classes and labels)."""
    held = sorted(versions.get(name, []), key=lambda v: v.number)
    meta = repository.resolve(name, held[-1].number).meta if held else {}
    return {
        "name": name,
        "family": family or meta.get("family"),
        "exported": bool(held),
        "versions": [v.number for v in held],
        "weights": meta.get("weights"),
        "size_mb": round(held[-1].model_bytes / 1e6, 1) if held else None,
        "input_size": input_size or meta.get("input_size"),
        "description": description or meta.get("description") or "not a zoo model",
        "source": meta.get("source", "zoo" if family else None),
        "num_classes": meta.get("num_classes"),
        "labels": meta.get("labels"),
    }
