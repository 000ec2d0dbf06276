"""Repository I/O off the request path: a bounded pool of its own, one listing at a time, the last good one.

A listing or a meta.json read may wait on a remote store for the whole of its timeouts and retries. On
asyncio's default pool (the one that parses request bodies) a few such calls against a store that stopped
answering would hold every thread and stall inference; here they hold at most `threads` threads of their
own. Index calls share the listing in progress instead of queueing one each, and when the store does not
answer in time the index is given the last listing that succeeded, with its age.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from saikyo.models.errors import RepositoryError
from saikyo.models.repository import Repository, Version

T = TypeVar("T")


class RepositoryIO:
    def __init__(self, repository: Repository, threads: int) -> None:
        self.repository = repository
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="repository-io")
        self._listing: asyncio.Future[list[Version]] | None = None
        self._last_good: tuple[float, list[Version]] | None = None  # (monotonic time, listing)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def listing(self, timeout_s: float) -> tuple[list[Version], float | None]:
        """Every version in the repository and None when listed afresh within `timeout_s`; else the last
        good listing and its age in seconds. Raises RepositoryError or TimeoutError when there is none."""
        if self._listing is None or self._listing.done():
            self._listing = asyncio.ensure_future(self.call(self.repository.listing))
            self._listing.add_done_callback(self._keep)
        try:
            return await asyncio.wait_for(asyncio.shield(self._listing), timeout_s), None
        except (RepositoryError, TimeoutError):
            if self._last_good is None:
                raise
            at, versions = self._last_good
            return versions, time.monotonic() - at

    def _keep(self, done: asyncio.Future[list[Version]]) -> None:
        if not done.cancelled() and done.exception() is None:  # also marks a failure as retrieved
            self._last_good = (time.monotonic(), done.result())

    def close(self) -> None:
        """Threads stuck on a silent store are not waited for; queued calls are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)
