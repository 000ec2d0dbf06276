"""Silence the exporters' native chatter, keeping it for the error message when they fail."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet() -> Iterator["Captured"]:
    """Swallow progress prints, warnings and native-library output (fds 1 and 2) inside the block.

    Yields the capture so that a failure can show what was said.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as log:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(log),
                contextlib.redirect_stderr(log),
            ):
                warnings.simplefilter("ignore")
                yield Captured(log)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class Captured:
    def __init__(self, log: Any) -> None:
        self._log = log

    def read(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()
