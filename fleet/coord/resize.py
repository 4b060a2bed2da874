"""`fleet resize`: change a running fleet's segment count through its spec key.

Only the spec is written here, in one transaction guarded by the mod_revision it was read
at; the workers do the rest (each adopts the new count from its watch, the leader writes
the assignment for it, segments at or above it are released the normal way). What the
command then waits for, and what it reports, are pure functions of a fresh read of the
fleet (`progress`, `outcome`). Dropping a checkpoint is guarded by its owner key being
absent, so no live ownership ever loses its checkpoint. See DESIGN.md, "Resizing".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fleet import clock
from fleet.coord import spec as spec_mod
from fleet.coord.etcd import Compare, Delete, Etcd, EtcdUnavailable, Put, Txn
from fleet.coord.keys import Keys
from fleet.coord.spec import Spec
from fleet.coord.view import FleetView

# Attempts at the guarded spec write when the spec changes under us without changing
# its count (nothing else rewrites it today; a later version might).
ATTEMPTS = 5
# Checkpoint deletes per round trip (nested transactions; etcd allows 128 ops a level).
DROP_BATCH = 64


class NoFleet(Exception):
    """There is no spec key: no fleet of that name was ever started under that prefix."""


class UnreadableSpec(Exception):
    """The spec key holds something that is not a fleet spec."""


class ConcurrentResize(Exception):
    """The count changed between our read and our write: another `fleet resize` ran."""


@dataclass(frozen=True)
class Resized:
    before: Spec
    after: Spec
    view: FleetView  # the fleet as read right before the write (owners at the resize)

    @property
    def changed(self) -> bool:
        return self.before.segments != self.after.segments

    @property
    def resumed(self) -> int:
        """Segments a grow adds that had a checkpoint before it (kept by an earlier
        shrink): they resume from it rather than from nothing."""
        old, new = self.before.segments, self.after.segments
        return sum(1 for s in self.view.checkpoints() if old <= s < new)


def read(etcd: Etcd, keys: Keys) -> tuple[FleetView, Spec, int]:
    """The fleet, its spec and the spec's mod_revision."""
    view = FleetView.from_snapshot(keys, etcd.get_prefix(keys.root))
    kv = view.kvs.get(keys.spec)
    if kv is None:
        raise NoFleet(
            f"no fleet {keys.name!r} under {keys.prefix!r} (key {keys.spec} not found); "
            "check --name and --prefix, or start it first (fleet up / fleet worker)"
        )
    try:
        return view, spec_mod.parse(kv.value), kv.mod_revision
    except spec_mod.BadSpec as exc:
        raise UnreadableSpec(f"key {keys.spec} is not a fleet spec ({exc})") from None


def resize(
    etcd: Etcd, keys: Keys, segments: int, *, now: Callable[[], float] = time.time
) -> Resized:
    """Write the spec for `segments` (with the old count in its history) in one
    transaction guarded by the spec's mod_revision as read.

    A guard that fails because the count changed is another resize: `ConcurrentResize`,
    never a silent override. A write whose answer was lost (etcd unavailable) is retried
    from a fresh read, which finds our count already there. Resizing to the current count
    writes nothing (`changed` is False).
    """
    first: Spec | None = None
    until = clock.now() + max(3.0, etcd.timeout)
    attempts = 0
    while True:
        try:
            view, old, revision = read(etcd, keys)
            if first is None:
                first = old
            if old.segments == segments:
                return Resized(first, old, view)  # nothing to do, or our lost write landed
            if old.segments != first.segments:
                raise ConcurrentResize(
                    f"fleet {keys.name!r} was resized to {old.segments} segments while this "
                    f"resize ran (another fleet resize?); run it again if {segments} is "
                    "still what you want"
                )
            new = spec_mod.resized(old, segments, now())
            res = etcd.txn(
                [Compare(keys.spec, "mod", revision)], [Put(keys.spec, spec_mod.encode(new))]
            )
        except EtcdUnavailable:
            if clock.now() >= until:
                raise
            time.sleep(0.2)
            continue
        if res.succeeded:
            return Resized(old, new, view)
        attempts += 1
        if attempts >= ATTEMPTS:
            raise ConcurrentResize(
                f"the spec of fleet {keys.name!r} kept changing while this resize ran; "
                "run it again"
            )


