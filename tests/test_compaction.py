"""etcd history must not grow without bound (issue 7, item 11).

Every checkpoint commit is a new etcd revision and etcd keeps them all until something
compacts; once the backend reaches its quota etcd refuses every write (NOSPACE) until an
operator compacts, defragments and disarms the alarm. These tests run real etcd servers
with a tiny `--quota-backend-bytes` and no auto-compaction (an external cluster nobody
configured), and real worker processes:

- without compaction such a fleet fills the quota quickly (so the next test means
  something), and the worker reports NOSPACE once and stays up instead of crash-looping;
- with the leader's compaction the same fleet writes several times the quota without
  ever reaching it;
- NOSPACE surfaces as `EtcdNoSpace` (a retryable `EtcdUnavailable`) with the remedy in
  its message, and `fleet status` warns while the alarm is active;
- the embedded etcd compacts itself and has a quota;
- the compactor picks the newest revision at least `window` old (injected clock).
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fleet.coord.compaction import Compactor
from fleet.coord.etcd import (
    Changes,
    Compare,
    Etcd,
    EtcdCompacted,
    EtcdNoSpace,
    EtcdUnavailable,
    Put,
    Resync,
    is_compacted,
)
from fleet.coord.keys import Keys
from fleet.coord.status import collect, render
from fleet.coord.watch import PrefixWatch
from fleet.server.embedded import QUOTA_BACKEND_BYTES, EmbeddedEtcd, free_port
from tests.support.fleet import CLEAN_ENV, start_worker
from tests.support.procs import Proc, Spawner

if TYPE_CHECKING:
    from fleet import SegmentContext

MiB = 1024 * 1024
QUOTA = 16 * MiB
PAD = 4 * 1024  # bytes of padding per checkpoint
# Pause between calls per segment: 16 segments then commit at most 800 times (3.3 MB) a
# second. Unpaced, one worker commits ~30 MB/s here: more than a 1 s window can hold.
CALL_INTERVAL = 0.02
SEGMENTS = 16
KEYS = Keys("/fleet", "default")


def bulky(ctx: SegmentContext) -> None:
    """Handler for the workers of these tests: a counter plus PAD bytes per commit."""
    count = (ctx.checkpoint or {}).get("n", 0) + 1
    ctx.commit({"n": count, "pad": "x" * PAD})


BULKY = "tests.test_compaction:bulky"
COMMIT_BYTES = len(json.dumps({"n": 1000, "pad": "x" * PAD}, separators=(",", ":")))


def _small_etcd(tmp_path: Path, name: str, quota: int = QUOTA) -> EmbeddedEtcd:
    """A started etcd that never compacts by itself, with a `quota`-byte backend."""
    etcd = EmbeddedEtcd(
        tmp_path / name,
        log_path=tmp_path / f"{name}.log",
        # Last on the command line, so they override the embedded defaults.
        extra_args=["--quota-backend-bytes", str(quota), "--auto-compaction-retention", "0"],
    )
    etcd.start()
    return etcd


@pytest.fixture
def small_etcd(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    etcd = _small_etcd(tmp_path, "small-etcd")
    try:
        yield etcd
    finally:
        etcd.kill()


@pytest.fixture
def client(small_etcd: EmbeddedEtcd) -> Iterator[Etcd]:
    etcd = Etcd([small_etcd.endpoint], timeout=3.0)
    try:
        yield etcd
    finally:
        etcd.close()


def _commits(client: Etcd) -> int:
    """Checkpoint commits so far: each segment's counter is its number of commits."""
    snapshot = client.get_prefix(KEYS.checkpoints)
    return sum(json.loads(kv.value)["n"] for kv in snapshot.kvs)


