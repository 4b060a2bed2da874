"""What the control socket can ask of `fleet up`: ps, scale, restart, down.

Requests come from outside the arbiter and are checked here, never trusted: a wrong
type (a list for a slot, a string for a count, a bool for either) is refused with a
one-line error naming the bad value, and a count beyond the open-file limit is refused
naming the limit. The answer is the `fleet ps --json` contract for `ps`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, TypeGuard

from fleet.supervise import limits, slots
from fleet.supervise.children import rss_mb

if TYPE_CHECKING:
    from fleet.supervise.supervisor import Supervisor


def dispatch(sup: Supervisor, request: dict[str, Any]) -> dict[str, Any]:
    cmd = request.get("cmd")
    if cmd == "ps":
        return ps(sup)
    if cmd == "scale":
        workers = request.get("workers")
        if not _is_int(workers) or not 1 <= workers <= limits.MAX_WORKERS:
            return _refuse(
                f"workers = {_short(workers)}: expected an integer from 1 to {limits.MAX_WORKERS}"
            )
        problem = limits.check(workers, running=len(sup.children))
        if problem is not None:
            return _refuse(problem)
        sup.scale(workers)
        return {"ok": True, "workers": workers}
    if cmd == "restart":
        slot = request.get("slot")
        if slot is not None and (not _is_int(slot) or slot not in sup.slots):
            return _refuse(f"slot {_short(slot)}: expected one of {sorted(sup.slots)}")
        sup.restart(slot)
        return {"ok": True}
    if cmd == "down":
        sup.stop("graceful")
        return {"ok": True, "pid": os.getpid()}
    return _refuse(f"unknown command {_short(cmd)}: expected ps, scale, restart or down")


def ps(sup: Supervisor) -> dict[str, Any]:
    now = time.monotonic()
    rows = []
    for index in sorted(sup.slots):
        row = slots.as_row(sup.slots[index], now)
        pid = sup.slots[index].pid
        row["rss_mb"] = rss_mb(pid) if pid else None
        row["member"] = f"{sup.id_prefix}-{index}"
        child = sup.children.get(pid) if pid else None
        info = child.info if child is not None else {}
        # From the worker's heartbeat: segments owned, segments whose last call failed,
        # and how long its oldest running call has run (a hang shows here first); the
        # first few failing segments with their errors (`failing` counts them all).
        for key in ("owned", "failing", "oldest_call"):
            row[key] = info.get(key)
        row["failing_segments"] = list(info.get("failing_segments") or [])
        rows.append(row)
    return {
        "ok": True,
        "pid": os.getpid(),
        "workers": sup.workers,
        "etcd": list(sup.endpoints),
        # The embedded etcd `fleet up` keeps alive, or the `fleet etcd` it uses (state
        # EXTERNAL: not restarted or stopped by fleet up); None for an external cluster.
        "etcd_server": _etcd_row(sup, now),
        "slots": rows,
    }


def _etcd_row(sup: Supervisor, now: float) -> dict[str, Any] | None:
    if sup.keeper is not None:
        return sup.keeper.row(now)
    if sup.external_etcd is not None:
        return sup.external_etcd.row(now)
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}
