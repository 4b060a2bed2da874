"""A worker's control watch carries no checkpoint commits (issue 9).

The fleet root sorts assignment < checkpoints/ < election/ < health/ < members/ < owners/
< spec, so one prefix watch of the root delivered every checkpoint commit of the fleet to
every worker. The control watch (fleet/coord/controlwatch.py) watches the two ranges on
either side of `checkpoints/` instead. These tests use real etcd servers:

- in-process, with the control watch the worker uses: checkpoint commits produce no
  event, while the spec, the assignment, member, election, owner and health keys do;
- two real `fleet worker` processes committing fast: etcd sends their watches no event
  for any of those commits (etcd's own `etcd_debugging_mvcc_events_total` counter);
- compaction: a control watch cut off (TCP proxy) while both ranges change and history
  is compacted resyncs, and the view ends equal to a fresh snapshot of both ranges;
- the view ignores changes its last reset's snapshot already reflects.
"""

from __future__ import annotations

import json
import queue
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fleet.coord import election, ownership
from fleet.coord.controlwatch import control_ranges, control_watch
from fleet.coord.etcd import KV, Change, Changes, Delete, Etcd, Resync, Snapshot
from fleet.coord.keys import Keys
from fleet.coord.view import FleetView
from tests.chaos.proxy import TcpProxy
from tests.support.etcd import PausableEtcd
from tests.support.fleet import CLEAN_ENV, start_worker, wait_converged
from tests.support.procs import Spawner
from tests.support.wait import wait_until

if TYPE_CHECKING:
    from fleet import SegmentContext

KEYS = Keys("/fleet", "default")
Items = queue.SimpleQueue[Changes | Resync]


def counting(ctx: SegmentContext) -> None:
    """Handler of the real workers below: one checkpoint commit per call."""
    ctx.commit({"n": (ctx.checkpoint or {}).get("n", 0) + 1})


COUNTING = "tests.test_control_watch:counting"


@pytest.fixture
def etcd(etcd_server: PausableEtcd) -> Iterator[Etcd]:
    client = Etcd([etcd_server.endpoint], timeout=3.0)
    try:
        yield client
    finally:
        client.close()


def _assignment(generation: int, members: dict[str, list[int]]) -> bytes:
    return json.dumps({"generation": generation, "leader": "a", "members": members}).encode()


def _until(items: Items, key: str, view: FleetView | None = None) -> list[Changes | Resync]:
    """Items up to and including the first change of `key` (applied to `view` if given)."""
    got: list[Changes | Resync] = []
    while True:
        item = items.get(timeout=30)
        got.append(item)
        if view is not None:
            if isinstance(item, Resync):
                view.reset(item.snapshot)
            else:
                view.apply(item.changes, item.revision)
        if isinstance(item, Changes) and any(c.kv.key == key for c in item.changes):
            return got


def _keys_of(got: list[Changes | Resync]) -> list[tuple[str, str, int]]:
    """(kind, key, revision) of every change, in the order delivered."""
    return [
        (c.kind, c.kv.key, c.kv.mod_revision)
        for i in got
        if isinstance(i, Changes)
        for c in i.changes
    ]


def _fresh(etcd: Etcd) -> dict[str, KV]:
    """The control keys as a worker's view holds them, read now."""
    return FleetView.from_snapshot(KEYS, etcd.get_prefix(KEYS.root), track_checkpoints=False).kvs


def test_control_ranges_hold_every_control_key_once_and_no_checkpoint() -> None:
    def where(key: str) -> list[int]:
        raw = key.encode()
        return [i for i, (start, end) in enumerate(control_ranges(KEYS))
                if start.encode() <= raw < end]  # fmt: skip

    control = [KEYS.spec, KEYS.assignment, KEYS.member("m"), KEYS.candidate(0x1F),
               KEYS.owner(0), KEYS.owner(99999), KEYS.health_of("m")]  # fmt: skip
    for key in control:
        assert len(where(key)) == 1, key
    for seg in (0, 7, 99999):
        assert where(KEYS.checkpoint(seg)) == []
    assert where("/fleet/other/assignment") == [] and where("/fleet/defaultx") == []


