"""When the leader writes assignments (issue 9): leading-edge coalescing, and a cold start
that waits for the workers `fleet up` starts so each segment is acquired exactly once.

The pacing rules are pure (fleet/work/pacing.py) and property-tested; the rest runs a
real `fleet up` or real `fleet worker`s against a real etcd and reads what happened from
etcd's own history (a watch replayed from revision 1).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.coord.etcd import Change, Changes, Etcd, Resync
from fleet.coord.keys import Keys
from fleet.coord.watch import PrefixWatch
from fleet.work import pacing
from fleet.work.pacing import FIRST_ASSIGNMENT_WAIT, WritePacer
from tests.support.etcd import PausableEtcd
from tests.support.fleet import start_worker, status
from tests.support.procs import Spawner
from tests.support.supervised import ps, start_up, wait_alive, wait_ready
from tests.support.wait import wait_until

KEYS = Keys("/fleet", "default")
EPS = 1e-9

# -- the pure rules -----------------------------------------------------------------------


def simulate(
    changes: list[float], wakes: list[float], settle: float
) -> tuple[list[float], list[tuple[float, float, float | None]]]:
    """The main loop around a `WritePacer`: a decision step at each change, at each other
    wake-up (periodic timer, a checkpoint burst) and whenever the pacer says a write is
    due. Returns the write times and, for every change, (seen, written, the last write
    before it was seen)."""
    pacer = WritePacer(settle)
    steps = sorted([(t, True) for t in changes] + [(t, False) for t in wakes])
    writes: list[float] = []
    waiting: list[tuple[float, float | None]] = []
    done: list[tuple[float, float, float | None]] = []

    def step(now: float, change: bool) -> None:
        if change:
            pacer.changed(now)
            waiting.append((now, writes[-1] if writes else None))
        if pacer.should_write(now):
            writes.append(now)
            done.extend((seen, now, last) for seen, last in waiting)
            waiting.clear()
            pacer.wrote(now)

    for at, change in steps:
        due = pacer.due()
        while due is not None and due < at:
            step(due, False)  # the loop's timer (`_wake_at`) fires first
            due = pacer.due()
        step(at, change)
    while (due := pacer.due()) is not None:
        step(due, False)
    assert not waiting
    return writes, done


times = st.lists(st.floats(0, 5, allow_nan=False, allow_infinity=False), max_size=40)


@settings(max_examples=300, deadline=None)
@given(changes=times, wakes=times, settle=st.floats(0.001, 1.0))
def test_writes_are_spaced_by_settle_and_no_change_waits_longer(
    changes: list[float], wakes: list[float], settle: float
) -> None:
    writes, done = simulate(changes, wakes, settle)
    for a, b in zip(writes, writes[1:], strict=False):
        assert b - a >= settle - EPS, (a, b)
    for seen, written, _ in done:
        assert seen <= written <= seen + settle + EPS, (seen, written)
    assert len(done) == len(changes)


@settings(max_examples=300, deadline=None)
@given(changes=times, wakes=times, settle=st.floats(0.001, 1.0))
def test_a_change_after_a_quiet_window_is_written_at_once(
    changes: list[float], wakes: list[float], settle: float
) -> None:
    _, done = simulate(changes, wakes, settle)
    for seen, written, last in done:
        if last is None or seen - last >= settle:
            assert written == seen, (seen, written, last)


def test_a_burst_is_one_write_per_window() -> None:
    # Eight workers joining 5 ms apart with a 50 ms window: the first join is written at
    # once, the other seven together 50 ms later; joins 10 ms apart take one more window.
    writes, _ = simulate([i * 0.005 for i in range(8)], [], 0.05)
    assert writes == pytest.approx([0.0, 0.05])
    writes, _ = simulate([i * 0.01 for i in range(8)], [], 0.05)
    assert writes == pytest.approx([0.0, 0.05, 0.1])


@given(failures=st.integers(1, 30), seed=st.integers(0, 2**32))
def test_failed_writes_back_off_with_jitter_never_in_a_tight_loop(failures: int, seed: int) -> None:
    import random

    pacer = WritePacer(0.05, rng=random.Random(seed))
    pacer.changed(0.0)
    now, delays = 0.0, []
    for _ in range(failures):
        assert pacer.should_write(now)
        delays.append(pacer.failed(now))
        assert not pacer.should_write(now)  # not before the retry time
        now = pacer.due() or now
    assert all(pacing.RETRY_FIRST / 2 <= d <= pacing.RETRY_MAX for d in delays)
    pacer.wrote(now)
    assert pacer.due() is None and pacer.failures == 0


def record(group: str | None, workers: int | None) -> dict[str, Any]:
    if group is None or workers is None:
        return {"id": "x"}
    return {"id": "x", "expect": {"group": group, "workers": workers}}


def test_expectation_from_the_environment() -> None:
    env = {pacing.EXPECT_ENV: "8", pacing.SUPERVISOR_ENV: "4242"}
    assert pacing.member_fields(env, "h") == {"expect": {"group": "h:4242", "workers": 8}}
    for bad in ("", "0", "-1", "x", "2.5"):
        assert pacing.member_fields({pacing.EXPECT_ENV: bad}, "h") == {}
    assert pacing.member_fields({}, "h") == {}


def test_first_assignment_waits_for_each_group_then_writes() -> None:
    hold = pacing.first_assignment_hold
    two_of_three = {f"a{i}": record("A", 3) for i in range(2)}
    assert (
        hold(two_of_three, cold=True, leading_since=10.0, now=10.5) == 10.0 + FIRST_ASSIGNMENT_WAIT
    )
    three = {**two_of_three, "a2": record("A", 3)}
    assert hold(three, cold=True, leading_since=10.0, now=10.5) is None
    # Another host's fleet up (its own group) that has only started one of its two.
    mixed = {**three, "b0": record("B", 2)}
    assert hold(mixed, cold=True, leading_since=10.0, now=10.5) is not None
    assert hold({**mixed, "b1": record("B", 2)}, cold=True, leading_since=10.0, now=10.5) is None
    # Never past the bound, never once there is something to keep (a respawn).
    assert (
        hold(two_of_three, cold=True, leading_since=10.0, now=10.0 + FIRST_ASSIGNMENT_WAIT) is None
    )
    assert hold(two_of_three, cold=False, leading_since=10.0, now=10.5) is None
    # Plain workers, or records of another shape, expect nothing.
    plain = {"p": record(None, None), "q": {"expect": "8"}, "r": {"expect": {"group": 1}}}
    assert hold(plain, cold=True, leading_since=10.0, now=10.5) is None


@given(
    groups=st.dictionaries(
        st.sampled_from("ABCD"), st.tuples(st.integers(1, 6), st.integers(0, 6))
    ),
    plain=st.integers(0, 3),
    leading_since=st.floats(0, 100),
    elapsed=st.floats(0, 10),
    cold=st.booleans(),
)
def test_first_assignment_hold_is_bounded_and_only_while_a_group_is_short(
    groups: dict[str, tuple[int, int]], plain: int, leading_since: float, elapsed: float, cold: bool
) -> None:
    members = {f"p{i}": record(None, None) for i in range(plain)}
    for group, (wanted, present) in groups.items():
        members.update({f"{group}{i}": record(group, wanted) for i in range(present)})
    now = leading_since + elapsed
    held = pacing.first_assignment_hold(members, cold=cold, leading_since=leading_since, now=now)
    short = any(0 < present < wanted for wanted, present in groups.values())
    assert (held is not None) == (cold and short and elapsed < FIRST_ASSIGNMENT_WAIT)
    if held is not None:
        assert held == leading_since + FIRST_ASSIGNMENT_WAIT > now


def test_nothing_to_keep() -> None:
    assert pacing.nothing_to_keep(None, ["a"])
    assert pacing.nothing_to_keep(["gone"], ["a", "b"])
    assert not pacing.nothing_to_keep(["gone", "a"], ["a"])


# -- etcd's history -----------------------------------------------------------------------


@dataclass(frozen=True)
class Stamped:
    at: float  # time.monotonic() when the watch delivered it
    change: Change


def history(endpoint: str) -> list[Change]:
    """Every change under the fleet's prefix from revision 1 up to now, replayed by a watch
    (ends at a sentinel key written outside the fleet's prefix after the call)."""
    etcd = Etcd([endpoint], timeout=3.0)
    sentinel = f"/fleet/zz-history-{os.getpid()}-{time.monotonic_ns()}"
    got: list[Change] = []
    done = threading.Event()

    def sink(item: Changes | Resync) -> None:
        if isinstance(item, Resync):
            done.set()  # compacted: the assertion on `got` below fails with a reason
            return
        for change in item.changes:
            if change.kv.key == sentinel:
                done.set()
            elif change.kv.key.startswith(KEYS.root):
                got.append(change)

    watch = PrefixWatch(etcd, "/fleet/", 1, sink)
    try:
        etcd.put(sentinel, b"")
        watch.start()
        assert done.wait(30.0), "the history replay never reached the sentinel"
    finally:
        watch.stop()
        etcd.close()
    assert got and got[0].kv.mod_revision < 10, "history from revision 1 was not replayed"
    return got


@pytest.fixture
def stamped(etcd_server: PausableEtcd) -> Iterator[list[Stamped]]:
    """Every change of the fleet from now on, stamped on arrival."""
    etcd = Etcd([etcd_server.endpoint], timeout=3.0)
    got: list[Stamped] = []
    lock = threading.Lock()

    def sink(item: Changes | Resync) -> None:
        if isinstance(item, Changes):
            with lock:
                got.extend(Stamped(time.monotonic(), c) for c in item.changes)

    watch = PrefixWatch(etcd, KEYS.root, etcd.get_prefix(KEYS.root).revision + 1, sink)
    watch.start()
    try:
        yield got
    finally:
        watch.stop()
        etcd.close()


def first_at(events: list[Stamped], key: str, kind: str = "put") -> Stamped | None:
    return next((e for e in list(events) if e.change.kv.key == key and e.change.kind == kind), None)


def is_acquire(change: Change) -> bool:
    kv = change.kv
    return (
        change.kind == "put"
        and kv.key.startswith(KEYS.owners)
        and kv.create_revision == kv.mod_revision
    )


def assignments(changes: list[Change]) -> list[dict[str, Any]]:
    return [
        json.loads(c.kv.value) for c in changes if c.kv.key == KEYS.assignment and c.kind == "put"
    ]


# -- fleet up -----------------------------------------------------------------------------


def test_cold_start_of_4_workers_acquires_every_segment_exactly_once(
    etcd_server: PausableEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint, workers=4, segments=32)
    endpoint, rows = wait_ready(up, tmp_path, 4)
    changes = history(endpoint)

    per_segment = Counter(KEYS.segment_of(c.kv.key) for c in changes if is_acquire(c))
    assert per_segment == Counter(range(32)), f"acquires per segment: {dict(per_segment)}"
    first = assignments(changes)[0]
    assert sorted(first["members"]) == sorted(r["member"] for r in rows), first
    assert first["generation"] == 1
    # Each worker announced how many `fleet up` starts, under one group.
    records = [json.loads(c.kv.value) for c in changes if c.kv.key.startswith(KEYS.members)]
    assert {r["expect"]["workers"] for r in records} == {4}, records
    assert len({r["expect"]["group"] for r in records}) == 1, records
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0, up.tail()


def test_kill_9_of_the_leader_is_taken_over_at_once_without_the_cold_start_wait(
    etcd_server: PausableEtcd,
    spawn: Spawner,
    ledger_dir: Path,
    tmp_path: Path,
    stamped: list[Stamped],
) -> None:
    """A new leader after a crash finds an assignment naming live members: it writes the
    survivors' assignment at once, long before FIRST_ASSIGNMENT_WAIT, and again when the
    respawned worker is back."""
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint, workers=4, segments=32)
    endpoint, rows = wait_ready(up, tmp_path, 4)
    st_before = status(endpoint)
    leader = st_before["leader"]
    victim = next(r for r in rows if r["member"] == leader)
    survivors = sorted(r["member"] for r in rows if r["member"] != leader)
    theirs = [s["segment"] for s in st_before["segment_owners"] if s["owner"] == leader]
    assert theirs

    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)

    def taken_over() -> bool:
        owners = {s["segment"]: s["owner"] for s in status(endpoint)["segment_owners"]}
        return all(owners.get(seg) in survivors for seg in theirs)

    wait_alive(up, taken_over, f"{leader}'s segments owned by the survivors", timeout=30.0)
    took = time.monotonic() - killed
    assert took < FIRST_ASSIGNMENT_WAIT, f"taken over after {took:.2f} s: held back?"
    written = [
        json.loads(e.change.kv.value)
        for e in list(stamped)
        if e.change.kv.key == KEYS.assignment and e.change.kind == "put" and e.at >= killed
    ]
    assert written and sorted(written[0]["members"]) == survivors, written

    def back() -> bool:
        row = next(r for r in ps(tmp_path) if r["slot"] == victim["slot"])
        return row["state"] == "READY" and row["pid"] != victim["pid"]

    wait_alive(up, back, "the killed slot respawned", timeout=60.0)
    wait_ready(up, tmp_path, 4)
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0, up.tail()


