"""One /metrics for a whole Ray Serve deployment (saikyo.scale.workers.shared_metrics, on a Ray actor).

Each replica keeps its own Prometheus registry, and Ray's proxy sends a scrape to whichever replica it
picks. So every replica publishes its exposition to a small named actor (the board) every PUBLISH_S
seconds, and answers /metrics with its own fresh exposition merged with the others' latest, each
sample labelled `replica="<id>"`. A replica that stopped publishing drops out after STALE_S.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from saikyo.server.metrics import Metrics
from saikyo.scale.workers.shared_metrics import SharedMetrics

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


class ActorBoard:
    """The app's MetricsBoard actor as an ExpositionBoard: every call bounded in time."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self._board: Any = None

    async def _call(self, method: str, *args: Any) -> Any:
        from ray.exceptions import ActorDiedError

        if self._board is None:
            self._board = board_for(self.app_name)
        try:
            return await asyncio.wait_for(getattr(self._board, method).remote(*args), CALL_TIMEOUT_S)
        except ActorDiedError:
            self._board = None  # look it up (or create it) again next time
            raise
        # Any other failure (a timeout while the actor's process starts on a busy node) keeps the handle:
        # dropping it would end the board if this replica created it (its references gone), and the
        # next one would start as slowly: on a loaded two-node cluster, a board that never came up.

    async def publish(self, source: str, text: bytes) -> None:
        await self._call("publish", source, text)

    async def forget(self, source: str) -> None:
        await self._call("forget", source)

    async def snapshot(self, max_age_s: float) -> dict[str, bytes]:
        texts: dict[str, bytes] = await self._call("snapshot", max_age_s)
        return texts


class ReplicaMetrics(SharedMetrics):
    """A replica's side: publish in the background, merge on scrape."""

    def __init__(self, app_name: str, replica: str, metrics: Metrics) -> None:
        super().__init__(ActorBoard(app_name), replica, metrics, "replica", PUBLISH_S, STALE_S)