def test_a_checkpoint_commit_reaches_no_control_watch_while_control_keys_do(etcd: Etcd) -> None:
    lease, _ = etcd.grant(30)
    snapshot = etcd.get_prefix(KEYS.root)
    view = FleetView.from_snapshot(KEYS, snapshot, track_checkpoints=False)
    items: Items = queue.SimpleQueue()
    watch = control_watch(etcd, KEYS, snapshot.revision + 1, items.put)
    watch.start()
    try:
        etcd.put(KEYS.spec, b'{"segments": 4}')
        etcd.put(KEYS.member("a"), b"{}", lease)
        election.campaign(etcd, KEYS, lease, "a")
        assignment_rev = etcd.put(KEYS.assignment, _assignment(1, {"a": [0, 1, 2, 3]}))
        acquired = ownership.acquire(etcd, KEYS, 0, "a", lease, assignment_rev)
        assert acquired is not None
        guard: int | None = acquired.checkpoint_revision
        for n in range(50):
            assert guard is not None
            guard = ownership.commit(etcd, KEYS, 0, acquired.token, b'{"n": %d}' % n, guard)
        etcd.put(KEYS.checkpoint(3), b"written by hand")  # any checkpoint write, not just commits
        etcd.txn([], [Delete(KEYS.checkpoint(3))])
        etcd.put(KEYS.health_of("a"), b'{"failing": {}, "count": 0}', lease)
        assert ownership.release(etcd, KEYS, 0, "a", acquired.token)
        etcd.put(KEYS.member("end"), b"{}", lease)
        got = _until(items, KEYS.member("end"), view)
    finally:
        watch.stop()
    seen = _keys_of(got)
    assert not [key for _, key, _ in seen if key.startswith(KEYS.checkpoints)], seen
    # Each range in revision order; across the two, only per-key order is promised.
    for start, end in control_ranges(KEYS):
        revisions = [rev for _, key, rev in seen if start.encode() <= key.encode() < end]
        assert revisions == sorted(revisions)
    assert [(kind, key) for kind, key, _ in sorted(seen, key=lambda s: s[2])] == [
        ("put", KEYS.spec),
        ("put", KEYS.member("a")),
        ("put", KEYS.candidate(lease)),
        ("put", KEYS.assignment),
        ("put", KEYS.owner(0)),
        ("put", KEYS.health_of("a")),
        ("delete", KEYS.owner(0)),
        ("put", KEYS.member("end")),
    ]
    assert view.kvs == _fresh(etcd)


def test_the_reported_revision_is_the_progress_of_the_owners_range(etcd: Etcd) -> None:
    """A worker compares the view's revision with its runners' tokens (owner keys' create
    revisions): a response of the assignment range must not claim more than the range
    holding the owner keys has delivered."""
    start = etcd.put(KEYS.spec, b'{"segments": 4}')
    items: Items = queue.SimpleQueue()
    watch = control_watch(etcd, KEYS, start + 1, items.put)
    watch.start()
    try:
        member_rev = etcd.put(KEYS.member("a"), b"{}")
        _until(items, KEYS.member("a"))
        assignment_rev = etcd.put(KEYS.assignment, _assignment(1, {"a": [0]}))
        (item,) = _until(items, KEYS.assignment)
        assert isinstance(item, Changes)
        assert item.changes[0].kv.mod_revision == assignment_rev
        assert member_rev <= item.revision < assignment_rev
        owner_rev = etcd.put(KEYS.owner(0), b"a")
        (item,) = _until(items, KEYS.owner(0))
        assert isinstance(item, Changes) and item.revision >= owner_rev
    finally:
        watch.stop()


def test_restart_recreates_both_ranges_and_delivers_each_change_once(etcd: Etcd) -> None:
    """`restart()` (a worker's session recovered) re-creates both watches, each from the
    revision after the last one it delivered: no change lost, none delivered twice."""
    start = etcd.put(KEYS.spec, b'{"segments": 4}')
    items: Items = queue.SimpleQueue()
    watch = control_watch(etcd, KEYS, start + 1, items.put)
    watch.start()
    written: list[tuple[str, str, int]] = []
    try:
        for round_ in range(3):
            for n in range(4):
                key = KEYS.assignment if n % 2 else KEYS.member(f"m{n}")
                written.append(("put", key, etcd.put(key, b"%d" % round_)))
                etcd.put(KEYS.checkpoint(n), b"%d" % round_)
            watch.restart()
        written.append(("put", KEYS.member("end"), etcd.put(KEYS.member("end"), b"")))
        seen = _keys_of(_until(items, KEYS.member("end")))
    finally:
        watch.stop()
    assert sorted(seen, key=lambda s: s[2]) == written


