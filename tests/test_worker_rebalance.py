"""Acceptance: convergence, minimal movement on join, failover on kill -9 and SIGTERM."""

from __future__ import annotations

import time
from pathlib import Path

from fleet.server.embedded import EmbeddedEtcd
from tests.support.checker import assert_history_ok
from tests.support.fleet import counts, owners, start_worker, wait_converged
from tests.support.procs import Spawner


def test_three_converge_then_a_fourth_join_moves_exactly_three(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    ep = etcd_server.endpoint
    for i in range(3):
        start_worker(spawn, ep, f"w{i}", ledger_dir)
    st = wait_converged(ep, ["w0", "w1", "w2"])
    assert sorted(counts(st).values()) == [4, 4, 4]
    before = owners(st)
    generation = st["generation"]

    start_worker(spawn, ep, "w3", ledger_dir)
    st = wait_converged(ep, ["w0", "w1", "w2", "w3"])
    after = owners(st)
    assert sorted(counts(st).values()) == [3, 3, 3, 3]
    assert sum(1 for seg in before if before[seg] != after[seg]) == 3
    assert st["generation"] == generation + 1, "one join, one new assignment"
    time.sleep(0.5)
    assert_history_ok(ledger_dir, min_calls=50)
