"""Headless Chromium for the browser tests: Debian's `chromium` driven by Playwright, loopback only.

`playwright install` downloads its own browser builds, which a machine without internet cannot do; the
tests use the system chromium instead (`make test` installs it with apt-get when it runs as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def chromium_path() -> str:
    path = os.environ.get("SAIKYO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.isfile(path):
        pytest.skip(
            "no chromium browser: `make test` installs Debian's chromium when run as root "
            "(or: apt-get install chromium; or set SAIKYO_CHROMIUM to a Chromium binary)"
        )
    return path


@contextlib.contextmanager
def browser_page(width: int = 1100, height: int = 900) -> Iterator[tuple[object, list[str]]]:
    """A page whose requests may only go to loopback; yields (page, blocked URLs)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    executable = chromium_path()
    blocked: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})

            def guard(route) -> None:
                url = route.request.url
                scheme, host = urlsplit(url).scheme, urlsplit(url).hostname
                if scheme in ("data", "blob") or host in LOOPBACK:
                    route.continue_()
                else:
                    blocked.append(url)
                    route.abort()

            context.route("**/*", guard)
            page = context.new_page()
            page.set_default_timeout(60_000)
            yield page, blocked
        finally:
            browser.close()
