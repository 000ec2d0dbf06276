"""Which paths are probes, metrics, docs or the demo page: auth may leave them open, admission control
never counts them.

Probes must answer during a flood (or a load balancer would pull a busy-but-healthy server), a scraper
must see the flood in the metrics, and static pages cost nothing worth limiting.
"""

from __future__ import annotations

import re

GROUPS = ("health", "metrics", "docs", "demo")

_HEALTH = re.compile(r"^/v2/health/(live|ready)$|^/v2/models/[^/]+(/versions/[^/]+)?/ready$")


def endpoint_group(path: str) -> str | None:
    """The group of `path`, or None for everything else: the work (inference, model metadata)."""
    if path == "/metrics":
        return "metrics"
    if path in ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json") or path.startswith("/docs/assets/"):
        return "docs"
    if path == "/" or path.startswith("/static/"):
        return "demo"
    if _HEALTH.match(path):
        return "health"
    return None


def is_control(path: str) -> bool:
    """Model control (Triton's repository extension): the index, load and unload. Auth asks an admin key."""
    return path.startswith("/v2/repository/")
