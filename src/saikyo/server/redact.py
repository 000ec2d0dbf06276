"""Scrub what a client may read: file-system paths become <path>.

Model load errors (ONNX Runtime's, the repository's) name files on the server; the log keeps them whole,
responses get this version.
"""

from __future__ import annotations

import re

# An absolute path of two or more components, not part of a URL or a media type ("image/jpeg").
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/:;,()<>]+/)+[^\s'\"/:;,()<>]*")


def redact_paths(text: str, *roots: str) -> str:
    for root in sorted({r for r in roots if r}, key=len, reverse=True):
        text = text.replace(root, "<path>")
    return _ABS_PATH.sub("<path>", text)
