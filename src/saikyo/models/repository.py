"""The model repository: one directory per model, numbered versions beneath it.

    <root>/<name>/<version>/model.onnx + meta.json (+ weights.pt)    published by `saikyo models push`
    <root>/<name>/model.onnx + meta.json (+ weights.pt)              unversioned: version 1

Triton-like layout so that a person can inspect, copy or delete a model with ordinary tools. A version
is visible once its meta.json is there, and meta.json is always written last: it carries the sha256 of
every other file of the version, so whoever downloads them can check what arrived.

`Repository` is the interface the server, the CLI and the cost lab use; `ModelRepository` is a local
directory, `models.s3.S3Repository` a bucket prefix (`models.location.open_repository` picks one).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saikyo.models import zoo
from saikyo.settings import DEFAULT_LOCATION
from saikyo.models.errors import ModelNotExported, RepositoryError, VersionNotFound
from saikyo.models.provenance import sha256_file
from saikyo.models.tunings import MAX_TUNING_BYTES, MAX_TUNING_FILES, TUNINGS_DIR
from saikyo.models.serving import SERVING_KEY, parse_serving

MODEL_FILE = "model.onnx"
META_FILE = "meta.json"
# The same network's torch state dict, beside model.onnx: the torch runner loads exactly these weights.
WEIGHTS_FILE = "weights.pt"
# What an unversioned model directory counts as.
UNVERSIONED = 1


@dataclass(frozen=True)
class Version:
    """One version as a listing shows it, without reading it."""

    name: str
    number: int
    model_bytes: int


@dataclass(frozen=True)
class VersionMeta:
    """A version's meta.json, read: enough to decide whether to load it, before any download."""

    name: str
    version: int
    meta: dict[str, Any]
    digest: str  # sha256 of meta.json as stored; it pins every file's digest, so it names the version's content
    where: str = field(repr=False)  # the directory or key prefix holding the version's files
    raw: bytes = field(repr=False, compare=False, default=b"")


@dataclass(frozen=True)
class Entry:
    """A version whose files are on this machine: what a runner loads."""

    name: str
    path: Path  # the model.onnx file
    meta: dict[str, Any]
    version: int = UNVERSIONED
    digest: str = ""
    # Lets the repository's cache evict the files again (models/cache.py); None when nothing holds them.
    on_release: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def release(self) -> None:
        """Whoever loaded the entry is done with its files."""
        if self.on_release is not None:
            self.on_release()


