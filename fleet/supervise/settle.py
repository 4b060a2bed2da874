"""When is a slot, and the whole local fleet, "settled": what a rolling restart waits
for before it stops the next slot, and what the one summary line reports.

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


def summary(infos: Iterable[Mapping[str, Any]], workers: int) -> str | None:
    """The "fleet is whole" line, if every segment is owned under one leader."""
    infos = list(infos)
    segments = max((int(i.get("segments") or 0) for i in infos), default=0)
    owned = sum(int(i.get("owned") or 0) for i in infos)
    leaders = {i.get("leader") for i in infos}
    if not segments or owned != segments or len(leaders) != 1 or None in leaders:
        return None
    return (
        f"{workers}/{workers} workers ready, {owned}/{segments} segments owned, "
        f"leader {leaders.pop()}"
    )
