"""fleet.supervise.slots: the BACKOFF/FATAL policy a supervisor slot follows.

The property test keeps its own record of crash times (never pruned, counted against
the window at each exit) rather than reusing the module's ``recent_exits``, so the
FATAL decision is checked against an independent reading of the rule.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.supervise.slots import (
    RespawnPolicy,
    Slot,
    State,
    as_row,
    describe_exit,
    due,
    exited,
    heartbeat,
    heartbeat_overdue,
    ready,
    spawned,
    stopping,
)

POLICY = RespawnPolicy()


def rng() -> random.Random:
    return random.Random(1234)


def crash(
    slot: Slot, now: float, r: random.Random, code: int = 1, policy: RespawnPolicy = POLICY
) -> float:
    """Spawn at ``now``, exit at once; return the respawn delay."""
    spawned(slot, 100 + slot.restarts, now)
    state = exited(slot, code, now, policy, r)
    assert state is State.BACKOFF
    assert slot.next_start is not None
    return slot.next_start - now


def test_backoff_grows_and_caps_within_jitter() -> None:
    slot, r, now = Slot(0), rng(), 0.0
    delays = []
    for _ in range(10):
        spawned(slot, 1, now)
        now += 25.0  # short runs spaced so no more than 3 exits share a 60 s window
        assert exited(slot, 1, now, POLICY, r) is State.BACKOFF
        assert slot.next_start is not None
        delays.append(slot.next_start - now)
        now = slot.next_start
    expected = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    for got, want in zip(delays, expected, strict=True):
        assert want * 0.8 <= got <= want * 1.2
    assert max(delays) <= 30 * 1.2


def test_backoff_exact_without_jitter() -> None:
    policy = RespawnPolicy(jitter=0.0, crash_limit=100)
    slot, r = Slot(0), rng()
    delays = [crash(slot, float(i), r, policy=policy) for i in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert slot.failures == 9


def test_jitter_is_spread_not_constant() -> None:
    policy = RespawnPolicy(crash_limit=100)
    r = rng()
    firsts = {round(crash(Slot(0), 0.0, r, policy=policy), 6) for _ in range(50)}
    assert len(firsts) > 40
    assert all(0.4 <= d <= 0.6 for d in firsts)


def test_stable_run_resets_backoff() -> None:
    policy = RespawnPolicy(jitter=0.0, crash_limit=100)
    slot, r = Slot(0), rng()
    for i in range(4):
        crash(slot, float(i), r, policy=policy)
    assert slot.failures == 4
    spawned(slot, 7, 100.0)
    assert exited(slot, 1, 100.0 + 59.9, policy, r) is State.BACKOFF
    assert slot.next_start == pytest.approx(159.9 + 8)  # 59.9 s is not stable
    spawned(slot, 8, 200.0)
    assert exited(slot, 1, 260.0, policy, r) is State.BACKOFF
    assert slot.next_start == pytest.approx(260.5)
    assert slot.failures == 1


def test_five_quick_exits_fatal_then_due_after_cooldown() -> None:
    slot, r = Slot(3), rng()
    for i in range(4):
        crash(slot, i * 2.0, r)
    spawned(slot, 42, 10.0)
    assert exited(slot, 1, 10.0, POLICY, r) is State.FATAL
    assert slot.next_start == 10.0 + 300
    assert slot.fatal_reason == "5 exits within 60s"
    assert slot.pid is None
    assert not due(slot, 309.9)
    assert due(slot, 310.0)
    spawned(slot, 43, 310.0)
    assert slot.state is State.STARTING
    assert slot.fatal_reason is None and slot.next_start is None
    assert slot.restarts == 5
    # the retry gets a fresh crash budget
    assert exited(slot, 1, 311.0, POLICY, r) is State.BACKOFF


def test_exits_outside_window_do_not_count() -> None:
    slot, r = Slot(0), rng()
    for i in range(20):
        spawned(slot, i, i * 16.0)
        assert exited(slot, 1, i * 16.0 + 0.1, POLICY, r) is State.BACKOFF  # <= 4 per 60 s


@pytest.mark.parametrize(("last", "state"), [(60.0, State.FATAL), (60.1, State.BACKOFF)])
def test_crash_window_edge(last: float, state: State) -> None:
    slot, r = Slot(0), rng()
    for t in (0.0, 15.0, 30.0, 45.0):
        spawned(slot, 1, t)
        assert exited(slot, 1, t, POLICY, r) is State.BACKOFF
    spawned(slot, 1, last)
    assert exited(slot, 1, last, POLICY, r) is state  # an exit exactly 60 s old still counts


def test_config_error_is_fatal_at_once() -> None:
    slot, r = Slot(1), rng()
    spawned(slot, 5, 0.0)
    assert exited(slot, 2, 1.0, POLICY, r) is State.FATAL
    assert slot.last_exit == "exit 2 (configuration error)"
    assert slot.fatal_reason is not None and "configuration error" in slot.fatal_reason
    assert slot.next_start == 301.0
    assert not due(slot, 300.9) and due(slot, 301.0)


def test_requested_stop_is_not_a_crash() -> None:
    slot, r = Slot(0), rng()
    crash(slot, 0.0, r)
    spawned(slot, 9, 1.0)
    ready(slot, 77, 1.5)
    assert stopping(slot) is State.STOPPING
    assert slot.stop_requested
    for code in (-9, 2, 1):
        slot.state, slot.pid, slot.stop_requested = State.STOPPING, 9, True
        assert exited(slot, code, 2.0, POLICY, r) is State.STOPPED
        assert not slot.stop_requested
        assert slot.next_start is None
    assert slot.recent_exits == [0.0]
    assert slot.failures == 1
    assert slot.fatal_reason is None
    assert not due(slot, 1e9)


def test_stopping_a_slot_without_child_stops_at_once() -> None:
    slot, r = Slot(0), rng()
    crash(slot, 0.0, r)
    assert stopping(slot) is State.STOPPED
    assert slot.next_start is None and not slot.stop_requested


def test_sigkill_is_an_oom_kill_only_when_the_kernel_says_so() -> None:
    slot, r = Slot(0), rng()
    spawned(slot, 1, 0.0)
    exited(slot, -9, 1.0, POLICY, r)
    assert slot.last_exit == "killed by SIGKILL"
    spawned(slot, 3, 2.0)
    exited(slot, -9, 3.0, POLICY, r, oom=True)
    assert slot.last_exit == "killed by SIGKILL (the kernel's OOM killer)"
    spawned(slot, 2, 5.0)
    stopping(slot)
    exited(slot, -9, 6.0, POLICY, r)
    assert slot.last_exit == "signal SIGKILL"


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0, "exit 0"),
        (1, "exit 1"),
        (2, "exit 2 (configuration error)"),
        (3, "exit 3 (etcd unreachable)"),
        (4, "exit 4 (lease lost with a call running)"),
        (-15, "signal SIGTERM"),
        (-9, "killed by SIGKILL"),
        (-11, "signal SIGSEGV"),
        (-200, "signal 200"),
    ],
)
def test_describe_exit(code: int, text: str) -> None:
    assert describe_exit(code, POLICY) == text


def test_heartbeat_overdue() -> None:
    slot = Slot(0)
    assert heartbeat_overdue(slot, 100.0, 10.0, 30.0) is None  # STOPPED
    spawned(slot, 1, 0.0)
    assert heartbeat_overdue(slot, 30.0, 10.0, 30.0) is None
    assert heartbeat_overdue(slot, 30.5, 10.0, 30.0) == "not ready after 30.5s"
    ready(slot, 99, 31.0)
    assert heartbeat_overdue(slot, 41.0, 10.0, 30.0) is None
    assert heartbeat_overdue(slot, 41.3, 10.0, 30.0) == "no heartbeat for 10.3s"
    heartbeat(slot, 42.0, owned=3, assigned=4)
    assert (slot.owned, slot.assigned) == (3, 4)
    assert heartbeat_overdue(slot, 51.0, 10.0, 30.0) is None
    assert heartbeat_overdue(slot, 57.0, 10.0, 30.0) == "no heartbeat for 15.0s"
    stopping(slot)
    assert heartbeat_overdue(slot, 500.0, 10.0, 30.0) is None  # already being killed


def test_spawn_ready_and_row() -> None:
    slot, r = Slot(2), rng()
    spawned(slot, 10, 0.0)
    assert slot.restarts == 0 and as_row(slot, 0.0)["state"] == "STARTING"
    ready(slot, 555, 1.0)
    ready(slot, 555, 2.0)  # idempotent: ready_at is the first report
    assert slot.state is State.READY and slot.ready_at == 1.0 and slot.lease == 555
    heartbeat(slot, 3.0, owned=2, assigned=2)
    row = as_row(slot, 4.04)
    assert row == {
        "slot": 2,
        "state": "READY",
        "pid": 10,
        "uptime": 4.0,
        "restarts": 0,
        "last_exit": None,
        "heartbeat_age": 1.0,
        "lease": 555,
        "fatal_reason": None,
        "next_start_in": None,
    }
    json.dumps(row)
    exited(slot, 1, 5.0, POLICY, r)
    row = as_row(slot, 5.0)
    assert row["state"] == "BACKOFF" and row["pid"] is None and row["uptime"] is None
    assert row["heartbeat_age"] is None and row["lease"] is None
    assert row["last_exit"] == "exit 1"
    assert 0.4 <= row["next_start_in"] <= 0.6
    spawned(slot, 11, 6.0)
    assert slot.restarts == 1
    assert slot.lease is None and slot.ready_at is None and slot.last_heartbeat is None
    assert (slot.owned, slot.assigned) == (0, 0)
    assert slot.last_exit == "exit 1"  # history survives the respawn


OPS = st.one_of(
    st.just(("spawn", 0.0)),
    st.just(("spawn", 0.0)),
    st.just(("until_due", 0.0)),
    st.tuples(st.just("cycle"), st.sampled_from([0.0, 0.0, 0.1, 5.0, 12.0, 20.0, 30.0])),
    st.just(("ready", 0.0)),
    st.just(("stop", 0.0)),
    st.tuples(st.just("exit"), st.sampled_from([0, 1, 1, 1, 1, 1, 1, 2, 3, -9, -9, -15, -11])),
    st.tuples(
        st.just("advance"),
        st.one_of(
            st.sampled_from([0.0, 0.5, 1.0, 5.0, 14.9, 59.9, 60.0, 60.1, 299.9, 300.0]),
            st.floats(min_value=0.0, max_value=400.0),
        ),
    ),
)


@settings(max_examples=400, deadline=None)
@given(ops=st.lists(OPS, max_size=100), seed=st.integers(0, 2**32 - 1))
def test_random_sequences_respect_policy(ops: list[tuple[str, float]], seed: int) -> None:
    p = POLICY
    slot, r, now = Slot(0), random.Random(seed), 0.0
    crashes: list[float] = []  # unrequested, non-config exits since the last FATAL
    # "cycle" is a short run ending in a crash (wait until due, spawn, run, exit 1):
    # enough of them in a row reach the crash limit, which scattered steps rarely do,
    # and their run lengths put exits on both sides of the window's edge
    cycle = [("until_due", 0.0), ("spawn", 0.0), ("advance", 0.0), ("exit", 1.0)]
    steps = [
        step
        for op, arg in ops
        for step in (
            [(o, arg if o == "advance" else a) for o, a in cycle] if op == "cycle" else [(op, arg)]
        )
    ]
    for op, arg in steps:
        if op == "advance":
            now += arg
        elif op == "until_due" and slot.next_start is not None:
            now = max(now, slot.next_start)  # the supervisor wakes exactly when due
        elif op == "spawn" and slot.pid is None and (slot.state is State.STOPPED or due(slot, now)):
            spawned(slot, 1000 + slot.restarts, now)
        elif op == "ready" and slot.pid is not None:
            ready(slot, 7, now)
        elif op == "stop":
            stopping(slot)
        elif op == "exit" and slot.pid is not None:
            code = int(arg)
            requested = slot.stop_requested
            state = exited(slot, code, now, p, r)
            if requested:
                assert state is State.STOPPED
            elif code == p.config_error_code:
                assert state is State.FATAL
                crashes.clear()
            else:
                crashes.append(now)
                within = [t for t in crashes if now - t <= p.crash_window]
                assert (state is State.FATAL) == (len(within) >= p.crash_limit)
                if state is State.FATAL:
                    crashes.clear()
                else:
                    assert slot.next_start is not None
                    delay = slot.next_start - now
                    assert p.base * (1 - p.jitter) - 1e-9 <= delay
                    assert delay <= p.cap * (1 + p.jitter) + 1e-9
            if state is State.FATAL:
                assert slot.next_start == now + p.cooldown
        assert slot.state in set(State)
        assert (slot.pid is not None) == (
            slot.state in {State.STARTING, State.READY, State.STOPPING}
        )
        assert slot.stop_requested == (slot.state is State.STOPPING)
        assert (slot.fatal_reason is not None) == (slot.state is State.FATAL)
        json.dumps(as_row(slot, now))


@pytest.mark.parametrize(("code", "said"), [(3, "etcd unreachable"), (4, "lease lost")])
def test_etcd_unreachable_exits_back_off_but_never_go_fatal(code: int, said: str) -> None:
    """Issue 12.3: exit 3 (etcd unreachable) is not a crash; a long etcd outage must not
    park every slot in FATAL for the cool-down (before: 5 exits in 60 s -> FATAL). Issue
    11: nor is exit 4 (the watchdog's exit for a lease lost with a call running)."""
    slot, r = Slot(0), random.Random(7)
    delays = []
    for i in range(20):
        t = 10.0 + i
        spawned(slot, 100 + i, t)
        assert exited(slot, code, t + 0.5, POLICY, r) is State.BACKOFF
        delays.append((slot.next_start or 0) - (t + 0.5))
        assert said in (slot.last_exit or "")
    assert max(delays) <= POLICY.cap * (1 + POLICY.jitter)
    assert delays[-1] > delays[0]
