"""Per-request deadlines: a budget from the X-Request-Timeout-Ms header, or the server's default.

The header carries a relative budget in milliseconds (like Envoy's x-envoy-upstream-rq-timeout-ms and
gRPC's grpc-timeout) rather than an absolute time, so client and server clocks need not agree. The budget
starts when the request reaches the server. Work whose deadline has passed before inference starts is
dropped (504): a client that has given up does not keep a place in the queue or a forward pass.

The deadline travels in a context variable, set by the limits middleware for the request's task, so
every route that submits to a batcher through `pipeline.run_batch` honours it without extra plumbing.
"""

from __future__ import annotations

import contextvars
import math
import time
from dataclasses import dataclass

HEADER = "X-Request-Timeout-Ms"


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() seconds
    budget_ms: float

    def expired(self) -> bool:
        return time.monotonic() > self.at


current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("saikyo_deadline", default=None)


def parse(header: str | None, default_ms: float, now: float | None = None) -> Deadline | None:
    """The request's deadline, or None when it has none. ValueError names the header when it is bad."""
    if header is None:
        budget = default_ms
    else:
        try:
            budget = float(header.strip())
        except ValueError:
            raise ValueError(f"header {HEADER} must be a number of milliseconds, got {header[:40]!r}") from None
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"header {HEADER} must be a positive number of milliseconds, got {header[:40]!r}")
    if budget <= 0:
        return None
    start = time.monotonic() if now is None else now
    return Deadline(at=start + budget / 1000.0, budget_ms=budget)
