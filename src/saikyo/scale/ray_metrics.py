"""One /metrics for a whole Ray Serve deployment.

Each replica keeps its own Prometheus registry, and Ray's proxy sends a scrape to whichever replica it
picks: alone, /metrics would jump between replicas from one scrape to the next. So every replica
publishes its exposition to a small named actor (the board) every PUBLISH_S seconds, and answers
/metrics with its own fresh exposition merged with the others' latest, each sample labelled
`replica="<id>"`. A replica that stopped publishing (it was scaled down or died) drops out after
STALE_S. Counters stay per replica, as Prometheus expects; sum them in the query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from saikyo.server.metrics import Metrics, merge_expositions

log = logging.getLogger(__name__)

PUBLISH_S = 2.0
STALE_S = 10.0
CALL_TIMEOUT_S = 2.0


class MetricsBoard:
    """The latest exposition of each replica of one app (a Ray actor, see board_for)."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[float, bytes]] = {}

    def publish(self, replica: str, text: bytes) -> None:
        self._texts[replica] = (time.monotonic(), text)

    def forget(self, replica: str) -> None:
        self._texts.pop(replica, None)

    def snapshot(self, max_age_s: float) -> dict[str, bytes]:
        now = time.monotonic()
        for replica in [r for r, (at, _) in self._texts.items() if now - at > max_age_s]:
            del self._texts[replica]
        return {replica: text for replica, (_, text) in self._texts.items()}


def board_for(app_name: str) -> Any:
    """The app's board, created by whichever replica asks first; zero CPUs, so that it fits beside the
    replicas. Not detached: it goes with the replica that created it, so deleting the app leaves
    nothing behind in a shared cluster. If that replica is scaled down, the next call from another
    replica fails, creates a new board, and the replicas fill it again within PUBLISH_S."""
    import ray

    return ray.remote(num_cpus=0)(MetricsBoard).options(name=f"saikyo-metrics-{app_name}", get_if_exists=True).remote()


class ReplicaMetrics:
    """A replica's side: publish in the background, merge on scrape."""

    def __init__(self, app_name: str, replica: str, metrics: Metrics) -> None:
        self.app_name = app_name
        self.replica = replica
        self.metrics = metrics
        self._board: Any = None
        self._task: asyncio.Task[None] | None = None

    def _get_board(self) -> Any:
        if self._board is None:
            self._board = board_for(self.app_name)
        return self._board

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(self._get_board(), method).remote(*args), CALL_TIMEOUT_S)
        except Exception:
            self._board = None  # the actor may have died: look it up (or create it) again next time
            raise

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._publish_forever())

    async def _publish_forever(self) -> None:
        while True:
            try:
                await self._call("publish", self.replica, self.metrics.exposition())
            except Exception as exc:  # CancelledError is not an Exception: stop() still ends the loop
                log.warning("could not publish this replica's metrics: %s", exc)
            await asyncio.sleep(PUBLISH_S)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        with contextlib.suppress(Exception):
            await self._call("forget", self.replica)

    async def view(self, own: bytes) -> bytes:
        """app.state.metrics_view: this replica's fresh exposition merged with the others' latest."""
        try:
            texts: dict[str, bytes] = await self._call("snapshot", STALE_S)
        except Exception as exc:
            log.warning("other replicas' metrics unavailable, answering with this one's only: %s", exc)
            texts = {}
        texts[self.replica] = own
        return merge_expositions(texts)