# -- plain workers ------------------------------------------------------------------------


def test_a_plain_worker_writes_the_first_assignment_at_once(
    etcd_server: PausableEtcd, spawn: Spawner, ledger_dir: Path, stamped: list[Stamped]
) -> None:
    env: dict[str, str | None] = {pacing.EXPECT_ENV: None, pacing.SUPERVISOR_ENV: None}
    start_worker(spawn, etcd_server.endpoint, "plain-0", ledger_dir, env=env)
    joined = wait_until(lambda: first_at(stamped, KEYS.member("plain-0")), timeout=60.0)
    written = wait_until(lambda: first_at(stamped, KEYS.assignment), timeout=30.0)
    assert "expect" not in json.loads(joined.change.kv.value)
    assert written.at - joined.at < FIRST_ASSIGNMENT_WAIT, "a plain worker waited"
    assert sorted(json.loads(written.change.kv.value)["members"]) == ["plain-0"]


def test_a_worker_expecting_another_writes_after_the_bound_when_it_never_comes(
    etcd_server: PausableEtcd, spawn: Spawner, ledger_dir: Path, stamped: list[Stamped]
) -> None:
    """The wait is bounded: one worker told to expect two (nobody else comes) holds the
    first assignment back until FIRST_ASSIGNMENT_WAIT after it became leader, then
    writes it and owns every segment."""
    env: dict[str, str | None] = {pacing.EXPECT_ENV: "2", pacing.SUPERVISOR_ENV: None}
    start_worker(spawn, etcd_server.endpoint, "lonely-0", ledger_dir, segments=8, env=env)
    joined = wait_until(lambda: first_at(stamped, KEYS.member("lonely-0")), timeout=60.0)
    written = wait_until(lambda: first_at(stamped, KEYS.assignment), timeout=30.0)
    assert json.loads(joined.change.kv.value)["expect"]["workers"] == 2
    # Leadership follows registration, so the hold ends at least the bound after it.
    assert written.at - joined.at >= FIRST_ASSIGNMENT_WAIT - 0.3, written.at - joined.at
    assert sorted(json.loads(written.change.kv.value)["members"]) == ["lonely-0"]
    wait_until(
        lambda: len([e for e in list(stamped) if is_acquire(e.change)]) == 8,
        timeout=30.0,
        message="all 8 segments acquired",
    )
