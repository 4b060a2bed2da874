"""What `fleet up` knows of its children's shares, and the lines saying the fleet is whole.

A child's heartbeat (plumbing.py's `Status`) is kept as its `info`, which `ps`, the
settle checks (settle.py) and these lines read. One summary line goes out each time the
host's fleet becomes whole again, with how long the disturbance (a spawn, an exit, a
scale) lasted; while it stays whole, a fresh one only when segments start or stop
failing (settle.FailingNews).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from fleet.supervise import settle
from fleet.supervise.plumbing import Status


def info_of(status: Status) -> dict[str, Any]:
    """The fields of a heartbeat that a child's `info` keeps."""
    return {
        "owned": status.owned,
        "assigned": status.assigned,
        "leader": status.leader,
        "segments": status.segments,
        "in_assignment": status.in_assignment,
        "failing": status.failing,
        "oldest_call": status.oldest_call,
        "failing_segments": [f.to_json() for f in status.failing_segments or ()],
    }


class Convergence:
    """Whether the fleet is whole (as last said), and since when it is not."""

    def __init__(self) -> None:
        self.converged = False
        self.failing_news = settle.FailingNews()  # a fresh summary when segments fail or recover
        self.unsettled_since = time.monotonic()  # start of the current disturbance

    def unsettle(self) -> None:
        """Something changed the slots: the next whole fleet is worth a line again."""
        if self.converged:
            self.converged = False
            self.unsettled_since = time.monotonic()

    def whole_line(self, infos: Sequence[Mapping[str, Any]], workers: int) -> str | None:
        """The summary line, if these heartbeats show the fleet whole (then it is)."""
        line = settle.summary(infos, workers)
        if line is None:
            return None
        now = time.monotonic()
        self.converged = True
        self.failing_news.printed(settle.failing(infos), now)
        return f"{line}, {now - self.unsettled_since:.1f} s"

    def failing_line(
        self, infos: Sequence[Mapping[str, Any]], workers: int, now: float
    ) -> str | None:
        """A fresh summary line of a whole fleet whose failing segments changed."""
        return self.failing_news.line(infos, workers, now) if self.converged else None
