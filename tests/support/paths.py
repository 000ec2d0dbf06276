"""The repository's root and the test photos."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CAT = DATA / "cat.jpg"
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
