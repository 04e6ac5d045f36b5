"""Golden-text helper: compare with tests/golden/NAME, or write it when NDOPT_UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("NDOPT_UPDATE_GOLDEN") == "1" or not path.exists():
        if os.environ.get("CI") and not path.exists():
            raise AssertionError(f"golden file {path} is missing (run with NDOPT_UPDATE_GOLDEN=1 and commit it)")
        path.write_text(text)
    expected = path.read_text()
    assert text == expected, f"{name} differs from the golden file; diff it or rerun with NDOPT_UPDATE_GOLDEN=1"
