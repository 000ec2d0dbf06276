"""A model repository in S3 or an S3-compatible store (SeaweedFS, MinIO, R2, Ceph): s3://bucket/prefix.

Same layout as a local repository (models/repository.py) under the prefix. Credentials come from the
standard AWS chain that boto3 reads (environment, ~/.aws files, the ECS task role, IRSA's web identity),
never from a saikyo setting; `s3_endpoint_url` points at a store other than AWS.

Downloads land in the local cache (models/cache.py) keyed by the version's meta.json digest, so only
meta.json is read again by a restart or a second server. Every file is checked against the sha256 its
meta.json gives while it streams in; a mismatch is retried, and after DOWNLOAD_ATTEMPTS refused: a
corrupt file is never served. Publishing uploads the files first and meta.json last, only if absent
(If-None-Match), so a version appears whole and two pushers cannot both take one number.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saikyo.models.cache import ModelCache
from saikyo.models.errors import CorruptDownload, RepositoryError
from saikyo.models.tunings import MAX_TUNING_BYTES, MAX_TUNING_FILES, TUNINGS_DIR
from saikyo.models.repository import (
    META_FILE,
    MODEL_FILE,
    UNVERSIONED,
    Entry,
    Repository,
    Version,
    VersionMeta,
    export_command,
    file_digests,
    plain_name,
    version_number,
)

log = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 3
MAX_META_BYTES = 1 << 20
_CHUNK = 1 << 20

# What shows a transfer's progress: called with what moves and its size in bytes at the start of each
# file, it returns the function that hears each chunk's byte count (boto3's `Callback` shape).
TransferProgress = Callable[[str, int], Callable[[int], None]]


def parse_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/"); the prefix is "" or ends with "/"."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise RepositoryError(f"{uri!r} is not an S3 location; write s3://bucket/prefix")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def _shown(endpoint: str | None) -> str:
    """The endpoint as messages show it: without any user:password@ it may carry."""
    if not endpoint:
        return "AWS S3"
    parts = urllib.parse.urlsplit(endpoint)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


@dataclass(frozen=True)
class S3Limits:
    """How long one S3 call may take: botocore's defaults (60 s reads, retried) would hold a thread for
    minutes against a store that accepts and never answers."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    max_attempts: int = 3  # the first try included


def _expected_files(ref: VersionMeta, digests: dict[str, str]) -> dict[str, tuple[str, int | None]]:
    """Each file's sha256 and, where meta.json gives it, its size: what a cached copy is checked against."""
    files = ref.meta.get("files")
    sizes = {n: i.get("bytes") for n, i in files.items() if isinstance(i, dict)} if isinstance(files, dict) else {}
    return {n: (d, sizes[n] if isinstance(sizes.get(n), int) and not isinstance(sizes.get(n), bool) else None) for n, d in digests.items()}


