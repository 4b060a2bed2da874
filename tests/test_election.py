"""Protocol level, in-process against a real etcd: election guards and segment ownership.

These are the transactions the worker's safety rests on (DESIGN.md, "Keys"): a deposed
leader's guarded write fails, a resign only removes its own candidacy, an acquire never
takes a held segment or acts on a stale assignment, and fencing tokens only grow.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleet.coord import election, ownership
from fleet.coord.etcd import Etcd, Put
from fleet.coord.keys import Keys
from fleet.server.embedded import EmbeddedEtcd

KEYS = Keys("/fleet", "protocol-test")
TTL = 30  # long enough that only an explicit revoke ends a lease during a test


@pytest.fixture
def etcd(etcd_server: EmbeddedEtcd) -> Iterator[Etcd]:
    client = Etcd([etcd_server.endpoint], timeout=5.0)
    try:
        yield client
    finally:
        client.close()


def lease(etcd: Etcd) -> int:
    lease_id, _ttl = etcd.grant(TTL)
    return lease_id


def current_leader(etcd: Etcd) -> str | None:
    kv = election.leader_of(etcd.get_prefix(KEYS.election).kvs)
    return kv.value.decode() if kv else None


def guarded_write(etcd: Etcd, lease_id: int, revision: int, value: bytes) -> bool:
    guard = election.leader_guard(KEYS, lease_id, revision)
    return etcd.txn([guard], [Put(KEYS.assignment, value)]).succeeded


# -- election -----------------------------------------------------------------------------


def test_first_candidate_leads_and_a_deposed_leaders_guarded_write_fails(etcd: Etcd) -> None:
    lease_a, lease_b = lease(etcd), lease(etcd)
    rev_a = election.campaign(etcd, KEYS, lease_a, "A")
    rev_b = election.campaign(etcd, KEYS, lease_b, "B")
    assert rev_a < rev_b
    assert current_leader(etcd) == "A"
    leader = election.leader_of(etcd.get_prefix(KEYS.election).kvs)
    assert leader is not None
    assert (leader.key, leader.create_revision, leader.lease) == (
        KEYS.candidate(lease_a),
        rev_a,
        lease_a,
    )

    assert guarded_write(etcd, lease_a, rev_a, b"from A, leading")
    kv, _ = etcd.get(KEYS.assignment)
    assert kv is not None and kv.value == b"from A, leading"

    etcd.revoke(lease_a)
    assert current_leader(etcd) == "B"
    assert not guarded_write(etcd, lease_a, rev_a, b"from A, deposed")
    kv, _ = etcd.get(KEYS.assignment)
    assert kv is not None and kv.value == b"from A, leading", "a deposed leader's write landed"

    assert guarded_write(etcd, lease_b, rev_b, b"from B, leading")
    kv, _ = etcd.get(KEYS.assignment)
    assert kv is not None and kv.value == b"from B, leading"


def test_the_guard_is_bound_to_one_candidacy(etcd: Etcd) -> None:
    """The guard checks a candidacy, not leadership: a re-created key is a new candidacy."""
    lease_a = lease(etcd)
    rev_a = election.campaign(etcd, KEYS, lease_a, "A")
    assert election.resign(etcd, KEYS, lease_a, rev_a)
    rev_a2 = election.campaign(etcd, KEYS, lease_a, "A")
    assert rev_a2 > rev_a
    assert not guarded_write(etcd, lease_a, rev_a, b"old candidacy")
    assert guarded_write(etcd, lease_a, rev_a2, b"new candidacy")


def test_resign_deletes_only_its_own_candidacy(etcd: Etcd) -> None:
    lease_a, lease_b = lease(etcd), lease(etcd)
    rev_a = election.campaign(etcd, KEYS, lease_a, "A")
    rev_b = election.campaign(etcd, KEYS, lease_b, "B")

    assert not election.resign(etcd, KEYS, lease_a, rev_a + 1000), "wrong revision"
    assert not election.resign(etcd, KEYS, lease_a, rev_b), "B's revision, A's key"
    assert not election.resign(etcd, KEYS, lease_b, rev_a), "A's revision, B's key"
    keys_now = {kv.key for kv in etcd.get_prefix(KEYS.election).kvs}
    assert keys_now == {KEYS.candidate(lease_a), KEYS.candidate(lease_b)}
    assert current_leader(etcd) == "A"

    assert election.resign(etcd, KEYS, lease_a, rev_a)
    keys_now = {kv.key for kv in etcd.get_prefix(KEYS.election).kvs}
    assert keys_now == {KEYS.candidate(lease_b)}
    assert current_leader(etcd) == "B"
    assert not election.resign(etcd, KEYS, lease_a, rev_a), "already resigned"


def test_campaign_is_idempotent(etcd: Etcd) -> None:
    lease_a, lease_b = lease(etcd), lease(etcd)
    rev_a = election.campaign(etcd, KEYS, lease_a, "A")
    rev_b = election.campaign(etcd, KEYS, lease_b, "B")
    assert election.campaign(etcd, KEYS, lease_a, "A") == rev_a
    assert election.campaign(etcd, KEYS, lease_b, "B") == rev_b
    candidates = etcd.get_prefix(KEYS.election).kvs
    assert len(candidates) == 2
    kv_a = next(kv for kv in candidates if kv.key == KEYS.candidate(lease_a))
    assert (kv_a.create_revision, kv_a.version, kv_a.value) == (rev_a, 1, b"A")
    assert current_leader(etcd) == "A"


def test_leader_of_no_candidates_is_none(etcd: Etcd) -> None:
    assert election.leader_of(etcd.get_prefix(KEYS.election).kvs) is None


# -- ownership ----------------------------------------------------------------------------


def put_assignment(etcd: Etcd, generation: int) -> int:
    """Write an assignment; its mod_revision, which acquires are guarded by."""
    etcd.put(KEYS.assignment, f'{{"generation": {generation}}}'.encode())
    kv, _ = etcd.get(KEYS.assignment)
    assert kv is not None
    return kv.mod_revision


def test_a_held_segment_cannot_be_acquired_by_another_member(etcd: Etcd) -> None:
    lease_1, lease_2 = lease(etcd), lease(etcd)
    rev = put_assignment(etcd, 1)
    got = ownership.acquire(etcd, KEYS, 0, "m1", lease_1, rev)
    assert got is not None and got.checkpoint is None
    assert ownership.acquire(etcd, KEYS, 0, "m2", lease_2, rev) is None
    kv, _ = etcd.get(KEYS.owner(0))
    assert kv is not None
    assert (kv.value, kv.lease, kv.create_revision) == (b"m1", lease_1, got.token)
    # A retried acquire by the holder itself gets the same ownership back.
    again = ownership.acquire(etcd, KEYS, 0, "m1", lease_1, rev)
    assert again is not None and again.token == got.token


def test_acquire_on_a_stale_assignment_revision_fails(etcd: Etcd) -> None:
    lease_1 = lease(etcd)
    stale = put_assignment(etcd, 1)
    fresh = put_assignment(etcd, 2)
    assert fresh > stale
    assert ownership.acquire(etcd, KEYS, 3, "m1", lease_1, stale) is None
    kv, _ = etcd.get(KEYS.owner(3))
    assert kv is None, "a stale decision created an owner key"
    assert ownership.acquire(etcd, KEYS, 3, "m1", lease_1, fresh) is not None


def test_commit_is_fenced_by_the_token(etcd: Etcd) -> None:
    lease_1, lease_2 = lease(etcd), lease(etcd)
    rev = put_assignment(etcd, 1)
    first = ownership.acquire(etcd, KEYS, 5, "m1", lease_1, rev)
    assert first is not None
    assert ownership.commit(etcd, KEYS, 5, first.token, b"1", first.checkpoint_revision)
    assert not ownership.commit(etcd, KEYS, 5, first.token - 1, b"older token", 0)
    kv, _ = etcd.get(KEYS.checkpoint(5))
    assert kv is not None and kv.value == b"1"

    assert ownership.release(etcd, KEYS, 5, "m1", first.token)
    second = ownership.acquire(etcd, KEYS, 5, "m2", lease_2, rev)
    assert second is not None and second.token > first.token
    assert second.checkpoint == b"1", "the new owner reads the last committed checkpoint"
    assert second.checkpoint_revision == kv.mod_revision
    assert not ownership.commit(
        etcd, KEYS, 5, first.token, b"from the old owner", second.checkpoint_revision
    )
    assert ownership.commit(etcd, KEYS, 5, second.token, b"2", second.checkpoint_revision)
    kv, _ = etcd.get(KEYS.checkpoint(5))
    assert kv is not None and kv.value == b"2"


def test_release_by_a_non_owner_fails(etcd: Etcd) -> None:
    lease_1 = lease(etcd)
    rev = put_assignment(etcd, 1)
    got = ownership.acquire(etcd, KEYS, 7, "m1", lease_1, rev)
    assert got is not None
    assert not ownership.release(etcd, KEYS, 7, "m2", got.token), "another member"
    assert not ownership.release(etcd, KEYS, 7, "m1", got.token - 1), "a wrong token"
    kv, _ = etcd.get(KEYS.owner(7))
    assert kv is not None and kv.create_revision == got.token, "a failed release deleted the key"
    assert ownership.release(etcd, KEYS, 7, "m1", got.token)
    kv, _ = etcd.get(KEYS.owner(7))
    assert kv is None
    assert not ownership.release(etcd, KEYS, 7, "m1", got.token), "released twice"


def test_tokens_strictly_increase_across_owners(etcd: Etcd) -> None:
    lease_1, lease_2 = lease(etcd), lease(etcd)
    rev = put_assignment(etcd, 1)
    seen = []
    for member, lease_id in [("m1", lease_1), ("m2", lease_2), ("m1", lease_1)]:
        got = ownership.acquire(etcd, KEYS, 9, member, lease_id, rev)
        assert got is not None, f"{member} could not acquire a free segment"
        seen.append(got.token)
        assert ownership.release(etcd, KEYS, 9, member, got.token)
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen


def test_lease_expiry_frees_a_segment_for_a_new_token(etcd: Etcd) -> None:
    lease_1, lease_2 = lease(etcd), lease(etcd)
    rev = put_assignment(etcd, 1)
    first = ownership.acquire(etcd, KEYS, 11, "m1", lease_1, rev)
    assert first is not None
    etcd.revoke(lease_1)  # what the server does when the owner's lease expires
    second = ownership.acquire(etcd, KEYS, 11, "m2", lease_2, rev)
    assert second is not None and second.token > first.token
    assert not ownership.commit(etcd, KEYS, 11, first.token, b"stale", first.checkpoint_revision)
    assert not ownership.release(etcd, KEYS, 11, "m1", first.token)


def test_commit_rolled_back_by_a_late_attempt_is_refused(etcd: Etcd) -> None:
    """Issue 7.8: an attempt of an earlier commit that etcd applies late (after a newer
    commit of the same ownership) must not roll the checkpoint back."""
    lease_id, _ = etcd.grant(30)
    rev = put_assignment(etcd, 1)
    got = ownership.acquire(etcd, KEYS, 13, "m1", lease_id, rev)
    assert got is not None and got.checkpoint_revision == 0
    first = ownership.commit(etcd, KEYS, 13, got.token, b"1", got.checkpoint_revision)
    assert first is not None
    second = ownership.commit(etcd, KEYS, 13, got.token, b"2", first)
    assert second is not None and second > first
    # The first commit's attempt, guarded as it was when it was sent, arrives now.
    assert ownership.commit(etcd, KEYS, 13, got.token, b"1", got.checkpoint_revision) is None
    kv, _ = etcd.get(KEYS.checkpoint(13))
    assert kv is not None and kv.value == b"2" and kv.mod_revision == second


def test_commit_retry_after_a_landed_attempt_counts_as_done(etcd: Etcd) -> None:
    """A retry whose first attempt landed (answer lost) finds our value and succeeds."""
    lease_id, _ = etcd.grant(30)
    rev = put_assignment(etcd, 1)
    got = ownership.acquire(etcd, KEYS, 15, "m1", lease_id, rev)
    assert got is not None
    landed = ownership.commit(etcd, KEYS, 15, got.token, b"7", got.checkpoint_revision)
    assert landed is not None
    again = ownership.commit(etcd, KEYS, 15, got.token, b"7", got.checkpoint_revision)
    assert again == landed