class Repository(abc.ABC):
    """Where models are published. Implementations list, read and write; the rest is shared here."""

    location: str  # as the user wrote it: every message names it

    # ---- what an implementation provides ----
    @abc.abstractmethod
    def listing(self, name: str | None = None) -> list[Version]:
        """Every visible version (meta.json present), or those of one model."""

    @abc.abstractmethod
    def _read_meta(self, version: Version) -> tuple[bytes, str]:
        """A listed version's meta.json as stored, and where its files are."""

    @abc.abstractmethod
    def fetch(self, ref: VersionMeta) -> Entry:
        """The version's files on this machine (downloaded and checked when they are remote)."""

    @abc.abstractmethod
    def _publish(self, name: str, version: int, files: Sequence[Path], meta: bytes) -> None:
        """Copy `files` in as version `version`, then meta.json; refuse a version that exists."""

    def check(self) -> None:
        """Raise RepositoryError, naming the location, when the repository cannot be read at all."""

    def fix(self, name: str) -> str:
        """The command that puts `name` here."""
        return export_command(name, self.location)

    # ---- tunings (models/tunings.py): <name>/tunings/<cpu>.json, beside the versions ----
    @abc.abstractmethod
    def tuning_files(self, name: str) -> list[str]:
        """The file names under <name>/tunings/ (at most tunings.MAX_TUNING_FILES)."""

    @abc.abstractmethod
    def read_tuning(self, name: str, file: str) -> bytes | None:
        """One tuning file as stored (at most tunings.MAX_TUNING_BYTES + 1 bytes), None when absent."""

    @abc.abstractmethod
    def write_tuning(self, name: str, file: str, data: bytes) -> str:
        """Write (or replace) one tuning file whole; returns where it went."""

    # ---- shared ----
    def names(self) -> list[str]:
        return sorted({v.name for v in self.listing()})

    def versions(self, name: str) -> list[int]:
        return sorted(v.number for v in self.listing(name) if v.name == name)

    def has(self, name: str) -> bool:
        return bool(self.versions(name))

    def resolve(self, name: str, version: int | None = None) -> VersionMeta:
        """Read the meta.json of `version` (default: the latest) of `name`."""
        listed = {v.number: v for v in self.listing(name) if v.name == name}
        if not listed:
            raise ModelNotExported(name, self.location, self.fix(name))
        number = max(listed) if version is None else version
        if number not in listed:
            raise VersionNotFound(name, self.location, number, sorted(listed))
        raw, where = self._read_meta(listed[number])
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RepositoryError(f"{name} version {number} in {self.location}: meta.json is not JSON") from None
        if not isinstance(meta, dict):
            raise RepositoryError(f"{name} version {number} in {self.location}: meta.json is not a JSON object")
        return VersionMeta(name, number, meta, hashlib.sha256(raw).hexdigest(), where, raw)

    def get(self, name: str, version: int | None = None) -> Entry:
        return self.fetch(self.resolve(name, version))

    def next_version(self, name: str) -> int:
        return max(self.versions(name), default=0) + 1

    def publish(self, name: str, files: Sequence[Path], meta: dict[str, Any], version: int | None = None) -> int:
        """Publish `files` (model.onnx first, weights.pt beside it) as `version` (default: the next one)
        of `name`, with `meta` plus every file's digest; returns the version number."""
        number = self.next_version(name) if version is None else version
        if number < 1:
            raise RepositoryError(f"versions are positive integers, not {number}")
        if number in self.versions(name):
            raise RepositoryError(f"{name} version {number} already exists in {self.location}; published versions are never replaced")
        self._publish(name, number, files, _meta_bytes(with_digests(meta, files)))
        return number

    def configure(self, name: str, serving: dict[str, Any]) -> int:
        """Give the latest version of `name` the serving block `serving` (none when empty), checked
        first: published as the next version, with the same files, since versions are never replaced.
        Returns the version that has it. ServingConfigError, and nothing written, for a bad block."""
        block = parse_serving(serving).overrides()
        ref = self.resolve(name)
        entry = self.fetch(ref)
        try:
            files = [entry.path.parent / f for f in sorted(file_digests(ref), key=lambda f: f != MODEL_FILE)]
            meta = {**configured_meta(ref, block), "configured_from": f"version {ref.version}"}
            return self.publish(name, files, meta)
        finally:
            entry.release()


def configured_meta(ref: VersionMeta, serving: dict[str, Any]) -> dict[str, Any]:
    """`ref`'s meta.json with `serving` as its block (none when empty), its file digests left to publish."""
    meta = {k: v for k, v in ref.meta.items() if k not in ("files", SERVING_KEY)}
    if serving:
        meta[SERVING_KEY] = serving
    return meta


def with_digests(meta: dict[str, Any], files: Sequence[Path]) -> dict[str, Any]:
    """`meta` with `files`: each file's sha256 and size, what a downloader checks what it got against."""
    return {**meta, "files": {Path(p).name: {"sha256": sha256_file(Path(p)), "bytes": Path(p).stat().st_size} for p in files}}


def file_digests(ref: VersionMeta) -> dict[str, str]:
    """File name -> sha256 for every file of a version, from its meta.json. Exports older than versioning
    give only model.onnx's digest ("sha256"); a meta.json without any cannot be checked, so is refused."""
    files = ref.meta.get("files")
    if isinstance(files, dict) and files:
        digests = {name: info.get("sha256") if isinstance(info, dict) else None for name, info in files.items()}
    elif isinstance(ref.meta.get("sha256"), str):
        digests = {MODEL_FILE: ref.meta["sha256"]}
    else:
        raise RepositoryError(f"{ref.name} version {ref.version}: meta.json lists no file digests; publish it with `saikyo models push`")
    for name, digest in digests.items():
        if Path(name).name != name or name in ("", ".", "..", META_FILE) or not isinstance(digest, str):
            raise RepositoryError(f"{ref.name} version {ref.version}: meta.json lists an unusable file entry {name!r}")
    if MODEL_FILE not in digests:
        raise RepositoryError(f"{ref.name} version {ref.version}: meta.json does not list {MODEL_FILE}")
    return digests


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