def _run_fleet(
    spawn: Spawner,
    small_etcd: EmbeddedEtcd,
    client: Etcd,
    tmp_path: Path,
    *,
    compact_interval: float,
    until_bytes: int,
    budget: float,
) -> dict[str, Any]:
    """Run one bulky worker until it has committed `until_bytes`, NOSPACE, or `budget` s."""
    worker = start_worker(
        spawn,
        small_etcd.endpoint,
        "w0",
        tmp_path,
        segments=SEGMENTS,
        interval=CALL_INTERVAL,
        handler=BULKY,
        env={
            **CLEAN_ENV,
            "FLEET_ETCD_COMPACT_INTERVAL": str(compact_interval),
            "FLEET_ETCD_COMPACT_WINDOW": "1",
        },
    )
    started = time.monotonic()
    result: dict[str, Any] = {"alarms": [], "max_db": 0, "worker": worker}
    while time.monotonic() - started < budget:
        time.sleep(0.25)
        assert worker.alive, f"worker exited {worker.returncode}:\n{worker.tail()}"
        result["max_db"] = max(result["max_db"], client.db_size())
        result["alarms"] = client.alarms()
        result["written"] = _commits(client) * COMMIT_BYTES
        if result["alarms"] or result["written"] >= until_bytes:
            break
    result["seconds"] = time.monotonic() - started
    result["revision"] = client.get(KEYS.spec)[1]
    return result


def _report(what: str, run: dict[str, Any]) -> str:
    line = (
        f"{what}: {run['written'] / MiB:.1f} MiB committed in {run['seconds']:.1f} s "
        f"(revision {run['revision']}), max db size {run['max_db'] / MiB:.1f} MiB "
        f"of a {QUOTA / MiB:.0f} MiB quota, alarms {run['alarms']}"
    )
    print(line)
    return line


def test_without_compaction_a_small_quota_fills_and_the_worker_reports_nospace_once(
    small_etcd: EmbeddedEtcd, client: Etcd, spawn: Spawner, tmp_path: Path
) -> None:
    """The control run: the same fleet as below with compaction off hits NOSPACE.

    The worker must neither exit nor crash-loop: it says NOSPACE once, clearly, and
    keeps its lease (keepalives still work) while writes are refused.
    """
    run = _run_fleet(
        spawn, small_etcd, client, tmp_path, compact_interval=0, until_bytes=8 * QUOTA, budget=45
    )
    line = _report("no compaction", run)
    assert any(a.startswith("NOSPACE") for a in run["alarms"]), line
    assert run["written"] < 2 * QUOTA, line
    worker: Proc = run["worker"]
    time.sleep(3.0)  # a few commit retries and lease keepalives into the outage
    assert worker.alive, f"worker exited {worker.returncode}:\n{worker.tail()}"
    errors = [ln for ln in worker.log().splitlines() if " ERROR " in ln and "NOSPACE alarm" in ln]
    assert len(errors) == 1, worker.tail()
    assert "etcdctl alarm disarm" in errors[0]
    assert [m["id"] for m in collect(client, KEYS)["members"]] == ["w0"]


def test_leader_compaction_keeps_a_small_quota_from_filling(
    small_etcd: EmbeddedEtcd, client: Etcd, spawn: Spawner, tmp_path: Path
) -> None:
    """Regression test for issue 7 item 11: a fleet with a tiny quota runs without NOSPACE."""
    run = _run_fleet(
        spawn, small_etcd, client, tmp_path, compact_interval=0.5, until_bytes=3 * QUOTA, budget=55
    )
    line = _report("leader compacts (interval 0.5 s, window 1 s)", run)
    assert not run["alarms"], line
    assert run["written"] >= 3 * QUOTA, line
    assert run["max_db"] < QUOTA, line
    assert "compacted etcd history to revision" in run["worker"].log()
    assert "NOSPACE" not in run["worker"].log()