def drop_checkpoints(etcd: Etcd, keys: Keys, segments: int) -> tuple[list[int], list[int]]:
    """Delete the checkpoint of every segment >= `segments` that has no owner key.

    Each delete is its own guard (`create_revision(owners/<seg>) == 0`), so a checkpoint
    is never taken from an ownership that exists. Returns (dropped, still owned); the
    caller waits and calls again for the second. Delete-only transactions: they work even
    under etcd's NOSPACE alarm.
    """
    found = etcd.get_prefix(keys.checkpoints).kvs
    above = sorted(
        s for kv in found if (s := keys.segment_of(kv.key)) is not None and s >= segments
    )
    dropped: list[int] = []
    owned: list[int] = []
    for i in range(0, len(above), DROP_BATCH):
        batch = above[i : i + DROP_BATCH]
        ops = [
            Txn([Compare(keys.owner(s), "create", 0)], [Delete(keys.checkpoint(s))])
            for s in batch
        ]
        res = etcd.txn([], list(ops))
        for seg, one in zip(batch, res.nested, strict=True):
            (dropped if one.succeeded else owned).append(seg)
    return dropped, owned


# -- what the command waits for and reports (pure) ---------------------------------------


@dataclass(frozen=True)
class Progress:
    """How far the fleet is with a count of `segments`."""

    segments: int
    members: int
    owned: int  # segments below the count owned by the member the assignment names
    assigned: bool  # the assignment lists exactly 0..segments-1
    above: tuple[int, ...]  # segments at or above the count that still have an owner

    @property
    def settled(self) -> bool:
        """Every segment below the count owned by its assignee, none above it owned.

        With no member there is nobody to own anything: settled once nothing above the
        count is owned (the workers take the count when they start).
        """
        if self.above:
            return False
        return self.members == 0 or (self.assigned and self.owned == self.segments)

    def describe(self) -> str:
        """One progress line: what is still outstanding."""
        if self.members == 0:
            where = "no workers running"
        elif not self.assigned:
            where = f"waiting for the leader's assignment of {self.segments} segments"
        else:
            where = f"{self.owned}/{self.segments} segments owned by their assignee"
        if self.above:
            where += f", {len(self.above)} segments >= {self.segments} still owned"
        return where


def progress(view: FleetView, segments: int) -> Progress:
    """`Progress` from one read of the fleet.

    The assignment must cover exactly the new range: right after a shrink the owners
    below the count can all be in place while the leader has not yet rebalanced them.
    """
    current = view.assignment()
    assigned_to = current.owner_of() if current else {}
    owners = view.owners()
    owned = sum(
        1
        for seg, owner in owners.items()
        if seg < segments and assigned_to.get(seg) == owner.member
    )
    return Progress(
        segments=segments,
        members=len(view.members()),
        owned=owned,
        assigned=sorted(assigned_to) == list(range(segments)),
        above=tuple(sorted(s for s in owners if s >= segments)),
    )


@dataclass(frozen=True)
class Outcome:
    released: int  # segments at or above the new count that had an owner at the resize
    added: int  # new segments (growing)
    moved: int  # segments kept by the resize whose ownership changed (member or token)


def outcome(before: FleetView, after: FleetView, old: int, new: int) -> Outcome:
    """What the resize did, from the fleet read before the spec write and once settled.

    A kept segment (below both counts) moved when its owner key is not the same
    ownership any more: another member, or the same member with a new token (it was
    released and acquired again). Segments unowned before are not counted: they cost no
    handoff.
    """
    was, now = before.owners(), after.owners()
    moved = 0
    for seg, owner in was.items():
        if seg >= min(old, new):
            continue
        then = now.get(seg)
        if then is None or (then.member, then.token) != (owner.member, owner.token):
            moved += 1
    return Outcome(
        released=sum(1 for s in was if s >= new),
        added=max(0, new - old),
        moved=moved,
    )
