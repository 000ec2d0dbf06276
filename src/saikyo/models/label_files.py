"""A model's class names from the files people have: text (one per line), a JSON list, a JSON object
{index: name}, or a Hugging Face config.json (id2label). Stored in a version as labels.txt."""

from __future__ import annotations

import json
from pathlib import Path

from saikyo.inference import labels as imagenet
from saikyo.models.errors import ImportRejected, RepositoryError
from saikyo.models.repository import Entry

LABELS_FILE = "labels.txt"
MAX_LABELS_BYTES = 8 << 20
MAX_LABEL_CHARS = 512


def read_labels(path: Path, num_classes: int) -> list[str]:
    """The names in `path`, one per class in index order; ImportRejected unless there are exactly
    `num_classes` of them, each a non-empty line of text."""
    text = read_text(path, MAX_LABELS_BYTES, "labels")
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{"):
        try:
            labels = _from_json(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise ImportRejected(f"labels file {path} starts like JSON but is not: {exc}") from None
    else:
        labels = text.splitlines()
        while labels and not labels[-1].strip():
            labels.pop()
        labels = [line.strip() for line in labels]
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip() or "\n" in label or "\r" in label:
            raise ImportRejected(f"labels file {path}: label {i} is {label!r}; expected a non-empty name on one line")
        if len(label) > MAX_LABEL_CHARS:
            raise ImportRejected(f"labels file {path}: label {i} is {len(label)} characters; the limit is {MAX_LABEL_CHARS}")
    if len(labels) != num_classes:
        raise ImportRejected(f"labels file {path} holds {len(labels)} labels; the model has {num_classes} classes")
    return [label.strip() for label in labels]


def _from_json(data: object, path: Path) -> list[str]:
    if isinstance(data, dict) and "id2label" in data:
        data = data["id2label"]  # a Hugging Face config.json
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        try:
            by_index = {int(k): v for k, v in data.items()}
        except ValueError:
            raise ImportRejected(f"labels file {path} is a JSON object whose keys are not class indices (e.g. {next(iter(data))!r}); expected {{\"0\": \"name\", ...}} or id2label") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise ImportRejected(f"labels file {path}: the indices are not 0..{len(by_index) - 1} without gaps")
        return [by_index[i] for i in range(len(by_index))]
    raise ImportRejected(f"labels file {path} holds a JSON {type(data).__name__}; expected a list of names, {{index: name}} or a config.json with id2label")


def write_labels(labels: list[str], path: Path) -> Path:
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    return path


def read_text(path: Path, limit: int, what: str) -> str:
    try:
        size = path.stat().st_size
        if size > limit:
            raise ImportRejected(f"{what} file {path} is {size} bytes; the limit is {limit}")
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ImportRejected(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ImportRejected(f"{what} file {path} is not UTF-8 text") from None


def labels_for(entry: Entry, num_classes: int) -> tuple[str, ...] | None:
    """The class names a loaded version answers with: its own labels file (an imported model's), ImageNet's
    for a 1000-class network that was not imported, else None (answers carry class indices only)."""
    own = entry.meta.get("labels")
    if isinstance(own, str) and own:
        if Path(own).name != own:
            raise RepositoryError(f"{entry.name}: meta.json names the labels file {own!r}; expected a file name")
        path = entry.path.parent / own
        names = tuple(read_text(path, MAX_LABELS_BYTES, "labels").splitlines())
        if len(names) != num_classes:
            raise RepositoryError(f"{entry.name}: {own} holds {len(names)} labels for {num_classes} classes")
        return names
    if entry.meta.get("family") != "imported" and num_classes == len(imagenet.NAMES):
        return imagenet.NAMES
    return None