def _watch_events_sent(etcd_server: PausableEtcd) -> float:
    """etcd's count of events it has sent to watchers (all streams, since it started)."""
    with urllib.request.urlopen(f"{etcd_server.endpoint}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("etcd_debugging_mvcc_events_total "):
            return float(line.split()[1])
    raise AssertionError("etcd /metrics has no etcd_debugging_mvcc_events_total")


def _commits(etcd: Etcd) -> int:
    return sum(json.loads(kv.value)["n"] for kv in etcd.get_prefix(KEYS.checkpoints).kvs)


def test_two_real_workers_watches_receive_none_of_their_checkpoint_commits(
    etcd_server: PausableEtcd, etcd: Etcd, spawn: Spawner, tmp_path: Path
) -> None:
    """Before the split every commit was one event per worker (2 here)."""
    for member in ("w0", "w1"):
        start_worker(spawn, etcd_server.endpoint, member, tmp_path, segments=8,
                     interval=0.02, handler=COUNTING, env=CLEAN_ENV)  # fmt: skip
    wait_converged(etcd_server.endpoint, ["w0", "w1"])
    wait_until(lambda: _commits(etcd) > 50, timeout=30, message="no commits")
    events, commits = _watch_events_sent(etcd_server), _commits(etcd)
    time.sleep(3.0)  # a measurement window, not a wait for something
    events = _watch_events_sent(etcd_server) - events
    commits = _commits(etcd) - commits
    print(f"{commits} checkpoint commits in 3 s; etcd sent {events:.0f} watch events")
    assert commits >= 100
    assert events <= commits / 20, (events, commits)


def test_a_compacted_control_watch_resyncs_to_both_ranges(
    etcd_server: PausableEtcd, etcd: Etcd
) -> None:
    """Cut off from etcd while both ranges change and history is compacted, the watch
    resyncs: the view ends equal to a fresh snapshot, the other range's change included."""
    lease, _ = etcd.grant(60)
    etcd.put(KEYS.spec, b'{"segments": 4}')
    for member in ("a", "b"):
        etcd.put(KEYS.member(member), b"{}", lease)
    etcd.put(KEYS.assignment, _assignment(1, {"a": [0, 1], "b": [2, 3]}))
    etcd.put(KEYS.checkpoint(0), b'{"n": 0}')
    with TcpProxy(("127.0.0.1", etcd_server.client_port)) as proxy:
        watched = Etcd([proxy.endpoint], timeout=2.0)
        snapshot = watched.get_prefix(KEYS.root)
        view = FleetView.from_snapshot(KEYS, snapshot, track_checkpoints=False)
        items: Items = queue.SimpleQueue()
        watch = control_watch(watched, KEYS, snapshot.revision + 1, items.put)
        watch.start()
        try:
            # Both streams are live: each has delivered a change.
            etcd.put(KEYS.member("ready"), b"{}", lease)
            _until(items, KEYS.member("ready"), view)
            etcd.put(KEYS.assignment, _assignment(2, {"a": [0, 1], "b": [2, 3]}))
            _until(items, KEYS.assignment, view)
            proxy.cut()
            etcd.put(KEYS.assignment, _assignment(3, {"a": [0, 1, 2, 3]}))  # first range
            etcd.txn([], [Delete(KEYS.member("b"))])  # second range
            etcd.put(KEYS.member("c"), b"{}", lease)
            for n in range(1, 20):
                etcd.put(KEYS.checkpoint(n % 4), b'{"n": %d}' % n)
            assert etcd.compact(etcd.put(KEYS.owner(0), b"a", lease)) is True
            proxy.heal()
            got: list[Changes | Resync] = []
            while not any(isinstance(i, Resync) for i in got):
                got.append(items.get(timeout=60))
            resync = next(i for i in got if isinstance(i, Resync))
            for item in got:
                if isinstance(item, Resync):
                    view.reset(item.snapshot)
                else:
                    view.apply(item.changes, item.revision)
            in_snapshot = {kv.key: kv.value for kv in resync.snapshot.kvs}
            assert not [k for k in in_snapshot if k.startswith(KEYS.checkpoints)]
            assert json.loads(in_snapshot[KEYS.assignment])["generation"] == 3
            assert KEYS.member("b") not in in_snapshot and KEYS.member("c") in in_snapshot
            # And it goes on from the snapshot, in both ranges.
            etcd.put(KEYS.assignment, _assignment(4, {"a": [0, 1], "c": [2, 3]}))
            _until(items, KEYS.assignment, view)
            etcd.put(KEYS.member("after"), b"{}", lease)
            _until(items, KEYS.member("after"), view)
        finally:
            watch.stop()
            watched.close()
    assert view.kvs == _fresh(etcd)
    assert view.assignment() is not None and view.assignment().generation == 4


def _kv(key: str, value: bytes, revision: int) -> KV:
    return KV(key, value, revision, revision, 1, 0)


def test_the_view_ignores_changes_its_last_snapshot_already_reflects() -> None:
    """Two streams feed one view: one may still deliver what a resync already covers."""
    snapshot = Snapshot(20, [_kv(KEYS.member("a"), b"new", 18), _kv(KEYS.member("b"), b"b", 19)])
    view = FleetView.from_snapshot(KEYS, snapshot, track_checkpoints=False)
    view.apply([Change("put", _kv(KEYS.member("a"), b"old", 12)),
                Change("delete", _kv(KEYS.member("b"), b"", 20)),
                Change("put", _kv(KEYS.member("c"), b"c", 21))], 21)  # fmt: skip
    assert {k: kv.value for k, kv in view.kvs.items()} == {
        KEYS.member("a"): b"new", KEYS.member("b"): b"b", KEYS.member("c"): b"c"
    }
    assert view.revision == 21
    view.apply([Change("delete", _kv(KEYS.member("b"), b"", 22))], 22)
    assert KEYS.member("b") not in view.kvs
