"""The documentation names only tests that exist: every guarantee in docs/guarantees.md stands next to
the test that shows it, so a renamed or deleted test fails here instead of leaving a claim unbacked."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `tests/test_x.py::test_name`, or `::test_name` for another test of the file named just before it.
_REF = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)(\[[^\]`]*\])?`")


def test_every_test_named_in_the_guarantees_exists() -> None:
    text = (REPO / "docs" / "guarantees.md").read_text(encoding="utf-8")
    current: str | None = None
    checked, missing = 0, []
    for match in _REF.finditer(text):
        current = match.group(1) or current
        assert current is not None, f"{match.group(0)} names no file"
        source = (REPO / current).read_text(encoding="utf-8") if (REPO / current).is_file() else ""
        if not re.search(rf"^(async )?def {match.group(2)}\(", source, flags=re.M):
            missing.append(f"{current}::{match.group(2)}")
        checked += 1
    assert checked >= 40, checked
    assert missing == []
