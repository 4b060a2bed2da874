"""When is a slot, and the whole local fleet, "settled": what a rolling restart waits
for before it stops the next slot, and what the one summary line reports.

The summary names the failing segments (segments whose last call failed), and while
the fleet stays whole a change in their number gets a fresh line (`FailingNews`).

A slot is settled when its child is READY and owns exactly what it is assigned. A
fresh child reports ``assigned = 0`` until the leader has included it, which looks
like a settled slot with nothing to do; a heartbeat that carries ``in_assignment``
(the current assignment lists this member) says which it is. Without that field
(an older worker) the rule falls back to "has segments, or there are fewer segments
than local workers", which cannot tell a slot that legitimately has none in a
multi-host fleet with more members than segments; such a slot then never settles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.supervise.slots import Slot, State


@dataclass
class RollingRestart:
    pending: list[int] = field(default_factory=list)
    current: int | None = None

    def next_slot(self, settled: Callable[[int], bool], all_settled: bool) -> int | None:
        """The slot to restart now, if any: one at a time, each only once every slot
        (the previously restarted one included) is settled again."""
        if self.current is not None:
            if not settled(self.current):
                return None
            self.current = None
        if not self.pending or not all_settled:
            return None
        self.current = self.pending.pop(0)
        return self.current


def settled(slot: Slot, info: Mapping[str, Any] | None, local_workers: int) -> bool:
    if info is None or slot.state is not State.READY or info.get("segments") is None:
        return False
    if info.get("in_assignment") is not None:
        return bool(info["in_assignment"]) and slot.owned == slot.assigned
    has_share = slot.assigned > 0 or int(info["segments"] or 0) < local_workers
    return has_share and slot.owned == slot.assigned


def failing(infos: Iterable[Mapping[str, Any]]) -> int:
    """Segments whose last call failed, over every worker's last heartbeat."""
    return sum(int(i.get("failing") or 0) for i in infos)


def summary(
    infos: Iterable[Mapping[str, Any]], workers: int, *, zero_failing: bool = False
) -> str | None:
    """The "fleet is whole" line, if every segment is owned under one leader.

    It names the failing segments when there are any (`..., 64/64 segments owned, 3
    failing, leader h-2`), and `0 failing` too with `zero_failing` (the line that says
    they recovered)."""
    infos = list(infos)
    segments = max((int(i.get("segments") or 0) for i in infos), default=0)
    owned = sum(int(i.get("owned") or 0) for i in infos)
    leaders = {i.get("leader") for i in infos}
    if not segments or owned != segments or len(leaders) != 1 or None in leaders:
        return None
    bad = failing(infos)
    failing_part = f", {bad} failing" if bad or zero_failing else ""
    return (
        f"{workers}/{workers} workers ready, {owned}/{segments} segments owned{failing_part}, "
        f"leader {leaders.pop()}"
    )


FAILING_NEWS_GAP = 5.0  # seconds between two lines about failing segments, at least


@dataclass
class FailingNews:
    """When the summary line is due again because segments started or stopped failing.

    The supervisor prints the summary each time the fleet becomes whole; a fleet that
    stays whole while handlers start failing needs a fresh line too, but once per
    change, not once per failed call: a new line only when the number of failing
    segments differs from the one the last line showed, and never within
    `FAILING_NEWS_GAP` of it (a segment failing every other call would print a line
    each second otherwise). Heartbeats keep arriving every second, so a change held
    back by the gap is reported at the first heartbeat after it.
    """

    gap: float = FAILING_NEWS_GAP
    shown: int = 0  # failing segments in the last summary line printed
    at: float = float("-inf")

    def printed(self, count: int, now: float) -> None:
        """A summary line showing `count` failing segments went out at `now`."""
        self.shown, self.at = count, now

    def due(self, count: int, now: float) -> bool:
        return count != self.shown and now >= self.at + self.gap

    def line(self, infos: Iterable[Mapping[str, Any]], workers: int, now: float) -> str | None:
        """The summary line to print now, if one is due (then noted as printed)."""
        infos = list(infos)
        count = failing(infos)
        if not self.due(count, now):
            return None
        line = summary(infos, workers, zero_failing=True)
        if line is not None:
            self.printed(count, now)
        return line
