"""What a worker should do next, decided from its view alone: no I/O here.

The incarnation (incarnation.py) feeds these functions the local view of the fleet and
what its runners are doing, and carries out the answer against etcd. Keeping the
decisions pure makes each rule testable on its own, and keeps the main loop a sequence
of "look, decide, act".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fleet.coord.assignment import assign, moved
from fleet.coord.etcd import Change
from fleet.coord.keys import Keys
from fleet.coord.view import FleetView


@dataclass(frozen=True)
class Running:
    """What planning needs to know of one segment runner."""

    token: int
    stopping: bool
    releasing: bool  # told to give the segment back once idle


@dataclass(frozen=True)
class Plan:
    lost: list[int] = field(default_factory=list)  # ownership gone in etcd: stop, no release
    release: list[int] = field(default_factory=list)  # no longer ours: stop, then release
    acquire: list[int] = field(default_factory=list)  # ours and free (or already ours)
    # Owner keys under our lease that are neither assigned to us nor run by a runner (a
    # release that failed): (segment, token) to release now.
    orphans: list[tuple[int, int]] = field(default_factory=list)


def reconcile(
    view: FleetView,
    member_id: str,
    lease: int,
    runners: Mapping[int, Running],
    released: Mapping[int, int],
    *,
    segments: int,
) -> Plan:
    """Desired (the assignment) against held (owner keys and runners).

    `released` maps segments to the token of an ownership we already gave back whose
    delete the view may not show yet (no second release for it). `segments` is the
    fleet's count as this worker knows it: an assigned segment at or above it (an
    assignment a leader computed before it saw a `fleet resize`) is not ours, so it is
    released if we run it and never acquired.
    """
    current = view.assignment()
    listed = current.members.get(member_id, []) if current else []
    mine = {s for s in listed if 0 <= s < segments}
    owners = view.owners()
    plan = Plan()
    for seg, run in sorted(runners.items()):
        owner = owners.get(seg)
        caught_up = view.revision >= run.token
        if caught_up and (owner is None or owner.token != run.token):
            if not run.stopping:
                plan.lost.append(seg)
        elif seg not in mine and not run.stopping:
            plan.release.append(seg)
    for seg, owner in sorted(owners.items()):
        if owner.lease != lease or seg in runners or released.get(seg) == owner.token:
            continue
        if seg not in mine:
            plan.orphans.append((seg, owner.token))
    if current is None:
        return plan
    # A free segment, or one whose owner key is already ours without a runner (an acquire
    # that landed although its answer was lost): acquire returns its token.
    plan.acquire.extend(
        s for s in sorted(mine - runners.keys()) if s not in owners or owners[s].lease == lease
    )
    return plan


def next_assignment(
    view: FleetView, segments: int
) -> tuple[dict[str, list[int]], int] | None:
    """The assignment the leader should write and its generation; None when the
    current one is already what `assign` gives for the members present."""
    current = view.assignment()
    members = {m.id: m.weight for m in view.members().values()}
    desired = assign(segments, members, current.members if current else {})
    if current is not None and desired == current.members:
        return None
    return desired, (current.generation if current else 0) + 1


def moves(
    before: Mapping[str, Sequence[int]], after: Mapping[str, Sequence[int]], segments: int
) -> tuple[int, int]:
    """(segments moved, segments released) from one assignment to the next, for the
    leader's log line: a segment the fleet no longer has (`>= segments`, after a
    `fleet resize`) is released, not moved, so a shrink does not read as a big move."""
    kept = {m: [s for s in segs if s < segments] for m, segs in before.items()}
    gone = {s for segs in before.values() for s in segs if s >= segments}
    return moved(kept, after), len(gone)


def deleted_keys_of_ours(
    view: FleetView,
    keys: Keys,
    changes: list[Change],
    lease: int,
    *,
    expected: Mapping[str, int],
    leaving: bool,
) -> list[str]:
    """Keys held by our lease that these changes delete and that we did not delete
    ourselves: each one means the lease is gone on the server (or someone removed our
    keys), so nothing of ours may keep running. Read against the view *before* the
    changes are applied (a delete event carries no lease).

    `expected` maps owner keys we are releasing to their token; `leaving` is set once we
    have deleted our own member and election keys (graceful stop).
    """
    found = []
    for change in changes:
        if change.kind != "delete":
            continue
        old = view.kvs.get(change.kv.key)
        if old is None or old.lease != lease:
            continue
        key = old.key
        if key.startswith(keys.owners) and expected.get(key) == old.create_revision:
            continue
        if leaving and (key.startswith(keys.members) or key.startswith(keys.election)):
            continue
        found.append(key)
    return found
