"""Downloaded model versions on local disk, shared by every saikyo process on the machine.

    <root>/versions/<digest>/model.onnx + meta.json (+ weights.pt)   one directory per version's content
    <root>/locks/<digest>.lock                                        held shared while a process uses it
    <root>/staging/                                                   downloads in progress

Keyed by the sha256 of the version's meta.json (which pins every file's digest): a second server, a
restart or a Ray replica on the same machine finds the version here and downloads nothing. A download
lands in staging and is renamed into place whole, so a version directory is complete or absent.
Bounded: after each download the least recently used versions are removed until the cache fits
`max_bytes`, skipping every version a process holds (its lock file is locked shared by the holder;
eviction needs it exclusive, without waiting). Locks are fcntl.flock: they end with their process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from saikyo.models.repository import META_FILE

log = logging.getLogger(__name__)

# A staging directory untouched this long belongs to a download that died with its process.
STALE_STAGING_S = 24 * 3600


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saikyo" / "models"


class Pin:
    """A shared lock on one cached version: while held, no process evicts it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


class ModelCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._versions = self.root / "versions"
        self._locks = self.root / "locks"
        self._staging = self.root / "staging"

    def _lock_path(self, key: str) -> Path:
        return self._locks / f"{key}.lock"

    def pin(self, key: str) -> Pin:
        """Hold `key` (present or about to be downloaded) against eviction until the Pin is released."""
        for d in (self._versions, self._locks, self._staging):
            d.mkdir(parents=True, exist_ok=True)
        path = self._lock_path(key)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an eviction of this key runs
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return Pin(fd)
            except FileNotFoundError:
                pass
            os.close(fd)  # an eviction removed the lock file we opened: take the new one

    def lookup(self, key: str) -> Path | None:
        """The cached version's directory, marked as just used; None when it is not here."""
        d = self._versions / key
        if not (d / META_FILE).is_file():
            return None
        with contextlib.suppress(OSError):
            os.utime(d)
        return d

    def staging(self) -> Path:
        self._staging.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="download-", dir=self._staging))

    def commit(self, staging: Path, key: str) -> Path:
        """Move a finished download into place (another process may have been first: then keep theirs),
        then make room."""
        d = self._versions / key
        try:
            os.rename(staging, d)
        except OSError:
            if not (d / META_FILE).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
        self.evict()
        return d

    def size_bytes(self) -> int:
        return sum(_tree_bytes(d) for d in self._versions.iterdir()) if self._versions.is_dir() else 0

    def evict(self) -> list[str]:
        """Remove least recently used versions no process holds until the cache fits; returns their keys."""
        if not self._versions.is_dir():
            return []
        self._remove_stale_staging()
        entries = []
        for d in self._versions.iterdir():
            with contextlib.suppress(OSError):
                entries.append((d.stat().st_mtime, d.name, _tree_bytes(d)))
        total = sum(size for _, _, size in entries)
        evicted = []
        for _, key, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if self._evict_one(key):
                total -= size
                evicted.append(key)
        if total > self.max_bytes:
            log.warning(
                "model cache %s holds %.0f MB, over its %.0f MB budget: every version left is in use",
                self.root, total / 1e6, self.max_bytes / 1e6,
            )  # fmt: skip
        return evicted

    def _evict_one(self, key: str) -> bool:
        path = self._lock_path(key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # some process holds it
            trash = self._staging / f"evicted-{key}-{uuid.uuid4().hex}"
            try:
                os.rename(self._versions / key, trash)
            except FileNotFoundError:
                return False
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("model cache: evicted %s", key[:12])
        return True

    def _remove_stale_staging(self) -> None:
        if not self._staging.is_dir():
            return
        cutoff = time.time() - STALE_STAGING_S
        for d in self._staging.iterdir():
            with contextlib.suppress(OSError):
                if d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)


def _tree_bytes(d: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(d):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, n)).st_size
    return total
