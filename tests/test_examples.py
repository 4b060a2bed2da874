"""The shipped examples do what their docstrings promise."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fleet import LostOwnership, SegmentContext
from fleet.handler import load_handler


def context(segment: int, token: int, commits: list[object]) -> SegmentContext:
    def commit(value: bytes) -> bool:
        commits.append(value)
        return True

    return SegmentContext(
        segment=segment, token=token, member_id="m", checkpoint=None,
        stopping=threading.Event(), _commit=commit, _deadline=lambda: float("inf"),
    )


def test_fenced_sqlite_rejects_a_stale_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    handler = load_handler("examples.fenced_sqlite:FencedCounter")
    commits: list[object] = []
    handler.handle(context(3, 10, commits))
    handler.handle(context(3, 12, commits))  # a newer owner
    with pytest.raises(LostOwnership):
        handler.handle(context(3, 10, commits))  # the old owner wakes up
    assert len(commits) == 2


def test_demo_handler_counts_calls() -> None:
    handler = load_handler("fleet.demo:handle")
    commits: list[object] = []
    ctx = context(0, 1, commits)
    handler.handle(ctx)
    handler.handle(ctx)
    assert ctx.checkpoint == 2 and commits == [b"1", b"2"]
