"""A worker frozen (SIGSTOP) past its lease is fenced out, then rejoins with a new lease.

The victim runs long cooperative calls (1 s, returning early when told to stop) with
almost no pause between them, so a SIGSTOP nearly always freezes it mid-call. While it
is frozen its lease expires on the server and the other two take its segments. When it
is continued, its local deadline has passed: the call in flight must be fenced (its
commit recorded as "lost"), it must start no new call under a token it held before
the pause, and it must come back as a fresh member with a new lease.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil

from fleet.server.embedded import EmbeddedEtcd
from tests.support.checker import Call, assert_history_ok, load_calls
from tests.support.fleet import start_worker, wait_converged
from tests.support.procs import Proc, Spawner
from tests.support.wait import wait_until

LEASE_TTL = 3
ATTEMPTS = 3
VICTIM = "victim"


def _wait_stopped(proc: Proc, stopped: bool) -> None:
    """Until the kernel reports the process stopped (or running again)."""

    def check() -> bool:
        state = psutil.Process(proc.pid).status()
        return (state == psutil.STATUS_STOPPED) == stopped

    wait_until(check, timeout=5, interval=0.005, message=f"{proc.name} stopped={stopped}")


def _pause_cycle(
    endpoint: str, victim: Proc, victim_id: str, others: list[str], ledger_dir: Path
) -> tuple[float, set[int]]:
    """Freeze the victim past its lease and continue it; returns (stop time, old tokens).

    The stop time is taken once the kernel reports the process stopped, so any call
    the victim records as starting later really started after the freeze.
    """
    st = wait_converged(endpoint, [*others, victim_id])
    member = next(m for m in st["members"] if m["id"] == victim_id)
    lease_before = member["lease"]
    segments_before = member["owned"]
    assert segments_before, f"{victim_id} owns nothing before the pause: {st}"
    held = {s["token"] for s in st["segment_owners"] if s["owner"] == victim_id}

    victim.signal(signal.SIGSTOP)
    _wait_stopped(victim, stopped=True)
    t_stop = time.monotonic()
    try:
        # Its member key expires with its lease; the other two take all 12 segments.
        st = wait_converged(endpoint, others, timeout=LEASE_TTL + 30)
        assert all(s["owner"] in others for s in st["segment_owners"])
        assert sorted(s["segment"] for s in st["segment_owners"]) == list(range(12))
        remaining = t_stop + LEASE_TTL + 2 - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
    finally:
        victim.signal(signal.SIGCONT)
    _wait_stopped(victim, stopped=False)

    # (a) it lives through the resume and rejoins as a new member.
    st = wait_converged(endpoint, [*others, victim_id], timeout=60)
    assert victim.alive, f"{victim_id} died after SIGCONT:\n{victim.tail()}"
    member = next(m for m in st["members"] if m["id"] == victim_id)
    assert member["lease"] != lease_before, "the victim rejoined under its old lease"
    assert member["pid"] == victim.pid, "the victim was replaced, not resumed"

    own_calls = [c for c in load_calls(ledger_dir) if c.pid == victim.pid]
    old_tokens = held | {c.token for c in own_calls if c.start < t_stop}
    return t_stop, old_tokens


def _fenced(calls: list[Call], pid: int, t_stop: float) -> list[Call]:
    """The victim's calls that were in flight at the freeze and whose commit was refused."""
    return [
        c
        for c in calls
        if c.pid == pid and c.commit == "lost" and c.start < t_stop and (c.end or 0) > t_stop
    ]


def test_sigstop_longer_than_ttl_fences_then_rejoins(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    ep = etcd_server.endpoint
    others = ["w0", "w1"]
    for member_id in others:
        start_worker(spawn, ep, member_id, ledger_dir, lease_ttl=LEASE_TTL)
    victim = start_worker(
        spawn,
        ep,
        VICTIM,
        ledger_dir,
        lease_ttl=LEASE_TTL,
        interval=0.01,
        call_seconds=1.0,
        env={"FLEET_TEST_COOPERATIVE": "1"},
    )

    stops: list[tuple[float, set[int]]] = []
    for _attempt in range(ATTEMPTS):
        t_stop, old_tokens = _pause_cycle(ep, victim, VICTIM, others, ledger_dir)
        stops.append((t_stop, old_tokens))
        if _fenced(load_calls(ledger_dir), victim.pid, t_stop):
            break
    calls = load_calls(ledger_dir)

    # (b) a call frozen mid-flight had its commit rejected after the resume.
    assert any(_fenced(calls, victim.pid, t) for t, _ in stops), (
        f"no fenced ('lost') call of the victim (pid {victim.pid}) in {len(stops)} pause cycles"
    )
    # (c) after each freeze, no call started under a token held before it.
    for t_stop, old_tokens in stops:
        late = [
            c for c in calls if c.pid == victim.pid and c.token in old_tokens and c.start > t_stop
        ]
        assert not late, f"calls under pre-pause tokens {sorted(old_tokens)} started after it: " + (
            ", ".join(c.describe() for c in late)
        )
    # The rejoined victim works again, under new tokens.
    wait_until(
        lambda: any(
            c.pid == victim.pid and c.start > stops[-1][0] and c.commit == "ok"
            for c in load_calls(ledger_dir)
        ),
        timeout=15,
        message="the rejoined victim completes a call",
    )
    # (d) everything else is a safe history.
    assert_history_ok(ledger_dir, allow_fenced=True, min_calls=20)
    assert victim.alive
