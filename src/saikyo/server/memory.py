"""How many bytes of request bodies the server may hold at once, and where that number came from.

The worst case without a budget is max_concurrent_requests x max_body_bytes (8 GiB by default), which a
container with a 2 GiB limit cannot hold: the kernel would kill the server mid-request. So the budget
defaults to half the memory this process may use -- its cgroup's limit when one is set, else the
machine's -- leaving the rest for models, decoded images and the interpreter.
"""

from __future__ import annotations

import os
from pathlib import Path

from saikyo.settings import Settings

# cgroup v2, then v1. A v1 "no limit" is a huge number (PAGE_COUNTER_MAX pages), larger than any machine.
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def cgroup_limit(paths: tuple[Path, ...] = _CGROUP_LIMITS) -> int | None:
    for path in paths:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
        return None  # "max": no limit
    return None


def body_budget(settings: Settings, limit: int | None = None, physical: int | None = None) -> tuple[int, str]:
    """(bytes, where it came from) for `memory_budget_bytes`; 0 means derive it."""
    if settings.memory_budget_bytes > 0:
        return settings.memory_budget_bytes, "memory_budget_bytes"
    limit = cgroup_limit() if limit is None else limit
    physical = physical_memory() if physical is None else physical
    if limit is not None and (physical is None or limit < physical):
        return limit // 2, f"half the cgroup memory limit of {limit / 2**20:.0f} MiB"
    if physical is not None:
        return physical // 2, f"half the machine's {physical / 2**30:.1f} GiB"
    return settings.max_concurrent_requests * settings.max_body_bytes, "max_concurrent_requests x max_body_bytes"


def request_cost(body_bytes: int, compressed: bool, max_decompressed_bytes: int) -> int:
    """Bytes a request of `body_bytes` may hold while it is handled: the body, the parts sliced out of
    it, and for a gzip/deflate body its inflated copy (up to max_decompressed_bytes)."""
    return 2 * body_bytes + (max_decompressed_bytes if compressed else 0)
