"""Joining a fleet: the create-if-absent spec and the lease-bound member record."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Collection
from typing import Any

from fleet import clock
from fleet.coord import spec as spec_mod
from fleet.coord.etcd import Compare, Delete, Etcd, Get, Put
from fleet.coord.keys import Keys
from fleet.coord.spec import Adopted
from fleet.proc import pid_is_dead


class SpecMismatch(Exception):
    """This member was configured with a segment count the running fleet does not have."""


class DuplicateMember(Exception):
    """Another live process is registered under the same member id."""


def ensure_spec(etcd: Etcd, keys: Keys, segments: int, explicit: bool) -> Adopted:
    """The fleet's segment count: ours if we are first, else the stored one.

    A member that was explicitly configured with a different count refuses to start
    rather than silently processing a different partitioning than the user asked for,
    unless the fleet was resized from that count (`fleet resize`): then it joins with the
    current count and a warning to pass on, so a supervisor respawning workers with the
    old `--segments` keeps working.
    """
    kv, _ = etcd.get(keys.spec)
    if kv is None:
        # Read first, write only when absent: a full etcd (NOSPACE) refuses any txn that
        # carries a put, even one whose compare fails, and a fleet that already has a
        # spec must still start there.
        value = spec_mod.encode(spec_mod.Spec(segments))
        res = etcd.txn(
            [Compare(keys.spec, "create", 0)], [Put(keys.spec, value)], [Get(keys.spec)]
        )
        if res.succeeded:
            return Adopted(segments)
        kv = res.ranges[-1][0]
    try:
        stored = spec_mod.parse(kv.value)
    except spec_mod.BadSpec as exc:
        raise SpecMismatch(f"key {keys.spec} is not a fleet spec ({exc})") from None
    adopted = spec_mod.adopt(stored, segments, explicit, keys.name)
    if adopted is None:
        raise SpecMismatch(
            f"segments = {segments} but fleet {keys.name!r} runs with {stored.segments} "
            f"segments (key {keys.spec}); start with --segments {stored.segments}, "
            "change the count with fleet resize, or use another --name"
        )
    return adopted


def register(
    etcd: Etcd,
    keys: Keys,
    member_id: str,
    info: dict[str, Any],
    lease_id: int,
    wait: float,
    ours: Collection[int] = (),
) -> None:
    """Create `members/<id>` bound to our lease.

    A key still bound to one of `ours` (leases this process held before: its previous
    incarnation's record, not yet expired) is taken over in one guarded transaction. If
    the id is taken by another lease we wait up to `wait` seconds for it to go away (a
    crashed predecessor's key lives until its lease expires); a key that outlives that
    belongs to a live duplicate, which is an error, never a takeover. A record naming a
    process on this host that no longer runs is taken over at once (`_dead_here`).
    """
    key = keys.member(member_id)
    value = json.dumps(info, sort_keys=True).encode()
    until = clock.now() + wait
    while True:
        res = etcd.txn([Compare(key, "create", 0)], [Put(key, value, lease_id)], [Get(key)])
        if res.succeeded:
            return
        holder = res.ranges[-1][0] if res.ranges[-1] else None
        if holder is not None and holder.lease == lease_id:
            return
        if holder is not None and (holder.lease in ours or _dead_here(holder.value)):
            took = etcd.txn(
                [Compare(key, "lease", holder.lease)], [Put(key, value, lease_id)]
            )
            if took.succeeded:
                return
            continue
        if clock.now() >= until:
            lease = f"{holder.lease:x}" if holder else "?"
            raise DuplicateMember(
                f"member id {member_id!r} is already registered by a live process "
                f"(lease {lease}); give this worker another --id"
            )
        time.sleep(0.2)


def _dead_here(value: bytes) -> bool:
    """The record names a process on this host that no longer runs: a crashed
    predecessor under the same id (a respawned slot), whose lease etcd has not expired
    yet. Waiting for that expiry can take longer than any fixed wait: a new etcd leader
    renews every lease to a full TTL, so after a quorum loss the record outlives
    `wait` and a respawned slot would be refused as a duplicate of a dead process. The
    takeover moves only the member record; the dead lease's owner keys stay until
    expiry, so no segment is taken from it early."""
    try:
        info = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    return isinstance(pid, int) and not isinstance(pid, bool) and pid_is_dead(pid)


def leave(etcd: Etcd, keys: Keys, member_id: str, lease_id: int) -> None:
    """Delete our member record (only while it is still ours), so the leader rebalances now."""
    key = keys.member(member_id)
    etcd.txn([Compare(key, "lease", lease_id)], [Delete(key)])
