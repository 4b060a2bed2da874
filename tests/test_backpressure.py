"""Backpressure from etcd latency (issue 11): the AIMD rule, and a real worker behind a
slow link that spaces its calls, says so once, shows it in `fleet status`, and recovers."""

from __future__ import annotations

import re
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fleet.server.embedded import EmbeddedEtcd
from fleet.work.backpressure import MAX_STRETCH, STEP, Backpressure, next_stretch, slow_after
from tests.chaos.proxy import TcpProxy
from tests.support.fleet import start_worker, status
from tests.support.procs import Spawner
from tests.support.wait import wait_until

stretches = st.floats(min_value=1.0, max_value=MAX_STRETCH)
round_trips = st.floats(min_value=0.0, max_value=60.0)


@given(stretches, round_trips, st.floats(min_value=0.01, max_value=5.0))
def test_the_stretch_stays_between_1_and_the_cap(stretch: float, p99: float, limit: float) -> None:
    after = next_stretch(stretch, p99, limit)
    assert 1.0 <= after <= MAX_STRETCH
    if p99 > limit:
        assert after == min(MAX_STRETCH, stretch + STEP)  # additive increase
    else:
        assert after <= stretch and (after == 1.0 or after == stretch / 2)  # halved back


@given(stretches)
def test_a_healthy_etcd_brings_any_stretch_back_to_1_within_a_few_windows(stretch: float) -> None:
    for _ in range(4):  # log2(MAX_STRETCH) + 1
        stretch = next_stretch(stretch, 0.0, 0.5)
    assert stretch == 1.0


@given(st.lists(round_trips, min_size=3, max_size=200))
def test_a_window_is_judged_by_its_p99(samples: list[float]) -> None:
    pressure = Backpressure(0.5, window=1.0, now=0.0)
    for i, s in enumerate(samples):
        pressure.observe(s, now=0.5 * i / len(samples))
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    assert pressure.stretch(now=1.0) == (1.0 + STEP if p99 > 0.5 else 1.0)


def test_a_quiet_window_does_not_end_shedding_and_few_samples_do_not_start_it() -> None:
    pressure = Backpressure(0.5, window=1.0, now=0.0)
    pressure.observe(3.0, now=0.1)
    assert pressure.stretch(now=1.1) == 1.0  # one slow round trip is too little to judge
    pressure.observe(2.0, now=1.2)
    pressure.observe(2.0, now=1.3)  # the third: judged now
    assert pressure.stretch(now=1.3) == 1.0 + STEP
    assert pressure.shedding() is not None
    assert pressure.stretch(now=2.5) == 1.0 + STEP  # nothing came back: still slow
    for t in (2.6, 2.7, 2.8):
        pressure.observe(0.01, now=t)
    assert pressure.stretch(now=3.6) == 1.0 and pressure.shedding() is None


def test_shedding_starts_before_the_lease_is_at_risk() -> None:
    for ttl in (2, 3, 5, 10, 30, 60):
        at_risk = ttl - ttl / 3 - min(2.0, max(0.4, ttl * 0.2))
        assert 0 < slow_after(ttl) < at_risk


def test_a_worker_behind_a_slow_etcd_spaces_its_calls_says_so_once_and_recovers(
    spawn: Spawner, etcd_server: EmbeddedEtcd, tmp_path: Path
) -> None:
    """0.4 s each way to etcd: every commit takes 0.8 s, above the 0.5 s threshold of a
    TTL-10 lease. The worker keeps its lease, logs one line when it starts shedding load,
    `fleet status` shows it, and once the link heals it logs one line and goes back."""
    direct = etcd_server.endpoint
    with TcpProxy(("127.0.0.1", etcd_server.client_port)) as proxy:
        worker = start_worker(
            spawn,
            proxy.endpoint,
            "bp-0",
            tmp_path / "ledger",
            segments=4,
            interval=0.2,
            handler="fleet.demo:handle",
        )
        wait_until(
            lambda: len(status(direct)["members"]) == 1 and not status(direct)["unowned"],
            timeout=30,
            message="the segments owned",
        )
        lease = status(direct)["members"][0]["lease"]
        proxy.slow(latency=0.4)
        wait_until(lambda: "shedding load" in worker.log(), timeout=30, message="the shedding line")
        shown = wait_until(
            lambda: (m := status(direct)["members"]) and m[0].get("shedding"),
            timeout=30,
            message="shedding in fleet status",
        )
        assert shown["stretch"] > 1.0 and shown["p99_ms"] > 500
        time.sleep(6)  # the stretch grows while etcd stays slow
        proxy.heal()
        wait_until(lambda: "etcd keeps up again" in worker.log(), timeout=60, message="recovery")
        wait_until(
            lambda: not status(direct)["members"][0].get("shedding"),
            timeout=30,
            message="shedding gone from fleet status",
        )
        log = worker.log()
        assert log.count("etcd is slow (round trip p99") == 1, log
        assert log.count("etcd keeps up again") == 1, log
        peak = re.search(r"shedding load \(at most ([\d.]+)x\)", log)
        assert peak and float(peak.group(1)) >= 2.0, log  # additive increase over ~10 s
        assert "lease lost" not in log and "starting over" not in log, log
        assert status(direct)["members"][0]["lease"] == lease
        assert worker.alive
