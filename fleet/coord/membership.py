"""Joining a fleet: the create-if-absent spec and the lease-bound member record."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any

from fleet import clock
from fleet.coord.etcd import Compare, Delete, Etcd, Get, Put
from fleet.coord.keys import Keys


class SpecMismatch(Exception):
    """This member was configured with a segment count the running fleet does not have."""


class DuplicateMember(Exception):
    """Another live process is registered under the same member id."""


def ensure_spec(etcd: Etcd, keys: Keys, segments: int, explicit: bool) -> int:
    """The fleet's segment count: ours if we are first, else the stored one.

    A member that was explicitly configured with a different count refuses to start
    rather than silently processing a different partitioning than the user asked for.
    """
    kv, _ = etcd.get(keys.spec)
    if kv is None:
        # Read first, write only when absent: a full etcd (NOSPACE) refuses any txn that
        # carries a put, even one whose compare fails, and a fleet that already has a
        # spec must still start there.
        spec = json.dumps({"segments": segments}).encode()
        res = etcd.txn(
            [Compare(keys.spec, "create", 0)], [Put(keys.spec, spec)], [Get(keys.spec)]
        )
        if res.succeeded:
            return segments
        kv = res.ranges[-1][0]
    stored = int(json.loads(kv.value)["segments"])
    if explicit and stored != segments:
        raise SpecMismatch(
            f"segments = {segments} but fleet {keys.name!r} runs with {stored} segments "
            f"(key {keys.spec}); start with --segments {stored} or use another --name"
        )
    return stored


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
    belongs to a live duplicate, which is an error, never a takeover.
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
        if holder is not None and holder.lease in ours:
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


def leave(etcd: Etcd, keys: Keys, member_id: str, lease_id: int) -> None:
    """Delete our member record (only while it is still ours), so the leader rebalances now."""
    key = keys.member(member_id)
    etcd.txn([Compare(key, "lease", lease_id)], [Delete(key)])
