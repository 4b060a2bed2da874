"""Acceptance: `fleet up` supervising real `fleet worker` children against a real etcd.

Start-up (all slots READY, balanced ownership, `ps` agrees with etcd), kill -9 of a
child (the supervisor revokes its lease: failover in well under a second, then the
slot is respawned under the same member id), a crash-looping slot (exponential
backoff, then FATAL, while the others keep every segment owned), a frozen child
(heartbeat timeout: killed and replaced) and `fleet scale` up and down (each
rebalance moves no more segments than a balanced result must). Every test ends with
the ledger check (no segment worked on under two tokens at once, tokens only grow).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from fleet.coord.etcd import Etcd
from fleet.coord.keys import Keys
from fleet.coord.view import FleetView
from fleet.server.embedded import EmbeddedEtcd
from fleet.supervise.control import RunDir, request
from tests.support.checker import assert_history_ok, load_calls
from tests.support.fleet import RECORDING, counts, owners, status, wait_converged
from tests.support.procs import Proc, Spawner
from tests.support.wait import wait_until

HOST = socket.gethostname()
CONVERGE_TIMEOUT = 60.0


def member(slot: int) -> str:
    """The member id `fleet up` gives slot `slot`."""
    return f"{HOST}-{slot}"


def members(n: int) -> list[str]:
    return [member(i) for i in range(n)]


def start_up(
    spawn: Spawner,
    endpoint: str,
    ledger_dir: Path,
    *,
    workers: int,
    segments: int,
    args: Sequence[str] = (),
    env: Mapping[str, str | None] | None = None,
) -> Proc:
    """`fleet up` in the test's directory, running the recording handler."""
    argv = [
        "up",
        "--workers",
        str(workers),
        "--segments",
        str(segments),
        "--etcd",
        endpoint,
        "--handler",
        RECORDING,
        "--interval",
        "0.05",
        "--host-id",  # member ids <host>-<slot>, as member() spells them
        HOST,
        *args,
    ]
    full_env: dict[str, str | None] = {
        "FLEET_TEST_LEDGER": str(ledger_dir),
        "FLEET_TEST_CALL_SECONDS": "0.05",
        "FLEET_EMBEDDED_PORT": "0",  # never 2379, should an etcd be started after all
    }
    full_env.update(env or {})
    return spawn(argv, env=full_env, name="up")


def ps(run_dir: Path) -> list[dict[str, Any]]:
    """`fleet ps --json`, asked over the control socket."""
    slots: list[dict[str, Any]] = request(RunDir(run_dir / ".fleet"), {"cmd": "ps"})["slots"]
    return slots


def row_of(rows: Sequence[Mapping[str, Any]], slot: int) -> dict[str, Any]:
    return dict(next(r for r in rows if r["slot"] == slot))


def require_alive(up: Proc) -> None:
    """Fail at once (not after a wait's timeout) if the supervisor has died."""
    if not up.alive:
        pytest.fail(f"fleet up exited with {up.returncode}:\n{up.tail()}")


def wait_ps(
    up: Proc,
    run_dir: Path,
    predicate: Callable[[list[dict[str, Any]]], bool],
    message: str,
    timeout: float = CONVERGE_TIMEOUT,
) -> list[dict[str, Any]]:
    """The `ps` rows once `predicate` holds for them."""
    last: list[list[dict[str, Any]]] = [[]]

    def check() -> list[dict[str, Any]] | None:
        require_alive(up)
        rows = ps(run_dir)
        last[0] = rows
        return rows if predicate(rows) else None

    try:
        rows = wait_until(check, timeout=timeout, message=message)
    except AssertionError as exc:
        exc.add_note(f"last ps: {last[0]}")
        raise
    assert rows is not None  # wait_until only returns a truthy value
    return rows


