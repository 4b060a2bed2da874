"""Issue 11: after every member lost its lease at once (etcd stalled past the TTL), the
rejoin acquires each segment once: the first member back does not take every segment
and hand them on as the others come back (a cold start's churn, under load)."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

from fleet.work import pacing
from tests.support.etcd import PausableEtcd
from tests.support.fleet import status
from tests.support.procs import Spawner
from tests.support.supervised import ps, start_up, wait_alive, wait_ready
from tests.test_leader_timing import KEYS, assignments, history, is_acquire


def test_rejoin_hold_only_for_a_rejoined_leader_with_members_still_away() -> None:
    hold = pacing.rejoin_hold
    assert hold(["a", "b"], ["a"], rejoined_at=10.0, now=11.0) == 10.0 + pacing.REJOIN_WAIT
    assert hold(["a", "b"], ["a", "b"], rejoined_at=10.0, now=11.0) is None  # all back
    assert hold(["a", "b"], ["a"], rejoined_at=None, now=11.0) is None  # not a rejoin
    assert hold(None, ["a"], rejoined_at=10.0, now=11.0) is None  # nothing to keep
    assert hold(["a", "b"], ["a"], rejoined_at=10.0, now=10.0 + pacing.REJOIN_WAIT) is None


def test_after_a_mass_lease_loss_each_segment_is_acquired_once(
    etcd_server: PausableEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    segments, workers = 32, 4
    up = start_up(
        spawn,
        ledger_dir,
        etcd=etcd_server.endpoint,
        workers=workers,
        segments=segments,
        extra=["--lease-ttl", "3"],
    )
    endpoint, rows = wait_ready(up, tmp_path, workers)
    pids = sorted(r["pid"] for r in rows)
    before = status(endpoint)
    leases = {m["id"]: m["lease"] for m in before["members"]}
    revision = before["revision"]

    etcd_server.pause()
    time.sleep(7)  # past every worker's lease deadline (TTL 3)
    etcd_server.resume()

    def rejoined() -> bool:
        st = status(endpoint)
        ids = {m["id"]: m["lease"] for m in st["members"]}
        new = set(ids) == set(leases) and all(ids[k] != leases[k] for k in ids)
        return new and not st["unowned"] and not st["moving"]

    wait_alive(up, rejoined, "every member rejoined with a new lease and all owned", 60)
    time.sleep(2 * pacing.REJOIN_WAIT)  # anything still to move would have moved
    assert wait_alive(up, rejoined, "settled again", 30)

    after = [c for c in history(endpoint) if c.kv.mod_revision > revision]
    per_segment = Counter(KEYS.segment_of(c.kv.key) for c in after if is_acquire(c))
    assert per_segment == Counter(range(segments)), f"acquires per segment: {dict(per_segment)}"
    for written in assignments(after):
        counts = sorted(len(v) for v in written["members"].values())
        assert counts[-1] - counts[0] <= 1, f"an unbalanced assignment was written: {written}"
    # Nobody exited: the same worker processes rejoined.
    assert sorted(r["pid"] for r in ps(tmp_path)) == pids
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0, up.tail()
