"""Segment ownership: acquire, release and fenced checkpoint commits, each one transaction.

The fencing token of an ownership is the create_revision of its `owners/<seg>` key:
strictly increasing across successive owners of a segment. Every write made on behalf
of an ownership is guarded by it, so a paused or partitioned ex-owner cannot corrupt
state even after its lease is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleet.coord.etcd import Compare, Delete, Etcd, Get, Put, Txn, TxnResult
from fleet.coord.keys import Keys


@dataclass(frozen=True)
class Acquired:
    """A new ownership: its fencing token and the checkpoint as of the acquire.

    `checkpoint_revision` (the checkpoint key's mod_revision, 0 if absent) guards this
    ownership's first commit; each commit's answer gives the guard of the next.
    """

    token: int
    checkpoint: bytes | None
    checkpoint_revision: int = 0


def _acquire_txn(
    keys: Keys, segment: int, member_id: str, lease_id: int, assignment_revision: int
) -> Txn:
    key, checkpoint = keys.owner(segment), keys.checkpoint(segment)
    return Txn(
        [Compare(key, "create", 0), Compare(keys.assignment, "mod", assignment_revision)],
        [Put(key, member_id.encode(), lease_id), Get(key), Get(checkpoint)],
        [Get(key), Get(checkpoint)],
    )


def _acquired(res: TxnResult, member_id: str, lease_id: int) -> Acquired | None:
    found, saved = res.ranges
    if not found:
        return None
    kv = found[0]
    if res.succeeded or (kv.lease == lease_id and kv.value == member_id.encode()):
        if saved:
            return Acquired(kv.create_revision, saved[0].value, saved[0].mod_revision)
        return Acquired(kv.create_revision, None, 0)
    return None


def acquire(
    etcd: Etcd, keys: Keys, segment: int, member_id: str, lease_id: int, assignment_revision: int
) -> Acquired | None:
    """Take a free segment; None if it is held or the assignment moved since we read it.

    Guarded by the mod_revision of the assignment the decision was read from, so a
    member never acts on a stale assignment. The checkpoint is read in the same
    transaction, so it is exactly the last one committed before this ownership began.
    A retried call whose first attempt did succeed finds the key already ours and
    returns the same token.
    """
    return acquire_many(etcd, keys, [segment], member_id, lease_id, assignment_revision)[segment]


def acquire_many(
    etcd: Etcd,
    keys: Keys,
    segments: Sequence[int],
    member_id: str,
    lease_id: int,
    assignment_revision: int,
) -> dict[int, Acquired | None]:
    """`acquire` for several segments in one round trip: one nested, independently
    guarded transaction per segment (a handoff of N segments costs one RTT, not N)."""
    ops = [_acquire_txn(keys, s, member_id, lease_id, assignment_revision) for s in segments]
    res = etcd.txn([], list(ops))
    return {s: _acquired(r, member_id, lease_id) for s, r in zip(segments, res.nested, strict=True)}


def release(etcd: Etcd, keys: Keys, segment: int, member_id: str, token: int) -> bool:
    """Give a segment up; False if it was no longer ours (nothing is deleted then)."""
    key = keys.owner(segment)
    return etcd.txn(
        [Compare(key, "value", member_id.encode()), Compare(key, "create", token)],
        [Delete(key)],
    ).succeeded


def commit(
    etcd: Etcd,
    keys: Keys,
    segment: int,
    token: int,
    value: bytes,
    checkpoint_revision: int,
    timeout: float | None = None,
) -> int | None:
    """Write a checkpoint only while the ownership with this token still exists, and only
    over the checkpoint this ownership last saw (`checkpoint_revision`: the mod_revision
    from the acquire or from the previous commit; 0 = none yet).

    The second guard stops a rollback within one ownership: an attempt that timed out on
    our side can still be applied later by etcd, after a newer commit of the same token;
    it then finds the checkpoint moved on and changes nothing. A retry whose earlier
    attempt did land finds our own value there and counts as done.

    Returns the checkpoint's mod_revision after the commit (the next commit's guard), or
    None when the ownership is gone or the checkpoint holds something else.
    """
    owner, checkpoint = keys.owner(segment), keys.checkpoint(segment)
    res = etcd.txn(
        [Compare(owner, "create", token), Compare(checkpoint, "mod", checkpoint_revision)],
        [Put(checkpoint, value)],
        [Get(owner), Get(checkpoint)],
        timeout=timeout,
    )
    if res.succeeded:
        return res.revision
    found_owner, found_checkpoint = res.ranges
    if not found_owner or found_owner[0].create_revision != token:
        return None
    if found_checkpoint and found_checkpoint[0].value == value:
        return found_checkpoint[0].mod_revision
    return None