def all_ready(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    def check(rows: list[dict[str, Any]]) -> bool:
        return len(rows) == n and all(r["state"] == "READY" for r in rows)

    return check


def converge(up: Proc, endpoint: str, ids: Sequence[str]) -> dict[str, Any]:
    require_alive(up)
    st = wait_converged(endpoint, ids, timeout=CONVERGE_TIMEOUT)
    require_alive(up)
    return st


def run_cli(spawn: Spawner, args: Sequence[str], name: str) -> None:
    """Run `fleet ARGS` in the test's directory (next to `.fleet/`); it must exit 0."""
    proc = spawn(list(args), name=name)
    code = proc.wait(timeout=60)
    assert code == 0, f"fleet {' '.join(args)} exited {code}:\n{proc.tail()}"


def segments_of(st: Mapping[str, Any], member_id: str) -> list[int]:
    return sorted(seg for seg, owner in owners(st).items() if owner == member_id)


class OwnerPoller:
    """Segment owners read with one long-lived client (a few ms a read, no start-up)."""

    def __init__(self, endpoint: str) -> None:
        self.keys = Keys("/fleet", "default")
        self.etcd = Etcd([endpoint], timeout=3.0)

    def owners(self) -> dict[int, str]:
        view = FleetView.from_snapshot(self.keys, self.etcd.get_prefix(self.keys.root))
        return {seg: owner.member for seg, owner in view.owners().items()}

    def close(self) -> None:
        self.etcd.close()


def min_moves(before: Mapping[str, int], after: Sequence[str], segments: int) -> int:
    """The fewest segments that must change owner to go from `before` (segments owned
    per member, every segment owned) to a balanced split among `after` (equal weights).

    The quotas are ``floor`` or ``floor + 1``; a member can keep ``min(held, quota)``
    of its segments, and a ``+1`` keeps one more only for a member holding more than
    the floor, so the extra slots go to the biggest holders first.
    """
    floor, extra = divmod(segments, len(after))
    held = {m: before.get(m, 0) for m in after}
    ranked = sorted(after, key=lambda m: held[m], reverse=True)
    quota = {m: floor + (1 if rank < extra else 0) for rank, m in enumerate(ranked)}
    kept = sum(min(held[m], quota[m]) for m in after)
    return sum(before.values()) - kept


def changed_owners(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[int]:
    old, new = owners(before), owners(after)
    return sorted(seg for seg in old if old[seg] != new.get(seg))


# -- 1 ------------------------------------------------------------------------------------


def test_up_starts_ready_slots_with_balanced_ownership(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    ep = etcd_server.endpoint
    up = start_up(spawn, ep, ledger_dir, workers=4, segments=16)
    ids = members(4)

    st = converge(up, ep, ids)
    assert counts(st) == dict.fromkeys(ids, 4), st
    rows = wait_ps(up, tmp_path, all_ready(4), "all 4 slots READY")
    assert [r["slot"] for r in rows] == [0, 1, 2, 3], rows
    assert [r["member"] for r in rows] == ids, rows
    for r in rows:
        assert r["pid"] and r["restarts"] == 0 and r["last_exit"] is None, r
        assert r["lease"], r

    st = status(ep)
    ps_pids = {r["member"]: r["pid"] for r in ps(tmp_path)}
    status_pids = {m["id"]: m["pid"] for m in st["members"]}
    assert ps_pids == status_pids, (ps_pids, status_pids)
    status_slots = {m["id"]: m["slot"] for m in st["members"]}
    assert status_slots == {member(i): i for i in range(4)}, st["members"]

    time.sleep(0.5)
    assert_history_ok(ledger_dir, min_calls=20)

    # `fleet down` stops everything and cleans up after itself.
    run_cli(spawn, ["down"], "down")
    assert up.wait(timeout=30) == 0, up.tail()
    assert not (tmp_path / ".fleet" / "fleet.pid").exists()
    assert_history_ok(ledger_dir, min_calls=20)


# -- 2 ------------------------------------------------------------------------------------


def test_kill_9_of_a_child_fails_over_at_once_and_respawns(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    ep = etcd_server.endpoint
    up = start_up(spawn, ep, ledger_dir, workers=4, segments=16, args=["--lease-ttl", "10"])
    ids = members(4)
    st = converge(up, ep, ids)
    rows = wait_ps(up, tmp_path, all_ready(4), "all 4 slots READY")

    # A follower, so that the measurement is about the revocation, not an election.
    slot = next(i for i in range(4) if member(i) != st["leader"])
    victim = member(slot)
    others = [m for m in ids if m != victim]
    victim_segments = segments_of(st, victim)
    assert victim_segments, st
    old_pid = row_of(rows, slot)["pid"]

    poller = OwnerPoller(ep)
    try:
        poller.owners()  # connected before the clock starts
        killed = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        moved_at = None
        while time.monotonic() - killed < 15.0:
            require_alive(up)
            now = poller.owners()
            if all(now.get(seg) in others for seg in victim_segments):
                moved_at = time.monotonic()
                break
            time.sleep(0.01)
    finally:
        poller.close()
    assert moved_at is not None, f"segments {victim_segments} of {victim} never moved"
    elapsed = moved_at - killed
    print(f"kill -9 of {victim}: {victim_segments} owned by the others in {elapsed:.3f}s")
    assert elapsed < 1.0, f"failover took {elapsed:.2f}s (lease TTL 10 s): not revoked?"

    rows = wait_ps(
        up,
        tmp_path,
        lambda rows: (
            row_of(rows, slot)["state"] == "READY"
            and row_of(rows, slot)["pid"] not in (None, old_pid)
        ),
        f"slot {slot} respawned",
    )
    row = row_of(rows, slot)
    assert row["restarts"] == 1, row
    assert "SIGKILL" in (row["last_exit"] or ""), row
    assert row["member"] == victim, row

    st = converge(up, ep, ids)
    assert counts(st) == dict.fromkeys(ids, 4), st
    pids = {m["id"]: m["pid"] for m in st["members"]}
    assert pids[victim] == row["pid"], (pids, row)
    assert all(r["restarts"] == 0 for r in ps(tmp_path) if r["slot"] != slot)

    time.sleep(0.5)
    assert_history_ok(ledger_dir, min_calls=20)


# -- 3 ------------------------------------------------------------------------------------

RESPAWN_LINE = re.compile(r"w2 exited: ([^;]*); respawn in (\d+(?:\.\d+)?)s")


def test_crash_looping_slot_backs_off_then_goes_fatal(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    ep = etcd_server.endpoint
    crasher = 2
    up = start_up(
        spawn,
        ep,
        ledger_dir,
        workers=4,
        segments=12,
        env={"FLEET_TEST_EXIT_ON_CALL": "1", "FLEET_TEST_EXIT_SLOT": str(crasher)},
    )
    others = [member(i) for i in range(4) if i != crasher]
    poller = OwnerPoller(ep)
    try:

        def others_own_all() -> bool:
            require_alive(up)
            now = poller.owners()
            return len(now) == 12 and set(now.values()) == set(others)

        wait_until(others_own_all, timeout=CONVERGE_TIMEOUT, message="the other 3 own all 12")

        # Sample ownership every 0.5 s until the slot is FATAL, and 6 s beyond.
        samples: list[tuple[float, list[int]]] = []
        fatal_at: float | None = None
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            require_alive(up)
            now = poller.owners()
            samples.append((time.monotonic(), [s for s in range(12) if s not in now]))
            if fatal_at is None and row_of(ps(tmp_path), crasher)["state"] == "FATAL":
                fatal_at = time.monotonic()
            if fatal_at is not None and time.monotonic() - fatal_at > 6.0:
                break
            time.sleep(0.5)
    finally:
        poller.close()
    assert fatal_at is not None, f"slot {crasher} never went FATAL: {ps(tmp_path)}"

    row = row_of(ps(tmp_path), crasher)
    assert row["state"] == "FATAL", row
    assert row["restarts"] == 4, row
    assert row["pid"] is None, row
    assert row["last_exit"] == "exit 1", row
    assert "5 exits" in (row["fatal_reason"] or ""), row
    assert all(
        r["state"] == "READY" and r["restarts"] == 0 for r in ps(tmp_path) if r["slot"] != crasher
    ), ps(tmp_path)

    log = up.log()
    respawns = RESPAWN_LINE.findall(log)
    delays = [float(d) for _exit, d in respawns]
    assert len(delays) == 4, f"expected 4 respawn lines, found {respawns}:\n{up.tail()}"
    assert all(exit_ == "exit 1" for exit_, _d in respawns), respawns
    assert all(b > a for a, b in zip(delays, delays[1:], strict=False)), delays
    assert re.search(r"w2 exited: exit 1; FATAL: ", log), up.tail()

    # Every segment stayed owned but for brief handoffs.
    print(f"respawn delays {delays}; {len(samples)} samples")
    assert len(samples) >= 10, samples
    for i, (t, unowned) in enumerate(samples):
        if not unowned:
            continue
        recovered = any(not later and t2 - t <= 5.0 for t2, later in samples[i + 1 :])
        assert recovered, f"segments {unowned} unowned at sample {i} for over 5 s: {samples}"
    assert not samples[-1][1], samples

    converge(up, ep, others)
    time.sleep(0.5)
    calls = assert_history_ok(ledger_dir, min_calls=20)
    crashed = [c for c in calls if c.member == member(crasher)]
    assert len({c.pid for c in crashed}) == 5, crashed  # five lives, one call each
    assert all(c.end is None for c in crashed), crashed


# -- 4 ------------------------------------------------------------------------------------


def test_frozen_child_is_killed_after_heartbeat_timeout_and_replaced(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """A frozen (SIGSTOP) worker is killed without being continued first: SIGCONT (for a
    stack dump) would let its threads run on for a moment, a handler thread that had
    passed its deadline check included, under a lease that may be gone (chaos, cluster
    mode: a call started under a stale token)."""
    ep = etcd_server.endpoint
    up = start_up(spawn, ep, ledger_dir, workers=4, segments=16, args=["--heartbeat-timeout", "2"])
    ids = members(4)
    st = converge(up, ep, ids)
    rows = wait_ps(up, tmp_path, all_ready(4), "all 4 slots READY")
    slot = next(i for i in range(4) if member(i) != st["leader"])
    old_pid = row_of(rows, slot)["pid"]

    stopped = time.monotonic()
    os.kill(old_pid, signal.SIGSTOP)
    rows = wait_ps(
        up,
        tmp_path,
        lambda rows: row_of(rows, slot)["pid"] not in (None, old_pid),
        f"slot {slot} killed and respawned",
    )
    print(f"frozen w{slot} replaced after {time.monotonic() - stopped:.2f}s")
    row = row_of(rows, slot)
    assert "SIGKILL" in (row["last_exit"] or ""), row
    assert row["restarts"] == 1, row
    assert re.search(rf"w{slot} \(pid {old_pid}\) no heartbeat", up.log()), up.tail()
    assert "Fatal Python error" not in up.log(), up.tail()  # it never ran again
    late = [c for c in load_calls(ledger_dir) if c.pid == old_pid and c.start > stopped]
    assert not late, late

    st = converge(up, ep, ids)
    assert not st["unowned"], st
    assert counts(st) == dict.fromkeys(ids, 4), st

    rows = wait_ps(up, tmp_path, all_ready(4), "all 4 slots READY again")
    assert {m["id"]: m["pid"] for m in st["members"]}[member(slot)] == row_of(rows, slot)["pid"]

    time.sleep(0.5)
    assert_history_ok(ledger_dir, min_calls=20)


def test_hung_child_holding_the_gil_is_killed_with_its_stacks(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """Issue 12.8: a hung worker (running, but no thread of it gets the GIL: a C
    extension that never releases it) is killed with SIGABRT, so faulthandler leaves
    its stacks behind, and replaced."""
    ep = etcd_server.endpoint
    gil_dir = tmp_path / "gil"
    gil_dir.mkdir()
    up = start_up(
        spawn, ep, ledger_dir, workers=2, segments=4, args=["--heartbeat-timeout", "2"],
        env={"FLEET_TEST_GIL_DIR": str(gil_dir)},
    )  # fmt: skip
    ids = members(2)
    st = converge(up, ep, ids)
    rows = wait_ps(up, tmp_path, all_ready(2), "both slots READY")
    slot = next(i for i in range(2) if member(i) != st["leader"])
    old_pid = row_of(rows, slot)["pid"]
    (gil_dir / member(slot)).write_text(str(old_pid))  # that process only, not its successor
    rows = wait_ps(
        up,
        tmp_path,
        lambda rows: row_of(rows, slot)["pid"] not in (None, old_pid),
        f"slot {slot} killed and respawned",
        timeout=60,
    )
    row = row_of(rows, slot)
    assert re.search(r"SIGABRT|SIGKILL", row["last_exit"] or ""), row
    assert re.search(rf"w{slot} \(pid {old_pid}\) no heartbeat", up.log()), up.tail()
    assert f"w{slot} | Fatal Python error: Aborted" in up.log(), up.tail()
    st = converge(up, ep, ids)
    assert not st["unowned"], st


# -- 5 ------------------------------------------------------------------------------------


def test_scale_up_and_down_moves_the_fewest_segments(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    ep = etcd_server.endpoint
    segments = 16
    up = start_up(spawn, ep, ledger_dir, workers=4, segments=segments)
    st4 = converge(up, ep, members(4))
    assert counts(st4) == dict.fromkeys(members(4), 4), st4

    run_cli(spawn, ["scale", "6"], "scale-6")
    st6 = converge(up, ep, members(6))
    wait_ps(up, tmp_path, all_ready(6), "6 slots READY")
    moved = changed_owners(st4, st6)
    expected = min_moves(counts(st4), members(6), segments)
    print(f"4 -> 6: moved {moved} (minimum {expected}); counts {counts(st6)}")
    assert len(moved) == expected, (moved, expected, counts(st4), counts(st6))

    run_cli(spawn, ["scale", "2"], "scale-2")
    st2 = converge(up, ep, members(2))
    rows = wait_ps(up, tmp_path, all_ready(2), "only slots 0 and 1 left, READY")
    assert [r["slot"] for r in rows] == [0, 1], rows
    moved = changed_owners(st6, st2)
    expected = min_moves(counts(st6), members(2), segments)
    print(f"6 -> 2: moved {moved} (minimum {expected}); counts {counts(st2)}")
    assert len(moved) == expected, (moved, expected, counts(st6), counts(st2))
    log = up.log()
    for i in range(2, 6):
        assert f"w{i} stopped: exit 0" in log, up.tail()

    time.sleep(0.5)
    assert_history_ok(ledger_dir, min_calls=20)