def test_nospace_is_a_named_retryable_error_and_fleet_status_warns(
    tmp_path: Path, spawn: Spawner, caplog: pytest.LogCaptureFixture
) -> None:
    server = _small_etcd(tmp_path, "tiny-etcd", quota=4 * MiB)
    etcd = Etcd([server.endpoint], timeout=3.0)
    try:
        assert collect(etcd, KEYS)["warnings"] == []
        lease, _ = etcd.grant(10)
        value = b"x" * (64 * 1024)
        caplog.set_level(logging.INFO, logger="fleet.coord.etcd")
        with pytest.raises(EtcdNoSpace) as raised:
            for i in range(1000):  # 64 MiB: far past the quota
                etcd.txn([Compare("/t/owner", "create", 0)], [Put(f"/t/{i % 8}", value)])
        err = raised.value
        assert isinstance(err, EtcdUnavailable)  # every retry path waits on it
        for part in (server.endpoint, "NOSPACE", "compact", "defrag", "etcdctl alarm disarm"):
            assert part in str(err)
        for _ in range(3):
            with pytest.raises(EtcdNoSpace):
                etcd.put("/t/more", value)
        nospace_logs = [r for r in caplog.records if "NOSPACE" in r.getMessage()]
        assert len(nospace_logs) == 1 and nospace_logs[0].levelno == logging.ERROR
        assert etcd.keepalive(lease) > 0  # members keep their leases meanwhile
        assert etcd.get("/t/0")[0] is not None  # and reads work

        status = collect(etcd, KEYS)
        assert len(status["warnings"]) == 1, status["warnings"]
        assert status["warnings"][0].startswith("etcd alarm NOSPACE (member ")
        assert "warning: etcd alarm NOSPACE" in render(status)
        cli = spawn(["status", "--json", "--etcd", server.endpoint], env=CLEAN_ENV, name="status")
        assert cli.wait(30) == 0, cli.tail()
        assert "etcdctl alarm disarm" in " ".join(json.loads(cli.log())["warnings"])

        # The remedy the message names, done the way an operator would: writes resume.
        etcd.compact(etcd.get("/t/0")[1], physical=True)
        etcd.defragment()
        etcd.disarm_nospace()
        etcd.put("/t/after", b"ok")
        assert collect(etcd, KEYS)["warnings"] == []
        assert any("accepts writes again" in r.getMessage() for r in caplog.records)
    finally:
        etcd.close()
        server.kill()


def test_embedded_etcd_compacts_itself_and_has_a_quota(tmp_path: Path) -> None:
    cmd = EmbeddedEtcd(tmp_path / "etcd", binary="/bin/true").command()
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert flags["--auto-compaction-mode"] == "periodic"
    assert flags["--auto-compaction-retention"] == "10m"
    assert flags["--quota-backend-bytes"] == str(QUOTA_BACKEND_BYTES) == str(4 * 1024**3)
    # extra_args come last, so a caller (or a test) can override them.
    extra = ["--auto-compaction-retention", "0"]
    cmd = EmbeddedEtcd(tmp_path / "etcd", binary="/bin/true", extra_args=extra).command()
    assert cmd[-2:] == extra
    assert cmd.index("--auto-compaction-retention") < len(cmd) - 2


def test_embedded_etcd_starts_with_the_history_limits(etcd_server: EmbeddedEtcd) -> None:
    """etcd accepts the flags (an unknown or malformed flag would stop it starting)."""
    assert "--auto-compaction-mode" in etcd_server.command()
    assert etcd_server.healthy()


# -- the compactor's window, with an injected clock ---------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _revisions(etcd: Etcd, n: int) -> list[int]:
    return [etcd.put(f"/c/{i % 4}", str(i).encode()) for i in range(n)]


def _compacted_at_least(etcd: Etcd, revision: int) -> bool:
    """Whether history before `revision` is gone: a watch from revision - 1 is refused
    (etcd answers either at once or with the first response)."""
    answers: queue.SimpleQueue[object] = queue.SimpleQueue()
    try:
        watch_id = etcd.add_watch("/c/", revision - 1, answers.put)
    except EtcdCompacted:
        return True
    try:
        first = answers.get(timeout=10)
    finally:
        etcd.cancel_watch(watch_id)
    if isinstance(first, BaseException):
        assert is_compacted(first), first
        return True
    return False


@pytest.fixture
def etcd(etcd_server: EmbeddedEtcd) -> Iterator[Etcd]:
    client = Etcd([etcd_server.endpoint], timeout=3.0)
    try:
        yield client
    finally:
        client.close()


def test_compactor_picks_the_newest_revision_at_least_window_old(etcd: Etcd) -> None:
    clock = FakeClock()
    c = Compactor(etcd, interval=5, window=60, clock=clock)
    revs = _revisions(etcd, 5)
    for i, rev in enumerate(revs):  # one observation every 10 s, at t = 0, 10, ..., 40
        clock.now = 1000.0 + 10 * i
        c.observe(rev)
    clock.now = 1059.0
    assert c.target() is None  # nothing is 60 s old yet
    clock.now = 1060.0
    assert c.target() == revs[0]
    clock.now = 1085.0
    assert c.target() == revs[2]  # observed at t = 20, 65 s ago; t = 30 is only 55 s ago
    clock.now = 1200.0
    assert c.target() == revs[4]
    c.observe(revs[4])  # no newer revision: not a new sample
    assert c.target() == revs[4]


