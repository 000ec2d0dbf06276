"""Downloaded model versions on local disk, shared by every saikyo process on the machine.

    <root>/versions/<digest>/model.onnx + meta.json (+ weights.pt)   one directory per version's content
    <root>/versions/<digest>/.verified                                each file's size, mtime and inode when checked
    <root>/locks/<digest>.lock                                        held shared while a process uses it
    <root>/locks/<digest>.download                                    held by the one process downloading it
    <root>/staging/download-*/ (+ download-*.lock)                    downloads in progress, each locked

Keyed by the sha256 of the version's meta.json (which pins every file's digest): a second server, a
restart or a Ray replica on the same machine finds the version here and downloads nothing; servers
starting together download it once (the others wait on the download lock, then find it). A download
lands in staging, is fsynced and renamed into place whole, so a version directory is complete or
absent, after a crash too. Every use checks each file's size, and its sha256 again when the file
changed (size, mtime or inode) since it was last checked: a file truncated or rewritten in the cache
is never served; the version is dropped and downloaded again. Bounded: after each download the least
recently used versions are removed until the cache, staging included, fits `max_bytes`, skipping every
version a process holds (its lock file is locked shared by the holder; eviction needs it exclusive,
without waiting). A staging directory whose lock nobody holds was left by a process that died: it is
removed on first use. Locks are fcntl.flock: they end with their process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from saikyo.models.provenance import sha256_file
from saikyo.models.repository import META_FILE

log = logging.getLogger(__name__)

VERIFIED_FILE = ".verified"


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
        self._staging_locks: dict[Path, int] = {}  # staging directory -> its held lock's descriptor
        self._cleaned = False

    def _lock_path(self, key: str) -> Path:
        return self._locks / f"{key}.lock"

    def pin(self, key: str) -> Pin:
        """Hold `key` (present or about to be downloaded) against eviction until the Pin is released."""
        for d in (self._versions, self._locks, self._staging):
            d.mkdir(parents=True, exist_ok=True)
        if not self._cleaned:  # once per process: what a download that died left behind
            self._cleaned = True
            self._remove_stale_staging()
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

    def lookup(self, key: str, files: Mapping[str, tuple[str, int | None]] | None = None) -> Path | None:
        """The cached version's directory, marked as just used; None when it is not here. With `files`
        (name -> (sha256, bytes or None)) each is checked first; a version that fails is dropped."""
        d = self._versions / key
        if not (d / META_FILE).is_file():
            return None
        if files is not None:
            problem = self._check(d, files)
            if problem is not None:
                log.warning("model cache: %s of %s; dropping it to download it again", problem, key[:12])
                self._drop(key)
                return None
        with contextlib.suppress(OSError):
            os.utime(d)
        return d

    def _check(self, d: Path, files: Mapping[str, tuple[str, int | None]]) -> str | None:
        """What is wrong with the version's files, or None. The sha256 is read again only for a file whose
        size, mtime or inode changed since it was last checked."""
        try:
            verified = json.loads((d / VERIFIED_FILE).read_text())
        except (OSError, ValueError):
            verified = {}
        seen, changed = {}, False
        for name, (digest, size) in files.items():
            try:
                st = os.stat(d / name)
            except OSError:
                return f"{name} is missing"
            if size is not None and st.st_size != size:
                return f"{name} is {st.st_size} bytes, its meta.json says {size}"
            seen[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
            if verified.get(name) != seen[name]:
                if sha256_file(d / name) != digest:
                    return f"{name} does not match its sha256"
                changed = True
        if changed or set(verified) != set(seen):
            _write_atomically(d / VERIFIED_FILE, json.dumps(seen).encode())
        return None

    def _drop(self, key: str) -> None:
        trash = self._staging / f"corrupt-{key}-{uuid.uuid4().hex}"
        with contextlib.suppress(OSError):
            os.rename(self._versions / key, trash)
            shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def downloading(self, key: str) -> Iterator[None]:
        """Held while this process downloads `key`: another process that wants it waits, then finds it."""
        self._locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._locks / f"{key}.download", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def staging(self) -> Path:
        """A new directory for a download, locked (beside it) until it is committed or discarded."""
        self._staging.mkdir(parents=True, exist_ok=True)
        # The lock first, the directory second: another process's cleanup removes any directory whose lock
        # it can take, so a directory must never exist, even for an instant, with its lock not yet held.
        while True:
            fd, lock = tempfile.mkstemp(prefix="download-", suffix=".lock", dir=self._staging)
            fcntl.flock(fd, fcntl.LOCK_EX)
            d = Path(lock.removesuffix(".lock"))
            try:
                d.mkdir()
            except FileExistsError:  # a dead download's directory that happens to have this name
                os.close(fd)
                continue
            self._staging_locks[d] = fd
            return d

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)
        self._unlock_staging(staging)

    def _unlock_staging(self, staging: Path) -> None:
        fd = self._staging_locks.pop(staging, None)
        if fd is not None:
            staging.with_name(staging.name + ".lock").unlink(missing_ok=True)
            os.close(fd)

    def commit(self, staging: Path, key: str, files: Mapping[str, tuple[str, int | None]] | None = None) -> Path:
        """Move a finished download (its files checked against `files`) into place, on disk for good
        before it is visible (another process may have been first: then keep theirs), then make room."""
        d = self._versions / key
        try:
            if files is not None:
                stats = {n: os.stat(staging / n) for n in files}
                record = {n: [st.st_size, st.st_mtime_ns, st.st_ino] for n, st in stats.items()}
                _write_atomically(staging / VERIFIED_FILE, json.dumps(record).encode())
            for f in staging.iterdir():
                _fsync(f)
            _fsync(staging)
            try:
                os.rename(staging, d)
            except OSError:
                if not (d / META_FILE).is_file():
                    raise
                shutil.rmtree(staging, ignore_errors=True)
            _fsync(self._versions)
        finally:
            self._unlock_staging(staging)
        self.evict()
        return d

    def size_bytes(self) -> int:
        """Versions and downloads in progress: both take the disk the budget is for."""
        return sum(_tree_bytes(d) for d in (self._versions, self._staging) if d.is_dir())

    def evict(self) -> list[str]:
        """Remove least recently used versions no process holds until the cache fits; returns their keys."""
        if not self._versions.is_dir():
            return []
        self._remove_stale_staging()
        entries = []
        for d in self._versions.iterdir():
            with contextlib.suppress(OSError):
                entries.append((d.stat().st_mtime, d.name, _tree_bytes(d)))
        total = sum(size for _, _, size in entries) + (_tree_bytes(self._staging) if self._staging.is_dir() else 0)
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
            self._locks.joinpath(f"{key}.download").unlink(missing_ok=True)
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("model cache: evicted %s", key[:12])
        return True

    def _remove_stale_staging(self) -> None:
        """Staging directories whose lock no process holds: downloads that died with their process."""
        if not self._staging.is_dir():
            return
        for d in self._staging.iterdir():
            if not d.is_dir() or d in self._staging_locks:
                continue
            lock = d.with_name(d.name + ".lock")
            with contextlib.suppress(OSError):
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a download in progress
                finally:
                    os.close(fd)
                log.info("model cache: removing %s, left by a download that did not finish", d.name)
                shutil.rmtree(d, ignore_errors=True)
                lock.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tree_bytes(d: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(d):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, n)).st_size
    return total
