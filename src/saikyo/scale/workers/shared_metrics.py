"""One /metrics for several processes that each keep their own Prometheus registry.

A scrape reaches one process (Ray's proxy picks a replica; under --workers the kernel hands the
connection to one worker), so alone /metrics would jump between processes from one scrape to the next.
Each process publishes its exposition to a board every `publish_s` seconds and answers /metrics with its
own fresh exposition merged with the others' latest (`merge_expositions`), each sample labelled with
its source. A source that stopped publishing (scaled down, died) drops out after `stale_s`. Counters stay
per process, as Prometheus expects; sum them in the query.

Two boards: a Ray actor under Ray Serve (saikyo.scale.ray_metrics) and, for processes of one machine,
a directory (`DirectoryBoard`, used by scale/workers/worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from saikyo.server.metrics import Metrics, merge_expositions

log = logging.getLogger(__name__)


class ExpositionBoard(Protocol):
    """Where processes leave their latest exposition for each other."""

    async def publish(self, source: str, text: bytes) -> None: ...

    async def forget(self, source: str) -> None: ...

    async def snapshot(self, max_age_s: float) -> dict[str, bytes]:
        """The latest exposition of every source that published within `max_age_s`."""
        ...


class SharedMetrics:
    """One process's side: publish in the background, merge on scrape (install `view` as
    app.state.metrics_view)."""

    def __init__(
        self,
        board: ExpositionBoard,
        source: str,
        metrics: Metrics,
        label: str,
        publish_s: float = 2.0,
        stale_s: float = 10.0,
        unlabelled: Callable[[], bytes] | None = None,
    ) -> None:
        self.board = board
        self.source = source
        self.metrics = metrics
        self.label = label
        self.publish_s = publish_s
        self.stale_s = stale_s
        self._unlabelled = unlabelled  # what is one value for every process, e.g. workers replaced
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._publish_forever())

    async def _publish_forever(self) -> None:
        while True:
            try:
                await self.board.publish(self.source, self.metrics.exposition())
            except Exception as exc:  # CancelledError is not an Exception: stop() still ends the loop
                log.warning("could not publish this process's metrics: %s", exc)
            await asyncio.sleep(self.publish_s)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        with contextlib.suppress(Exception):
            await self.board.forget(self.source)

    async def view(self, own: bytes) -> bytes:
        """This process's fresh exposition merged with the others' latest."""
        try:
            texts = await self.board.snapshot(self.stale_s)
        except Exception as exc:
            log.warning("the other processes' metrics are unavailable, answering with this one's only: %s", exc)
            texts = {}
        texts[self.source] = own
        return merge_expositions(texts, self.label, self._unlabelled() if self._unlabelled else b"")


class DirectoryBoard:
    """A board for processes of one machine: `<source>.prom` files in a directory they share, each
    written whole and renamed into place, so a reader never sees half of one."""

    SUFFIX = ".prom"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def publish(self, source: str, text: bytes) -> None:
        await asyncio.to_thread(self._write, source, text)

    async def forget(self, source: str) -> None:
        (self.directory / f"{source}{self.SUFFIX}").unlink(missing_ok=True)

    async def snapshot(self, max_age_s: float) -> dict[str, bytes]:
        return await asyncio.to_thread(self._read, max_age_s)

    def _write(self, source: str, text: bytes) -> None:
        temporary = self.directory / f".{source}.{os.getpid()}.tmp"
        temporary.write_bytes(text)
        os.replace(temporary, self.directory / f"{source}{self.SUFFIX}")

    def _read(self, max_age_s: float) -> dict[str, bytes]:
        texts: dict[str, bytes] = {}
        now = time.time()
        for path in self.directory.glob(f"*{self.SUFFIX}"):
            try:
                if now - path.stat().st_mtime <= max_age_s:
                    texts[path.name.removesuffix(self.SUFFIX)] = path.read_bytes()
            except FileNotFoundError:  # forgotten between the listing and the read
                continue
        return texts