def test_compactor_compacts_once_per_interval_and_never_past_the_window(etcd: Etcd) -> None:
    clock = FakeClock()
    c = Compactor(etcd, interval=30, window=60, clock=clock)
    first = _revisions(etcd, 3)
    c.observe(first[-1])
    clock.now += 30
    second = _revisions(etcd, 3)
    c.observe(second[-1])
    c.maybe_compact()  # nothing 60 s old
    assert c.compacted == 0 and not _compacted_at_least(etcd, first[-1])
    clock.now += 30  # first[-1] is 60 s old, second[-1] 30 s
    c.maybe_compact()
    assert c.compacted == first[-1]
    assert _compacted_at_least(etcd, first[-1]) and not _compacted_at_least(etcd, second[-1])
    clock.now += 29  # second[-1] is old enough now, but the interval has not passed
    c.maybe_compact()
    assert c.compacted == first[-1]
    clock.now += 1
    c.maybe_compact()
    assert c.compacted == second[-1] and _compacted_at_least(etcd, second[-1])


def test_compactor_tolerates_history_already_compacted_further(etcd: Etcd) -> None:
    """Another compactor (etcd's own, a second fleet) got there first: not an error."""
    clock = FakeClock()
    c = Compactor(etcd, interval=1, window=1, clock=clock)
    revs = _revisions(etcd, 4)
    c.observe(revs[0])
    assert etcd.compact(revs[-1]) is True
    clock.now += 2
    c.maybe_compact()
    assert c.compacted == revs[0]
    assert etcd.compact(revs[1]) is False


def test_compactor_never_raises_on_an_unreachable_etcd(caplog: pytest.LogCaptureFixture) -> None:
    gone = Etcd([f"http://127.0.0.1:{free_port()}"], timeout=0.5)
    try:
        clock = FakeClock()
        c = Compactor(gone, interval=300, window=1, clock=clock)
        c.observe(10)
        clock.now += 2
        started = time.monotonic()
        c.maybe_compact()  # one failed call, no exception
        assert time.monotonic() - started < 10
        assert c.compacted == 0
        c.maybe_compact()  # retried after RETRY_SECONDS, not at once: no second call now
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        gone.close()


def test_compactor_off_when_interval_is_zero(etcd: Etcd) -> None:
    clock = FakeClock()
    c = Compactor(etcd, interval=0, window=1, clock=clock)
    c.observe(_revisions(etcd, 2)[-1])
    clock.now += 100
    c.maybe_compact()
    assert c.compacted == 0 and not c.enabled


# -- the watch and compaction (fleet/coord/watch.py) ---------------------------------------


def test_watch_resumes_after_a_compaction_it_is_ahead_of(etcd: Etcd) -> None:
    """A compaction to a revision the watch already delivered costs it nothing."""
    items: queue.SimpleQueue[Changes | Resync] = queue.SimpleQueue()
    start = etcd.put("/w/a", b"1")
    watch = PrefixWatch(etcd, "/w/", start, items.put)
    watch.start()
    try:
        first = items.get(timeout=10)
        assert isinstance(first, Changes) and first.changes[0].kv.key == "/w/a"
        assert etcd.compact(etcd.put("/w/b", b"2")) is True
        watch.restart()  # as after a broken stream: resumes from the last delivered revision
        etcd.put("/w/c", b"3")
        seen = []
        while "/w/c" not in seen:
            item = items.get(timeout=10)
            assert isinstance(item, Changes), item
            seen += [c.kv.key for c in item.changes]
        assert seen == ["/w/b", "/w/c"]
    finally:
        watch.stop()


def test_watch_resyncs_when_its_history_was_compacted(etcd: Etcd) -> None:
    old = etcd.put("/w/a", b"1")
    etcd.put("/w/a", b"2")
    now = etcd.put("/w/b", b"3")
    assert etcd.compact(now) is True
    items: queue.SimpleQueue[Changes | Resync] = queue.SimpleQueue()
    watch = PrefixWatch(etcd, "/w/", old, items.put)
    watch.start()
    try:
        item = items.get(timeout=10)
        assert isinstance(item, Resync), item
        assert {kv.key: kv.value for kv in item.snapshot.kvs} == {"/w/a": b"2", "/w/b": b"3"}
        etcd.put("/w/c", b"4")
        after = items.get(timeout=10)
        assert isinstance(after, Changes) and [c.kv.key for c in after.changes] == ["/w/c"]
    finally:
        watch.stop()
