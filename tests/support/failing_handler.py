"""A handler for tests that fails on every call for some segments, until told to recover.

Workers run it as ``handler = "tests.support.failing_handler:handle"``.

Environment:
    FLEET_TEST_FAILING: comma-separated segments whose every call raises
        ``ValueError("boom")`` (e.g. ``1,2``); the others succeed.
    FLEET_TEST_RECOVER: a path; once a file exists there, every call succeeds.
"""

from __future__ import annotations

import os
from pathlib import Path

from fleet import SegmentContext


def _failing() -> set[int]:
    spec = os.environ.get("FLEET_TEST_FAILING", "")
    return {int(s) for s in spec.split(",") if s.strip()}


def handle(ctx: SegmentContext) -> None:
    recover = os.environ.get("FLEET_TEST_RECOVER")
    if ctx.segment in _failing() and not (recover and Path(recover).exists()):
        raise ValueError("boom")
