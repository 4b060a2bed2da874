"""etcd itself fails: killed (-9) and restarted, or frozen for less than a lease TTL.

Workers must ride it out without dying: keepalives and watches fail while etcd is
gone and are re-established when it is back (see "The etcd client and its traps" in
DESIGN.md); the fleet converges again, work continues, and no segment is ever
worked on under two tokens at once.
"""

from __future__ import annotations

import time
from pathlib import Path

from fleet.server.embedded import EmbeddedEtcd
from tests.support.checker import assert_history_ok, load_calls
from tests.support.fleet import owners, start_worker, tokens, wait_converged
from tests.support.procs import Proc, Spawner
from tests.support.wait import wait_until

MEMBERS = ["w0", "w1", "w2"]


def _start_fleet(spawn: Spawner, endpoint: str, ledger_dir: Path) -> list[Proc]:
    procs = [start_worker(spawn, endpoint, m, ledger_dir, lease_ttl=10) for m in MEMBERS]
    wait_converged(endpoint, MEMBERS)
    return procs


def _assert_alive(procs: list[Proc]) -> None:
    dead = [p for p in procs if not p.alive]
    assert not dead, "workers died: " + "; ".join(
        f"{p.name} exited {p.returncode}:\n{p.tail()}" for p in dead
    )


def _wait_work_after(ledger_dir: Path, since: float, min_calls: int = 30) -> None:
    """Every member completes calls started after `since`, at least `min_calls` in all."""

    def check() -> bool:
        done = [c for c in load_calls(ledger_dir) if c.start > since and c.commit == "ok"]
        return len(done) >= min_calls and {c.member for c in done} == set(MEMBERS)

    wait_until(check, timeout=30, message=f"{min_calls} committed calls by every member")


def test_etcd_kill_9_and_restart_workers_recover(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    ep = etcd_server.endpoint
    procs = _start_fleet(spawn, ep, ledger_dir)

    etcd_server.kill()
    time.sleep(2)
    calls_while_down = len(load_calls(ledger_dir))
    etcd_server.restart()
    restarted = time.monotonic()

    _assert_alive(procs)
    wait_converged(ep, MEMBERS, timeout=60)
    _assert_alive(procs)
    _wait_work_after(ledger_dir, restarted)
    assert len(load_calls(ledger_dir)) > calls_while_down
    assert_history_ok(ledger_dir, min_calls=50)


def test_etcd_paused_shorter_than_ttl_workers_keep_segments(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    ep = etcd_server.endpoint
    procs = _start_fleet(spawn, ep, ledger_dir)
    st = wait_converged(ep, MEMBERS)
    leases = {m["id"]: m["lease"] for m in st["members"]}

    etcd_server.pause()
    time.sleep(3)
    etcd_server.resume()
    resumed = time.monotonic()

    _assert_alive(procs)
    after = wait_converged(ep, MEMBERS, timeout=60)
    # 3 s is well inside a 10 s lease: nobody lost its lease, nothing moved.
    assert {m["id"]: m["lease"] for m in after["members"]} == leases
    assert owners(after) == owners(st)
    assert tokens(after) == tokens(st)
    _wait_work_after(ledger_dir, resumed)
    _assert_alive(procs)
    assert_history_ok(ledger_dir, min_calls=50)
