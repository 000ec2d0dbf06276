"""Which repository a location names: a directory (ModelRepository) or s3://bucket/prefix (S3Repository,
with the download cache the settings describe)."""

from __future__ import annotations

from saikyo.models.cache import ModelCache, default_cache_dir
from saikyo.models.errors import RepositoryError
from saikyo.models.repository import Entry, ModelRepository, Repository
from saikyo.settings import Settings


def is_remote(location: str) -> bool:
    return "://" in location


def open_repository(settings: Settings, location: str | None = None) -> Repository:
    """The repository at `location` (default: settings.repository). Opening reads nothing: a location
    that cannot be reached fails on first use, or at `check()`."""
    location = location or settings.repository
    if location.startswith("s3://"):
        from saikyo.models.s3 import S3Limits, S3Repository

        cache = ModelCache(settings.model_cache_dir or default_cache_dir(), settings.model_cache_bytes)
        limits = S3Limits(settings.s3_connect_timeout_s, settings.s3_read_timeout_s, settings.s3_max_attempts)
        return S3Repository(location, settings.s3_endpoint_url, cache, limits)
    if is_remote(location):
        raise RepositoryError(f"unsupported repository location {location!r}: give a directory or s3://bucket/prefix")
    return ModelRepository(location)


def entry_for(model: str | Entry, settings: Settings) -> Entry:
    """A runner's input: an entry already resolved by the caller, or the latest version of a name."""
    return model if isinstance(model, Entry) else open_repository(settings).get(model)