class S3Repository(Repository):
    def __init__(self, uri: str, endpoint_url: str | None, cache: ModelCache, limits: S3Limits = S3Limits()) -> None:
        self.location = uri.rstrip("/")
        self.bucket, self.prefix = parse_uri(uri)
        self.endpoint_url = endpoint_url
        self.cache = cache
        self.limits = limits
        self.progress: TransferProgress | None = None  # the CLI sets one (a bar on a terminal)
        self._client: Any = None

    def fix(self, name: str) -> str:
        return f"{export_command(name)} && saikyo models push {name} --to {self.location}"

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise RepositoryError(f"{self.location}: an s3:// repository needs boto3: pip install 'saikyo[s3]'") from None
            config = Config(
                connect_timeout=self.limits.connect_timeout_s,
                read_timeout=self.limits.read_timeout_s,
                retries={"total_max_attempts": self.limits.max_attempts, "mode": "standard"},
                # S3-compatible stores are reached by path (http://host:port/bucket/key): no DNS per bucket.
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            )
            with self._errors():
                self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    # ---- errors: name the location, never the credentials ----
    @contextlib.contextmanager
    def _errors(self, what: str = "") -> Iterator[None]:
        from botocore import exceptions as e

        where = f"{self.location}{f' ({what})' if what else ''}"
        endpoint = _shown(self.endpoint_url)
        try:
            yield
        except e.NoCredentialsError:
            raise RepositoryError(
                f"no AWS credentials for {where}: provide them the standard AWS way (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an ECS task role, IRSA)"
            ) from None
        except (e.EndpointConnectionError, e.ConnectTimeoutError, e.ReadTimeoutError) as exc:
            raise RepositoryError(f"cannot reach the S3 endpoint {endpoint} for {where}: {type(exc).__name__}") from None
        except e.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "")) or "?"
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise RepositoryError(f"the bucket {self.bucket!r} of {where} does not exist at {endpoint}") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
                raise RepositoryError(f"{endpoint} refused the AWS credentials for {where} ({code})") from None
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                raise RepositoryError(
                    f"access to {where} denied ({code}): the credentials need s3:ListBucket on the bucket and "
                    "s3:GetObject on the prefix"
                ) from None
            raise RepositoryError(f"S3 error for {where}: {code} (HTTP {status})") from None
        except e.BotoCoreError as exc:
            raise RepositoryError(f"S3 error for {where}: {type(exc).__name__}") from None

    # ---- reading ----
    def check(self) -> None:
        with self._errors("listing"):
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    def _keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        with self._errors("listing"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"], int(obj.get("Size", 0))

    def listing(self, name: str | None = None) -> list[Version]:
        if name is not None and not plain_name(name):
            return []  # not a name a model can have: nothing to ask the store (keys stop at 1024 bytes)
        files: dict[tuple[str, int, bool], dict[str, int]] = {}
        for key, size in self._keys(self.prefix + (f"{name}/" if name else "")):
            parts = key[len(self.prefix) :].split("/")
            if len(parts) == 2:  # <name>/<file>: unversioned
                files.setdefault((parts[0], UNVERSIONED, False), {})[parts[1]] = size
            elif len(parts) == 3 and (number := version_number(parts[1])) is not None:
                files.setdefault((parts[0], number, True), {})[parts[2]] = size
        visible: dict[tuple[str, int], Version] = {}
        for (model, number, numbered), present in sorted(files.items(), key=lambda kv: kv[0][2]):
            # A numbered 1/ wins over unversioned files (sorted after them, so it overwrites).
            if META_FILE in present and MODEL_FILE in present and not model.startswith("."):
                visible[(model, number)] = Version(model, number, present[MODEL_FILE])
        return [visible[k] for k in sorted(visible)]

    def _prefix_of(self, name: str, version: int) -> str:
        numbered = f"{self.prefix}{name}/{version}/"
        if version != UNVERSIONED:
            return numbered
        keys = {k for k, _ in self._keys(numbered + META_FILE)}
        return numbered if numbered + META_FILE in keys else f"{self.prefix}{name}/"

    def _read_meta(self, version: Version) -> tuple[bytes, str]:
        prefix = self._prefix_of(version.name, version.number)
        with self._errors(f"{version.name} version {version.number}"):
            obj = self.client.get_object(Bucket=self.bucket, Key=prefix + META_FILE)
            if int(obj.get("ContentLength", 0)) > MAX_META_BYTES:
                raise RepositoryError(f"{self.location}: meta.json of {version.name} version {version.number} is over {MAX_META_BYTES} bytes")
            return obj["Body"].read(), prefix

    def fetch(self, ref: VersionMeta) -> Entry:
        """The version from the cache, downloading it first when it is not there. The entry holds the
        cached files against eviction until it is released."""
        digests = file_digests(ref)
        expected = _expected_files(ref, digests)
        pin = self.cache.pin(ref.digest)
        try:
            where = self.cache.lookup(ref.digest, expected)
            if where is None:
                # One download per version per host: servers starting together wait for the first.
                with self.cache.downloading(ref.digest):
                    where = self.cache.lookup(ref.digest, expected) or self._download(ref, digests, expected)
            else:
                log.info("%s version %d: in the model cache (%s)", ref.name, ref.version, ref.digest[:12])
        except BaseException:
            pin.release()
            raise
        return Entry(ref.name, where / MODEL_FILE, ref.meta, ref.version, ref.digest, on_release=pin.release)

    def _download(self, ref: VersionMeta, digests: dict[str, str], expected: dict[str, tuple[str, int | None]]) -> Path:
        staging = self.cache.staging()
        try:
            started = time.perf_counter()
            total = 0
            for name, digest in digests.items():
                total += self._download_file(ref, name, digest, staging / name)
            (staging / META_FILE).write_bytes(ref.raw)
            log.info(
                "%s version %d: downloaded %.1f MB from %s in %.1f s, every file matches its sha256",
                ref.name, ref.version, total / 1e6, self.location, time.perf_counter() - started,
            )  # fmt: skip
            return self.cache.commit(staging, ref.digest, expected)
        except BaseException:
            self.cache.discard(staging)
            raise

    def _download_file(self, ref: VersionMeta, name: str, digest: str, dest: Path) -> int:
        from botocore.exceptions import FlexibleChecksumError, IncompleteReadError, ResponseStreamingError

        key = ref.where + name
        what = f"{ref.name} version {ref.version} {name}"
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            sha = hashlib.sha256()
            size = 0
            try:
                with self._errors(what), open(dest, "wb") as out:
                    try:
                        got = self.client.get_object(Bucket=self.bucket, Key=key)
                        moved = self._progress(f"downloading {what}", int(got.get("ContentLength") or 0))
                        for chunk in got["Body"].iter_chunks(_CHUNK):
                            sha.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
                            moved(len(chunk))
                    except (FlexibleChecksumError, IncompleteReadError, ResponseStreamingError) as exc:
                        # The store's own checksum or the transfer caught it: the same as a digest mismatch.
                        log.warning("%s from %s: %s (attempt %d of %d)", what, self.location, type(exc).__name__, attempt, DOWNLOAD_ATTEMPTS)
                        continue
            except RepositoryError:
                dest.unlink(missing_ok=True)
                raise
            if sha.hexdigest() == digest:
                return size
            log.warning(
                "%s from %s does not match the sha256 in its meta.json (attempt %d of %d)",
                what, self.location, attempt, DOWNLOAD_ATTEMPTS,
            )  # fmt: skip
            time.sleep(0.2 * attempt)
        dest.unlink(missing_ok=True)
        raise CorruptDownload(
            f"{what} from {self.location} did not match the sha256 in its meta.json in {DOWNLOAD_ATTEMPTS} "
            "downloads; it is not served"
        )

    # ---- tunings ----
    def tuning_files(self, name: str) -> list[str]:
        prefix = f"{self.prefix}{name}/{TUNINGS_DIR}/"
        files = []
        for key, _size in self._keys(prefix):
            rest = key[len(prefix) :]
            if "/" not in rest and rest.endswith(".json"):
                files.append(rest)
                if len(files) >= MAX_TUNING_FILES:
                    break
        return sorted(files)

    def read_tuning(self, name: str, file: str) -> bytes | None:
        from botocore.exceptions import ClientError

        key = f"{self.prefix}{name}/{TUNINGS_DIR}/{file}"
        with self._errors(f"{name} tuning {file}"):
            try:
                # A ranged read: a huge object costs no more than the cap.
                obj = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{MAX_TUNING_BYTES}")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return obj["Body"].read(MAX_TUNING_BYTES + 1)

    def write_tuning(self, name: str, file: str, data: bytes) -> str:
        key = f"{self.prefix}{name}/{TUNINGS_DIR}/{file}"
        with self._errors(f"writing {name} tuning {file}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)  # one PUT: whole or absent
        return f"s3://{self.bucket}/{key}"

    def _progress(self, what: str, total: int) -> Callable[[int], None]:
        if self.progress is not None:
            return self.progress(what, total)
        log.info("%s: %.1f MB", what, total / 1e6)  # a server's log: one line per file, as it starts
        return lambda _n: None

    # ---- writing ----
    def _publish(self, name: str, version: int, files: Sequence[Path], meta: bytes) -> None:
        prefix = f"{self.prefix}{name}/{version}/"
        for f in files:
            what = f"{name} version {version} {Path(f).name}"
            with self._errors(f"uploading {name} version {version}"):
                moved = self._progress(f"uploading {what}", Path(f).stat().st_size)
                self.client.upload_file(str(f), self.bucket, prefix + Path(f).name, Callback=moved)
        from botocore.exceptions import ClientError

        with self._errors(f"publishing {name} version {version}"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=prefix + META_FILE, Body=meta, IfNoneMatch="*")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
                raise RepositoryError(f"{name} version {version} already exists in {self.location} (published meanwhile)") from None
