"""Chaos with a slow link (issue 11): the proxied worker's etcd traffic delayed and
throttled, never cut. The fleet slows down, nothing crashes, the checker finds nothing.

One run of `tests.chaos.run` (in-process) restricted to the `slow_network` kind
(`--kinds slow_network`): `fleet up` with 4 workers plus the proxied worker, ~40 s of
faults, each adding 0.2-1 s of one-way latency and a 2-200 KiB/s bandwidth limit to the
proxy for 3-8 s, then healing it. Under the worse of them the proxied worker loses its
lease (a keepalive acknowledged too late for its local deadline), which is safe: it
stops calling, starts over with a new lease, and its late commits are fenced.

It passes when the run passes (no history violation, recovery within TTL + 5 s, a clean
`fleet down`), no slow fault closed a connection, the only exits of the proxied worker
were the documented ones (none, or its watchdog's), no log holds a traceback, and the
proxied worker still got calls through while slowed (slower, not cut off).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.faults import CLUSTER_KINDS, KINDS, RESOURCES, make_plan
from tests.chaos.report import render
from tests.chaos.run import Options, parse_args, run_chaos
from tests.support.checker import load_calls

DURATION = 40.0
SEED = 11  # its plan has slow faults on both sides of the lease-losing latency


def slow_windows(summary: dict[str, Any]) -> list[tuple[float, float, dict[str, Any]]]:
    return [
        (float(f["start"]), float(f["end"]), f["detail"])
        for f in summary["faults"]
        if f["kind"] == "slow_network" and f.get("start") is not None and not f.get("skipped")
    ]


def test_slow_network_is_a_kind_of_both_modes_planned_within_its_ranges() -> None:
    assert "slow_network" in KINDS and "slow_network" in CLUSTER_KINDS
    assert RESOURCES["slow_network"] == RESOURCES["network_cut"], "cut and slow must not overlap"
    for seed in range(20):
        plan = make_plan(random.Random(seed), 60.0, lease_ttl=3, workers=4, kinds=KINDS)
        slow = [p for p in plan if p.kind == "slow_network"]
        assert slow and slow[0].guaranteed
        for p in slow:
            assert 0.2 <= p.params["latency"] <= 1.0, p  # TTL/3 at TTL 3
            assert 2 * 1024 <= p.params["bandwidth"] <= 200 * 1024, p
            assert 3.0 <= p.seconds <= 8.0, p
    # A long TTL does not stretch the latency past 1 s; a short one keeps it under TTL/3.
    long = make_plan(random.Random(1), 60.0, lease_ttl=10, workers=4, kinds=("slow_network",))
    assert all(p.params["latency"] <= 1.0 for p in long)
    short = make_plan(random.Random(1), 60.0, lease_ttl=1, workers=4, kinds=("slow_network",))
    assert all(p.params["latency"] <= 1 / 3 + 1e-9 for p in short)


def test_kinds_option_restricts_the_plan_and_rejects_unknown_kinds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    opts = parse_args(["--kinds", "slow_network, kill9_worker"])
    assert opts.kinds == ("slow_network", "kill9_worker")
    assert parse_args([]).kinds is None
    assert parse_args(["--cluster", "--kinds", "quorum_loss"]).kinds == ("quorum_loss",)
    for bad in (["--kinds", "slow_netwrok"], ["--kinds", ","], ["--kinds", "quorum_loss"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert "--kinds" in capsys.readouterr().err
    plan = make_plan(random.Random(5), 30.0, lease_ttl=3, workers=4, kinds=opts.kinds)
    assert {p.kind for p in plan} == {"slow_network", "kill9_worker"}


@pytest.mark.timeout(300)
def test_slow_network_chaos_slows_the_fleet_but_breaks_nothing(tmp_path: Path) -> None:
    opts = Options(
        duration=DURATION,
        seed=SEED,
        out=tmp_path,
        work_dir=tmp_path / "work",
        kinds=("slow_network",),
    )
    summary = run_chaos(opts)
    report = render(summary)
    print(report)
    assert summary["pass"], f"slow chaos run (seed {SEED}) failed:\n{report}"
    assert summary["kinds"] == ["slow_network"]
    assert set(summary["faults_by_kind"]) == {"slow_network"}
    assert not summary["violations"], summary["violations"]
    assert summary["recovery"]["within_bound"], summary["recovery"]

    windows = slow_windows(summary)
    assert len(windows) >= 3, summary["faults_by_kind"]
    for _start, _end, d in windows:
        # What was applied is on the record, within the planned ranges.
        assert 0.2 <= d["latency"] <= 1.0 and 2 * 1024 <= d["bandwidth"] <= 200 * 1024, d
        assert d["connections_closed"] == 0, f"a slow fault cut a connection: {d}"
    assert sum(d["bytes_delayed"] for _s, _e, d in windows) > 0, "no traffic was slowed"
    assert summary["proxy"]["killed"] == 0 and summary["proxy"]["cuts"] == 0

    # Nothing crashed: the proxied worker left only by its watchdog (documented, exit 4),
    # if at all; `fleet up` never respawned anyone; no traceback anywhere.
    exits = summary["events"]["proxied_exits"]
    assert all(e["watchdog"] and e["code"] == 4 for e in exits), exits
    assert summary["events"]["supervisor_respawns"] == 0, summary["events"]
    assert not summary["events"]["tracebacks"], summary["events"]["tracebacks"]

    # Slower, not cut off: the proxied worker's calls went on inside the slow windows.
    calls = [
        c
        for c in load_calls(tmp_path / "work" / "ledger")
        if c.member == "proxied" and not c.is_hook
    ]
    inside = [c for c in calls if any(s <= c.start <= e for s, e, _d in windows)]
    slowed = sum(e - s for s, e, _d in windows)
    # Its pace at full speed: its calls in the seconds between joining and the first fault.
    first = windows[0][0]
    before = [c.start for c in calls if c.start < first]
    pace = len(before) / (first - min(before)) if len(before) > 1 else float("nan")
    print(
        f"proxied worker: {len(inside)} calls in {slowed:.1f} s slowed "
        f"({sum(1 for c in inside if c.commit == 'ok')} committed), against {pace:.1f} "
        f"calls/s before the faults; leases lost while slowed: "
        f"{sum(d['proxied_leases_lost'] for _s, _e, d in windows)}"
    )
    assert any(c.commit == "ok" for c in inside), "no commit got through a slow link"
