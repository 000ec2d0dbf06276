"""What can go wrong with a model before it serves: unknown name, not exported, weights or export failing,
a repository that cannot be read."""

from __future__ import annotations

from pathlib import Path


class UnknownModel(KeyError):
    def __init__(self, name: str, known: list[str] | None = None) -> None:
        super().__init__(name)
        self.name = name
        self.known = known or []

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known: {', '.join(sorted(self.known))}"


class ModelNotExported(FileNotFoundError):
    """The repository has no usable entry for the name; `fix` is the command that makes one."""

    def __init__(self, name: str, root: str | Path, fix: str) -> None:
        super().__init__(name)
        self.name = name
        self.root = root
        self.fix = fix

    def __str__(self) -> str:
        return f"model {self.name!r} is not exported in the repository {str(self.root)!r}; run: {self.fix}"


class VersionNotFound(ModelNotExported):
    """The model is in the repository, but not the version asked for."""

    def __init__(self, name: str, root: str | Path, version: int, versions: list[int]) -> None:
        super().__init__(name, root, "")
        self.version = version
        self.versions = versions

    def __str__(self) -> str:
        return f"model {self.name!r} has no version {self.version} in the repository {str(self.root)!r}; versions: {self.versions}"


class RepositoryError(RuntimeError):
    """The repository cannot be read or written: unreachable, refused, missing bucket, unusable location.
    Messages name the location and never carry credentials."""


class CorruptDownload(RepositoryError):
    """A downloaded file did not match the sha256 its meta.json gives, every time it was fetched."""


class ExportError(RuntimeError):
    """The export or its check failed; nothing was written to the repository."""


class WeightsUnavailable(ExportError):
    """The requested weights cannot be had here (offline host, unsupported source, bad file)."""


class ImportRejected(ExportError):
    """A model, labels or preprocessing file given to `models import` that cannot be served as it is: the
    message says what was found and what was expected. Nothing was written."""
