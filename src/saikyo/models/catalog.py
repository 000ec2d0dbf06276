"""The zoo beside the repository: which models exist, which are exported, with what weights."""

from __future__ import annotations

from typing import Any

from saikyo.models import zoo
from saikyo.models.repository import ModelRepository


def list_models(repository: ModelRepository) -> list[dict[str, Any]]:
    """One row per zoo model and per exported variant (NAME-int8), in zoo order."""
    exported = set(repository.names())
    rows = []
    for spec in zoo.ZOO.values():
        rows.append(_row(repository, spec, spec.name, spec.name in exported, spec.description))
        for variant in zoo.VARIANTS:
            name = zoo.variant_name(spec.name, variant)
            if name in exported:
                rows.append(_row(repository, spec, name, True, f"{spec.description}, {variant} quantised"))
    return rows


def _row(repository: ModelRepository, spec: zoo.ModelSpec, name: str, exported: bool, description: str) -> dict:
    entry = repository.get(name) if exported else None
    return {
        "name": name,
        "family": spec.family,
        "exported": exported,
        "weights": entry.meta.get("weights") if entry else None,
        "size_mb": round(entry.size_bytes / 1e6, 1) if entry else None,
        "input_size": spec.preprocessing.input_size,
        "description": description,
    }
