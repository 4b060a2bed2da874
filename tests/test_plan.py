"""fleet.work.plan: the worker's decisions, as pure functions of its view (hypothesis)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from fleet.coord.etcd import KV, Change, Snapshot
from fleet.coord.keys import Keys
from fleet.coord.view import FleetView
from fleet.work import plan

KEYS = Keys("/fleet", "t")
ME, OTHER = "me", "other"
MY_LEASE, OTHER_LEASE = 100, 200
SEGMENTS = 8


def _kv(key: str, value: bytes, create: int, lease: int = 0) -> KV:
    return KV(key, value, create, create, 1, lease)


@st.composite
def situations(draw: st.DrawFn) -> tuple[FleetView, dict[int, plan.Running], dict[int, int]]:
    mine = draw(st.sets(st.integers(0, SEGMENTS - 1)))
    kvs = [
        _kv(
            KEYS.assignment,
            json.dumps(
                {
                    "generation": 1,
                    "leader": ME,
                    "members": {ME: sorted(mine), OTHER: sorted(set(range(SEGMENTS)) - mine)},
                }
            ).encode(),
            5,
        )
    ]
    owners: dict[int, tuple[str, int, int]] = {}
    for seg in range(SEGMENTS):
        who = draw(st.sampled_from([None, ME, OTHER]))
        if who is not None:
            token = draw(st.integers(10, 50))
            owners[seg] = (who, token, MY_LEASE if who == ME else OTHER_LEASE)
            kvs.append(_kv(KEYS.owner(seg), who.encode(), token, owners[seg][2]))
    view = FleetView.from_snapshot(KEYS, Snapshot(60, kvs))
    runners: dict[int, plan.Running] = {}
    for seg in draw(st.sets(st.integers(0, SEGMENTS - 1))):
        held = owners.get(seg)
        token = held[1] if held and held[0] == ME and draw(st.booleans()) else draw(
            st.integers(10, 50)
        )
        runners[seg] = plan.Running(token, draw(st.booleans()), draw(st.booleans()))
    released = {
        seg: owners[seg][1]
        for seg in draw(st.sets(st.integers(0, SEGMENTS - 1)))
        if seg in owners and owners[seg][0] == ME and seg not in runners
    }
    return view, runners, released


@given(situations())
def test_reconcile_acts_only_where_it_should(
    case: tuple[FleetView, dict[int, plan.Running], dict[int, int]],
) -> None:
    view, runners, released = case
    todo = plan.reconcile(view, ME, MY_LEASE, runners, released, segments=SEGMENTS)
    current = view.assignment()
    assert current is not None
    mine = set(current.members[ME])
    owners = view.owners()
    # Acquire only what is ours, not already run, and free or already held by our lease.
    for seg in todo.acquire:
        assert seg in mine and seg not in runners
        assert seg not in owners or owners[seg].lease == MY_LEASE
    # Every such segment is acquired.
    expected = {
        s for s in mine - runners.keys() if s not in owners or owners[s].lease == MY_LEASE
    }
    assert set(todo.acquire) == expected
    # A runner whose ownership is gone in etcd is stopped as lost, never released.
    for seg in todo.lost:
        run = runners[seg]
        assert not run.stopping
        assert seg not in owners or owners[seg].token != run.token
    assert not set(todo.lost) & set(todo.release)
    # Release only runners that hold a segment no longer ours.
    for seg in todo.release:
        assert seg not in mine and not runners[seg].stopping
        assert owners[seg].token == runners[seg].token
    # Left-over owner keys: ours by lease, not assigned to us, nobody runs them, and not
    # already given back; every one of them is found.
    orphans = {s for s, _ in todo.orphans}
    assert orphans == {
        s
        for s, o in owners.items()
        if o.lease == MY_LEASE and s not in runners and s not in mine and released.get(s) != o.token
    }
    assert all(owners[s].token == t for s, t in todo.orphans)


def test_next_assignment_is_none_once_written() -> None:
    kvs = [_kv(KEYS.member(m), b"{}", 3, 1) for m in (ME, OTHER)]
    view = FleetView.from_snapshot(KEYS, Snapshot(10, kvs))
    wanted = plan.next_assignment(view, SEGMENTS)
    assert wanted is not None
    desired, generation = wanted
    assert generation == 1 and sorted(sum(desired.values(), [])) == list(range(SEGMENTS))
    value = json.dumps({"generation": 1, "leader": ME, "members": desired}).encode()
    view.apply([Change("put", _kv(KEYS.assignment, value, 11))], 11)
    assert plan.next_assignment(view, SEGMENTS) is None


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["member", "election", "owner", "checkpoint"]),
            st.sampled_from([MY_LEASE, OTHER_LEASE]),
            st.booleans(),  # released by us (owners only)
        ),
        max_size=6,
    ),
    st.booleans(),
)
def test_deleted_keys_of_ours_are_those_we_did_not_delete(
    deletes: list[tuple[str, int, bool]], leaving: bool
) -> None:
    kvs, changes, expected, want = [], [], {}, set()
    for i, (kind, lease, ours_released) in enumerate(deletes):
        key = {
            "member": KEYS.member(f"m{i}"),
            "election": KEYS.candidate(1000 + i),
            "owner": KEYS.owner(i),
            "checkpoint": KEYS.checkpoint(i),
        }[kind]
        kv = _kv(key, b"x", 20 + i, lease if kind != "checkpoint" else 0)
        kvs.append(kv)
        changes.append(Change("delete", _kv(key, b"", 40 + i)))
        if kind == "owner" and ours_released:
            expected[key] = kv.create_revision
        mine = kv.lease == MY_LEASE
        if not mine:
            continue
        if kind == "owner" and ours_released:
            continue
        if leaving and kind in ("member", "election"):
            continue
        want.add(key)
    view = FleetView.from_snapshot(KEYS, Snapshot(30, kvs))
    found = plan.deleted_keys_of_ours(
        view, KEYS, changes, MY_LEASE, expected=expected, leaving=leaving
    )
    assert set(found) == want


@given(situations(), st.integers(1, SEGMENTS))
def test_reconcile_after_a_shrink_never_keeps_or_takes_a_segment_past_the_count(
    case: tuple[FleetView, dict[int, plan.Running], dict[int, int]], known: int
) -> None:
    """An assignment that still lists segments >= the count this worker knows (written
    before the leader saw a `fleet resize`): those are released if run, never acquired,
    and a left-over owner key of ours there is given back."""
    view, runners, released = case
    todo = plan.reconcile(view, ME, MY_LEASE, runners, released, segments=known)
    owners = view.owners()
    assert all(seg < known for seg in todo.acquire)
    for seg, run in runners.items():
        if seg < known or run.stopping:
            continue
        owner = owners.get(seg)
        gone = owner is None or owner.token != run.token  # the view is caught up (rev 60)
        assert seg in (todo.lost if gone else todo.release)
    for seg, owner in owners.items():
        if seg >= known and owner.lease == MY_LEASE and seg not in runners:
            assert (seg, owner.token) in todo.orphans or released.get(seg) == owner.token
    # Below the count nothing changes: the same decisions as with the full count.
    full = plan.reconcile(view, ME, MY_LEASE, runners, released, segments=SEGMENTS)
    assert todo.acquire == [s for s in full.acquire if s < known]
    assert [s for s in todo.release if s < known] == [s for s in full.release if s < known]


@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.sampled_from([1.0, 1.0, 2.0, 0.5]),
        min_size=1,
    ),
    st.integers(1, 40),
    st.integers(1, 40),
)
def test_next_assignment_for_a_new_count_covers_it_and_keeps_what_members_hold_below_it(
    members: dict[str, float], old: int, new: int
) -> None:
    """`fleet resize`: the leader's next assignment lists exactly 0..new-1, and each
    member keeps as many of the segments it held below the new count as its quota allows
    (a shrink moves only what balance needs)."""
    from fleet.coord.assignment import assign, quotas

    current = assign(old, members, {})
    kvs = [
        _kv(KEYS.member(m), json.dumps({"weight": w}).encode(), 3 + i, 1)
        for i, (m, w) in enumerate(sorted(members.items()))
    ]
    value = json.dumps({"generation": 4, "leader": ME, "members": current}).encode()
    kvs.append(_kv(KEYS.assignment, value, 20))
    view = FleetView.from_snapshot(KEYS, Snapshot(30, kvs))
    wanted = plan.next_assignment(view, new)
    if new == old:
        assert wanted is None
        return
    assert wanted is not None
    desired, generation = wanted
    assert generation == 5
    assert sorted(s for segs in desired.values() for s in segs) == list(range(new))
    quota = quotas(new, members, current)
    for member, segs in desired.items():
        below = {s for s in current[member] if s < new}
        assert len(below & set(segs)) == min(len(below), quota[member])
    if new > old and len(set(members.values())) == 1:
        # Growing a fleet of equal weights moves nothing: every member keeps all it has.
        assert all(set(current[m]) <= set(desired[m]) for m in members)


@given(
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sampled_from([1.0, 2.0]), min_size=1),
    st.integers(1, 30),
    st.integers(1, 30),
)
def test_moves_after_a_resize_split_released_from_moved(
    members: dict[str, float], old: int, new: int
) -> None:
    """The leader's log line: a shrink's segments past the count are released, not moved."""
    from fleet.coord.assignment import assign, moved

    before = assign(old, members, {})
    after = assign(new, members, before)
    count, released = plan.moves(before, after, new)
    assert released == max(0, old - new)
    assert count + released == moved(before, after)
    if old == new:
        assert (count, released) == (0, 0)
