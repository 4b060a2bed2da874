"""Leader election with the semantics of etcd's concurrency recipe.

Each candidate puts `election/<lease-hex>` bound to its lease; the candidate whose key
has the lowest create_revision leads. Instead of blocking on the deletion of lower keys
(the Go recipe's waitDeletes), the worker sees every election key in its prefix watch,
so a campaigner whose own lease dies while waiting notices it at once (its own key is
deleted), which the Go recipe does not (etcd issue 19597).
"""

from __future__ import annotations

from collections.abc import Iterable

from fleet.coord.etcd import KV, Compare, Delete, Etcd, Get, Put
from fleet.coord.keys import Keys


class NotLeader(Exception):
    """A write guarded by leadership failed: this candidate's key is gone or was replaced."""


def campaign(etcd: Etcd, keys: Keys, lease_id: int, member_id: str) -> int:
    """Become a candidate; the create_revision of our key (idempotent on retry)."""
    key = keys.candidate(lease_id)
    res = etcd.txn(
        [Compare(key, "create", 0)],
        [Put(key, member_id.encode(), lease_id), Get(key)],
        [Get(key)],
    )
    return res.ranges[-1][0].create_revision


def resign(etcd: Etcd, keys: Keys, lease_id: int, revision: int) -> bool:
    """Withdraw, but only the candidacy we created (a re-campaign is not deleted)."""
    key = keys.candidate(lease_id)
    return etcd.txn([Compare(key, "create", revision)], [Delete(key)]).succeeded


def leader_of(candidates: Iterable[KV]) -> KV | None:
    """The candidate key with the lowest create_revision, or None."""
    return min(candidates, key=lambda kv: kv.create_revision, default=None)


def leader_guard(keys: Keys, lease_id: int, revision: int) -> Compare:
    """The compare every leader-only write carries: our candidacy is still the one we made."""
    return Compare(keys.candidate(lease_id), "create", revision)