# Versions are counted up one at a time: 18 digits is more than any repository reaches, and keeps a
# hostile "4,300 digits" string from costing a big-integer parse (or Python's refusal of one).
MAX_VERSION_DIGITS = 18
# What one path component may hold on the file systems and in the S3 keys a repository lives in.
MAX_NAME_BYTES = 255


def version_number(text: str) -> int | None:
    """The version a directory name or request parameter stands for ("2"), or None ("02", "v2", "tmp",
    "²": str.isdigit() accepts superscripts and other scripts' digits, int() does not)."""
    if not (0 < len(text) <= MAX_VERSION_DIGITS and text.isascii() and text.isdigit() and text[0] != "0"):
        return None
    return int(text)


def _version_dir_name(entry: str) -> int | None:
    return version_number(entry)


class ModelRepository(Repository):
    """A local directory. `write` (what `models export` uses) puts a model in unversioned, as version 1,
    replacing the previous export: a build output. `publish` (`models push`) adds numbered versions
    that are never replaced."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(root)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def model_path(self, name: str) -> Path:
        return self.model_dir(name) / MODEL_FILE

    def listing(self, name: str | None = None) -> list[Version]:
        if name is not None:
            dirs = [self.model_dir(name)] if plain_name(name) else []
        else:
            dirs = sorted(self.root.iterdir()) if self.root.is_dir() else []
        found: list[Version] = []
        for d in dirs:
            if d.name.startswith(".") or not d.is_dir():
                continue
            numbered = {}
            for sub in d.iterdir():
                number = _version_dir_name(sub.name)
                if number is not None and _complete(sub):
                    numbered[number] = sub
            if UNVERSIONED not in numbered and _complete(d):
                numbered[UNVERSIONED] = d
            found += [Version(d.name, n, (p / MODEL_FILE).stat().st_size) for n, p in sorted(numbered.items())]
        return found

    def _version_dir(self, name: str, version: int) -> Path:
        numbered = self.model_dir(name) / str(version)
        return numbered if version != UNVERSIONED or _complete(numbered) else self.model_dir(name)

    def _read_meta(self, version: Version) -> tuple[bytes, str]:
        d = self._version_dir(version.name, version.number)
        try:
            return (d / META_FILE).read_bytes(), str(d)
        except OSError as exc:
            raise RepositoryError(f"cannot read {version.name} version {version.number} in {self.location}: {exc.strerror}") from None

    def fetch(self, ref: VersionMeta) -> Entry:
        return Entry(ref.name, Path(ref.where) / MODEL_FILE, ref.meta, ref.version, ref.digest)

    def _publish(self, name: str, version: int, files: Sequence[Path], meta: bytes) -> None:
        self.model_dir(name).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.{version}.", dir=self.root))
        try:
            for f in files:
                shutil.copy2(f, staging / Path(f).name)
            (staging / META_FILE).write_bytes(meta)
            # The whole version appears at once; a version directory that exists is never replaced.
            os.rename(staging, self.model_dir(name) / str(version))
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if (self.model_dir(name) / str(version)).exists():
                raise RepositoryError(f"{name} version {version} already exists in {self.location}") from None
            raise RepositoryError(f"cannot publish {name} version {version} in {self.location}: {exc.strerror}") from None

    def tuning_files(self, name: str) -> list[str]:
        d = self.model_dir(name) / TUNINGS_DIR
        if not plain_name(name) or not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.suffix == ".json" and p.is_file())[:MAX_TUNING_FILES]

    def read_tuning(self, name: str, file: str) -> bytes | None:
        path = self.model_dir(name) / TUNINGS_DIR / file
        if not (plain_name(name) and plain_name(file)) or not path.is_file():
            return None
        try:
            with open(path, "rb") as f:
                return f.read(MAX_TUNING_BYTES + 1)
        except OSError as exc:
            raise RepositoryError(f"cannot read {path} in {self.location}: {exc.strerror}") from None

    def write_tuning(self, name: str, file: str, data: bytes) -> str:
        if not (plain_name(name) and plain_name(file)):
            raise RepositoryError(f"not a plain file name: {name!r}/{file!r}")
        d = self.model_dir(name) / TUNINGS_DIR
        try:
            d.mkdir(parents=True, exist_ok=True)
            # Written beside, then renamed over: a reader sees the old tuning or the new one, whole.
            with tempfile.NamedTemporaryFile(dir=d, prefix=f".{file}.", delete=False) as f:
                f.write(data)
            os.replace(f.name, d / file)
        except OSError as exc:
            with contextlib.suppress(NameError, OSError):
                os.unlink(f.name)
            raise RepositoryError(f"cannot write {d / file}: {exc.strerror}") from None
        return str(d / file)
    def configure(self, name: str, serving: dict[str, Any]) -> int:
        """As Repository.configure, except for an unversioned export (version 1 as files at the model's
        root, what `models export` writes and replaces): a build output, so its meta.json is rewritten
        in place, in one rename. Its digest changes, which is how a polling server sees it."""
        ref = self.resolve(name)
        if ref.version != UNVERSIONED or Path(ref.where) != self.model_dir(name):
            return super().configure(name, serving)
        meta = {**configured_meta(ref, parse_serving(serving).overrides()), "files": ref.meta.get("files")}
        if meta["files"] is None:
            meta.pop("files")
        fd, tmp = tempfile.mkstemp(prefix=f".{META_FILE}.", dir=ref.where)
        os.close(fd)
        staging = Path(tmp)
        try:
            staging.write_bytes(_meta_bytes(meta))
            os.replace(staging, Path(ref.where) / META_FILE)
        finally:
            staging.unlink(missing_ok=True)
        return UNVERSIONED

    def write(self, name: str, model_file: Path, meta: dict[str, Any], extra_files: Sequence[Path] = ()) -> Entry:
        """Move `model_file` (and `extra_files`, by their names) into <name>/ as its unversioned export,
        with a meta.json that lists their digests. The previous export's meta.json goes first and the new
        one comes last, so no reader sees a half-written version; numbered versions beside it stay."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            moved = [Path(shutil.move(str(model_file), staging / MODEL_FILE))]
            moved += [Path(shutil.move(str(extra), staging / Path(extra).name)) for extra in extra_files]
            (staging / META_FILE).write_bytes(_meta_bytes(with_digests(meta, moved)))
            final = self.model_dir(name)
            final.mkdir(exist_ok=True)
            (final / META_FILE).unlink(missing_ok=True)
            for old in final.iterdir():  # the previous export's files (and derived ones such as ORT's cache)
                if old.is_file():
                    old.unlink()
            for f in moved:
                os.replace(f, final / f.name)
            os.replace(staging / META_FILE, final / META_FILE)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        raw = (final / META_FILE).read_bytes()
        return Entry(name, final / MODEL_FILE, json.loads(raw), UNVERSIONED, hashlib.sha256(raw).hexdigest())


def _complete(d: Path) -> bool:
    return (d / MODEL_FILE).is_file() and (d / META_FILE).is_file()


def plain_name(name: str) -> bool:
    """A model name that is one path component (what a request may name)."""
    return (
        bool(name)
        and len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
    )


def export_command(name: str, location: str | None = None) -> str:
    """The command that puts `name` in the local repository at `location` (default: the default one): the
    fp32 export, the variant's quantisation, or the import of a model the zoo does not know (README: Your
    own model)."""
    base, variant = zoo.split_variant(name)
    where = "" if location in (None, DEFAULT_LOCATION) else f" --repository {shlex.quote(str(location))}"
    spec = zoo.ZOO.get(base)
    if spec is None:
        quantize = f" --quantize {variant}" if variant is not None else ""
        return f"saikyo models import {base} YOUR_MODEL.onnx --labels LABELS_FILE{quantize}{where}"
    if variant is not None:
        return f"saikyo models export {base} --quantize {variant}{where}"
    return f"saikyo models export {base} --weights {spec.default_weights}{where}"
