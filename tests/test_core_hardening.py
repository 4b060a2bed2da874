"""Regression tests for issue 7 (core hardening), one per finding, named after what it
guards. Each walks the path with real etcd and real worker processes, and each failed on
the code before its fix (see the issue note for what each saw then).

Items 3 and 14 (process group, embedded etcd supervision) are in
tests/test_supervisor_hardening.py, item 8 (checkpoint rollback) in tests/test_election.py,
item 11 (compaction, NOSPACE) in tests/test_compaction.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from fleet import clock
from fleet.config import load
from fleet.coord.etcd import Delete, Etcd, Put
from fleet.coord.keys import Keys
from fleet.coord.session import Session
from fleet.handler import Handler as LoadedHandler
from fleet.server.embedded import EmbeddedEtcd
from fleet.work.worker import Worker
from tests.chaos.proxy import TcpProxy
from tests.support import hooks
from tests.support.checker import load_calls
from tests.support.fleet import CLEAN_ENV, start_worker, status, wait_converged
from tests.support.procs import Proc, Spawner
from tests.support.wait import wait_until

KEYS = Keys("/fleet", "default")
HOOKS = "tests.support.hooks:Handler"


def _hooks_worker(
    spawn: Spawner,
    endpoint: str,
    member: str,
    tmp_path: Path,
    *,
    segments: int = 4,
    lease_ttl: int = 10,
    env: dict[str, str | None] | None = None,
    args: tuple[str, ...] = (),
) -> Proc:
    log_dir = tmp_path / "hooks"
    log_dir.mkdir(exist_ok=True)
    ledger = tmp_path / "ledger"
    ledger.mkdir(exist_ok=True)
    return start_worker(
        spawn,
        endpoint,
        member,
        ledger,
        segments=segments,
        lease_ttl=lease_ttl,
        handler=HOOKS,
        args=args,
        env={**CLEAN_ENV, "FLEET_TEST_HOOK_LOG": str(log_dir), **(env or {})},
    )


def _events(tmp_path: Path) -> list[dict[str, Any]]:
    return hooks.read(tmp_path / "hooks")


def _member(endpoint: str, member: str) -> dict[str, Any] | None:
    return next((m for m in status(endpoint)["members"] if m["id"] == member), None)


def _wait_owning(endpoint: str, member: str, count: int, timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        m = _member(endpoint, member)
        return m if m is not None and len(m["owned"]) == count else None

    found: dict[str, Any] = wait_until(
        check, timeout=timeout, message=f"{member} owns {count} segments"
    )
    return found


def _wait_started(log_dir: Path, event: str) -> None:
    wait_until(
        lambda: any(e["ev"] == event for e in hooks.read(log_dir)),
        timeout=30,
        message=f"{event} started",
    )


def _exit_code_with_etcd_frozen(etcd: EmbeddedEtcd, wait: Callable[..., int]) -> int:
    """Freeze etcd (the worker's lease deadline passes) until the process exits."""
    etcd.pause()
    try:
        return wait(timeout=30)
    finally:
        etcd.resume()


def _wait_stopped(pid: int, stopped: bool) -> None:
    wait_until(
        lambda: (psutil.Process(pid).status() == psutil.STATUS_STOPPED) == stopped,
        timeout=5,
        interval=0.005,
        message=f"pid {pid} stopped={stopped}",
    )


# -- 1. hooks inside the fence ----------------------------------------------------------


def test_on_release_is_not_called_once_the_lease_is_gone(
    etcd_server: EmbeddedEtcd, spawn: Spawner, tmp_path: Path
) -> None:
    """Frozen past its lease, a worker must not run on_release for the ownerships it lost
    (before: on_release ran after the deadline, as if the segment were still owned)."""
    endpoint = etcd_server.endpoint
    worker = _hooks_worker(spawn, endpoint, "w1", tmp_path, segments=2, lease_ttl=2)
    before = _wait_owning(endpoint, "w1", 2)
    worker.signal(signal.SIGSTOP)
    _wait_stopped(worker.pid, True)
    try:
        wait_until(lambda: _member(endpoint, "w1") is None, timeout=20, message="lease expired")
    finally:
        worker.signal(signal.SIGCONT)
    after = _wait_owning(endpoint, "w1", 2)
    assert after["lease"] != before["lease"]
    old_tokens = {e["token"] for e in _events(tmp_path) if e["ev"] == "on_acquire"} - {
        s["token"] for s in status(endpoint)["segment_owners"]
    }
    assert old_tokens, "the old ownerships are in the log"
    late = [e for e in _events(tmp_path) if e["ev"] == "on_release" and e["token"] in old_tokens]
    assert not late, f"on_release ran for ownerships already lost: {late}"
    assert "on_release not called" in worker.log()


def test_a_hung_on_acquire_is_covered_by_the_watchdog(
    etcd_server: EmbeddedEtcd, spawn: Spawner, tmp_path: Path
) -> None:
    """on_acquire still running past the lease deadline kills the worker (before: hooks
    were invisible to the watchdog and ran on without ownership)."""
    endpoint = etcd_server.endpoint
    worker = _hooks_worker(
        spawn,
        endpoint,
        "w1",
        tmp_path,
        segments=1,
        lease_ttl=2,
        env={"FLEET_TEST_SLEEP_ON_ACQUIRE": "120"},
    )
    _wait_started(tmp_path / "hooks", "on_acquire")
    code = _exit_code_with_etcd_frozen(etcd_server, worker.wait)
    assert code == 4, worker.tail()  # lease lost with a call running: not a crash
    assert "on_acquire still running" in worker.log()


# -- 2. a deleted key of our lease stops every runner before the restart -----------------


@pytest.mark.parametrize("which", ["election", "member"])
def test_deleting_a_key_of_our_lease_stops_every_runner_then_rejoins(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, which: str
) -> None:
    endpoint = etcd_server.endpoint
    start_worker(spawn, endpoint, "w1", ledger_dir, segments=4, env=CLEAN_ENV)
    st = wait_converged(endpoint, ["w1"])
    old_lease = st["members"][0]["lease"]
    old_tokens = {s["token"] for s in st["segment_owners"]}
    key = KEYS.candidate(old_lease) if which == "election" else KEYS.member("w1")
    etcd = Etcd([endpoint])
    try:
        etcd.txn([], [Delete(key)])
        deleted_at = time.monotonic()
    finally:
        etcd.close()

    def rejoined() -> bool:
        st = status(endpoint)
        return (
            [m["id"] for m in st["members"]] == ["w1"]
            and st["members"][0]["lease"] != old_lease
            and not st["moving"]
            and not st["unowned"]
        )

    wait_until(rejoined, timeout=40, message="w1 rejoined under a new lease")
    late = [
        c for c in load_calls(ledger_dir) if c.token in old_tokens and c.start > deleted_at + 1.0
    ]
    assert not late, f"calls under the old lease started after its key was deleted: {late[:3]}"


# -- 4. the watchdog's exit never blocks -------------------------------------------------


def test_watchdog_exits_even_when_stderr_is_a_full_pipe(
    etcd_server: EmbeddedEtcd, spawner_env: dict[str, str], tmp_path: Path
) -> None:
    """A call blocked writing to a stderr nobody reads, past the deadline: the watchdog's
    last words must not block too (before: log.critical hung on the same stream)."""
    log_dir = tmp_path / "hooks"
    log_dir.mkdir()
    env = {
        **spawner_env,
        "FLEET_TEST_HOOK_LOG": str(log_dir),
        "FLEET_TEST_STDERR_FLOOD": str(4 * 1024 * 1024),
    }
    argv = [
        sys.executable,
        "-m",
        "fleet",
        "worker",
        "--etcd",
        etcd_server.endpoint,
        "--id",
        "w1",
        "--segments",
        "1",
        "--lease-ttl",
        "2",
        "--handler",
        HOOKS,
    ]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_started(log_dir, "on_acquire")  # and then blocked on stderr
        assert _exit_code_with_etcd_frozen(etcd_server, proc.wait) == 4  # lease lost
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def spawner_env(spawn: Spawner) -> dict[str, str]:
    """The environment the spawn fixture gives its children (tag, PYTHONPATH)."""
    return {k: v for k, v in spawn.env(CLEAN_ENV).items()}


# -- 5. an exception escaping the worker loop still leaves through os._exit --------------


def test_an_exception_escaping_the_worker_loop_exits_at_once(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    """With a handler call hung and an interpreter teardown that would hang, the worker
    still exits 1 with one log line (before: a raw traceback, then a teardown hung
    forever while the handler thread ran on unwatched)."""
    worker = start_worker(
        spawn,
        etcd_server.endpoint,
        "w1",
        ledger_dir,
        segments=1,
        handler="tests.support.escape:handle",
        env=CLEAN_ENV,
    )
    assert worker.wait(timeout=40) == 1, worker.tail()
    log = worker.log()
    assert "worker failed" in log and "an unexpected failure" in log
    assert "\nTraceback" not in log, "a raw traceback instead of one log line"


# -- 6. the watchdog's list of abandoned runners is never lost ---------------------------


def test_abandoned_runners_stay_watched_under_concurrent_reads() -> None:
    """The watchdog thread prunes the zombie list while the main thread extends it: every
    abandoned runner whose thread lives must stay watched (before: no lock, and an
    extend racing the prune's reassignment was lost)."""
    cfg = load({}, {}, None, default_path="/nonexistent")
    worker = Worker(cfg, LoadedHandler("x:y", lambda ctx: None), "w", segments_explicit=False)
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            worker.watched()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        total = 0
        for batch in range(300):
            for seg in range(10):
                worker.adopt_runner(seg, SimpleNamespace(active=True, n=(batch, seg)))  # type: ignore[arg-type]
            total += worker.abandon_runners()
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(old)
    assert total == 3000
    assert len(worker.watched()) == 3000


# -- 7. the session deadline runs on a clock that counts a suspend ------------------------


def test_session_deadline_passes_across_a_host_suspend(etcd_server: EmbeddedEtcd) -> None:
    """A suspend (a jump of the injected clock) past the deadline ends the session at
    once, and a keepalive acknowledged afterwards does not revive it."""
    assert clock.NAME == "CLOCK_BOOTTIME", "Linux has CLOCK_BOOTTIME"
    etcd = Etcd([etcd_server.endpoint])
    offset = [0.0]
    events: list[str] = []
    session = Session(etcd, 3, events.append, now=lambda: clock.now() + offset[0])
    try:
        session.start(until=clock.now() + 10)
        assert session.alive()
        offset[0] += 60.0  # the host slept for a minute; etcd's timers did not
        assert not session.alive()
        assert session.lost
        time.sleep(session.ttl / 3 + 1.5)  # the keepalive thread's next round
        assert not session.alive() and "lost" in events
    finally:
        session.close(revoke=True)
        etcd.close()


# -- 9. a failed release is retried by the reconcile -------------------------------------


def test_a_release_that_failed_is_retried_so_the_new_owner_gets_the_segment(
    etcd_server: EmbeddedEtcd, spawn: Spawner, tmp_path: Path
) -> None:
    """A's release fails (etcd unreachable for longer than the runner waits, shorter than
    the lease): A must give the segment back once etcd is back (before: the owner key
    stayed under A's live lease and B waited forever)."""
    with TcpProxy(("127.0.0.1", etcd_server.client_port)) as proxy:
        _hooks_worker(
            spawn,
            proxy.endpoint,
            "a",
            tmp_path,
            lease_ttl=20,
            env={"FLEET_TEST_SLEEP_ON_RELEASE": "1.5"},
        )
        _wait_owning(etcd_server.endpoint, "a", 4)
        _hooks_worker(spawn, etcd_server.endpoint, "b", tmp_path)

        def releasing() -> bool:
            return any(e["ev"] == "on_release" and e["member"] == "a" for e in _events(tmp_path))

        wait_until(releasing, timeout=30, interval=0.01, message="a is in on_release")
        proxy.cut("refuse")
        time.sleep(4.5)
        proxy.heal()
        st = wait_converged(etcd_server.endpoint, ["a", "b"], timeout=40)
    assert "release failed" in (tmp_path / "a.log").read_text()
    assert sorted(len(m["owned"]) for m in st["members"]) == [2, 2]


# -- 10. a handler's BaseException is a failure, and the runner always reports -----------


@pytest.mark.parametrize("exc", ["SystemExit", "KeyboardInterrupt"])
def test_a_handler_raising_base_exception_is_retried_not_left_idle(
    etcd_server: EmbeddedEtcd, spawn: Spawner, tmp_path: Path, exc: str
) -> None:
    _hooks_worker(
        spawn,
        etcd_server.endpoint,
        "w1",
        tmp_path,
        segments=2,
        env={"FLEET_TEST_RAISE_HANDLE": f"{exc}:1"},
    )

    def recovered() -> bool:
        events = _events(tmp_path)
        raised = {e["segment"]: e["t"] for e in events if e["phase"] == "raise"}
        done = {
            e["segment"]
            for e in events
            if e["ev"] == "handle"
            and e["phase"] == "end"
            and e["t"] > raised.get(e["segment"], 1e18)
        }
        return len(raised) == 2 and done == {0, 1}

    wait_until(recovered, timeout=30, message=f"both segments work again after {exc}")


# -- 12. errors of a later incarnation are transient -------------------------------------


def test_a_duplicate_member_on_rejoin_is_waited_out_not_fatal(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    """Our member key taken by another lease while we restart: keep trying (before: the
    later incarnation exited 2, a configuration error, FATAL at once under fleet up)."""
    endpoint = etcd_server.endpoint
    worker = start_worker(spawn, endpoint, "w1", ledger_dir, segments=2, lease_ttl=3, env=CLEAN_ENV)
    st = wait_converged(endpoint, ["w1"])
    lease = st["members"][0]["lease"]
    etcd = Etcd([endpoint])
    try:
        squatter, _ = etcd.grant(60)
        etcd.txn(
            [],
            [
                Delete(KEYS.candidate(lease)),
                Put(KEYS.member("w1"), json.dumps({"id": "w1"}).encode(), squatter),
            ],
        )
        time.sleep(3 + 2 + 4)  # longer than register's wait (TTL + 2 s)
        assert worker.alive, f"the worker gave up:\n{worker.tail()}"
        etcd.revoke(squatter)
    finally:
        etcd.close()
    wait_converged(endpoint, ["w1"], timeout=40)
    assert worker.alive


# -- 13. handler_timeout ------------------------------------------------------------------


def test_a_call_past_handler_timeout_dumps_stacks_and_exits(
    etcd_server: EmbeddedEtcd, spawn: Spawner, tmp_path: Path
) -> None:
    worker = _hooks_worker(
        spawn,
        etcd_server.endpoint,
        "w1",
        tmp_path,
        segments=1,
        env={"FLEET_TEST_SLEEP_HANDLE": "600"},
        args=("--handler-timeout", "2"),
    )
    assert worker.wait(timeout=60) == 1, worker.tail()
    log = worker.log()
    assert "handler_timeout 2s" in log
    assert "tests/support/hooks.py" in log, "the stack of the hung call is shown"


def test_sigusr1_dumps_every_stack_and_the_worker_goes_on(
    etcd_server: EmbeddedEtcd, spawn: Spawner, tmp_path: Path
) -> None:
    worker = _hooks_worker(spawn, etcd_server.endpoint, "w1", tmp_path, segments=1)
    _wait_owning(etcd_server.endpoint, "w1", 1)
    worker.signal(signal.SIGUSR1)
    wait_until(
        lambda: "fleet-watchdog" in worker.log() or "Thread 0x" in worker.log(),
        timeout=10,
        message="stacks dumped",
    )
    time.sleep(1)
    assert worker.alive


# -- issue 12 item 3 (worker side): heartbeats while outlasting an etcd outage -----------


def test_a_worker_outlasting_an_etcd_outage_keeps_heartbeating(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    """etcd frozen for longer than the heartbeat timeout: the worker, rejoining, keeps
    telling `fleet up` it is alive and is not killed (before: heartbeats came only from
    the incarnation loop, so the supervisor killed every rejoining worker)."""
    from tests.test_supervisor import member, start_up

    endpoint = etcd_server.endpoint
    up = start_up(
        spawn,
        endpoint,
        ledger_dir,
        workers=1,
        segments=2,
        args=["--lease-ttl", "3", "--heartbeat-timeout", "8"],
        env=CLEAN_ENV,
    )
    st = wait_converged(endpoint, [member(0)])
    pid = st["members"][0]["pid"]
    etcd_server.pause()
    try:
        time.sleep(20)
    finally:
        etcd_server.resume()
    st = wait_converged(endpoint, [member(0)], timeout=60)
    assert st["members"][0]["pid"] == pid, f"the worker was replaced:\n{up.tail()}"
    assert "killing it" not in up.log()


# -- issue 10 items 1 and 8: a handler's LostOwnership backs off; on_acquire gates handle --


def test_a_handler_raising_lost_ownership_backs_off_instead_of_spinning(
    etcd_server: EmbeddedEtcd, spawn: Spawner, tmp_path: Path
) -> None:
    """The handler's own store says it is fenced out while etcd still lists us: that is
    a failing call, backed off (before: drop and re-acquire every ~5 ms, 10k log lines)."""
    worker = _hooks_worker(
        spawn,
        etcd_server.endpoint,
        "w1",
        tmp_path,
        segments=1,
        env={"FLEET_TEST_RAISE_HANDLE": "LostOwnership:1000000"},
    )
    wait_until(lambda: any(e["phase"] == "raise" for e in _events(tmp_path)), timeout=30)
    time.sleep(6)
    raised = [e for e in _events(tmp_path) if e["phase"] == "raise"]
    assert len(raised) <= 6, f"{len(raised)} calls in ~6 s: no backoff"
    log = worker.log()
    assert log.count("raised LostOwnership while etcd still lists") == 1
    assert "dropped" not in log
    assert _member(etcd_server.endpoint, "w1")["owned"] == [0]  # type: ignore[index]


def test_on_acquire_failing_is_retried_before_any_handle(
    etcd_server: EmbeddedEtcd, spawn: Spawner, tmp_path: Path
) -> None:
    _hooks_worker(
        spawn,
        etcd_server.endpoint,
        "w1",
        tmp_path,
        segments=1,
        env={"FLEET_TEST_RAISE_ON_ACQUIRE": "ValueError:2"},
    )

    def handled() -> list[dict[str, Any]] | None:
        events = _events(tmp_path)
        return events if any(e["ev"] == "handle" for e in events) else None

    events = wait_until(handled, timeout=30, message="handle runs once on_acquire succeeds")
    first_handle = next(i for i, e in enumerate(events) if e["ev"] == "handle")
    before = events[:first_handle]
    assert [e["phase"] for e in before if e["ev"] == "on_acquire"].count("raise") == 2
    assert before[-1]["ev"] == "on_acquire" and before[-1]["phase"] == "end"


# -- issue 12 item 7: a hung or failing handler shows in fleet ps -------------------------


def _wait_ps_row(
    spawn: Spawner, accept: Callable[[dict[str, Any]], bool], message: str
) -> dict[str, Any]:
    """Slot 0's row of `fleet ps --json` (the command a user runs), once `accept` holds."""

    def row() -> dict[str, Any] | None:
        out = spawn(["ps", "--json"], env=CLEAN_ENV, name="ps")
        if out.wait(timeout=30) != 0:
            return None
        rows = json.loads(out.log())
        return rows[0] if rows and accept(rows[0]) else None

    found: dict[str, Any] = wait_until(row, timeout=60, message=message)
    return found


def test_fleet_ps_shows_failing_segments_and_the_oldest_running_call(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """A worker whose every call fails, and one whose call hangs with a healthy lease,
    were both just READY in `fleet ps` (before: no failing count, no call age)."""
    from tests.test_supervisor import start_up

    log_dir = tmp_path / "hooks"
    log_dir.mkdir()
    start_up(
        spawn, etcd_server.endpoint, ledger_dir, workers=1, segments=2,
        args=["--handler", HOOKS],
        env={
            **CLEAN_ENV,
            "FLEET_TEST_HOOK_LOG": str(log_dir),
            "FLEET_TEST_RAISE_HANDLE": "ValueError:1000000",
        },
    )

    found = _wait_ps_row(
        spawn, lambda r: (r.get("failing") or 0) == 2, "fleet ps shows 2 failing segments"
    )
    assert found["owned"] == 2


def test_fleet_ps_shows_how_long_a_hung_call_has_run(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    from tests.test_supervisor import start_up

    log_dir = tmp_path / "hooks"
    log_dir.mkdir()
    start_up(
        spawn, etcd_server.endpoint, ledger_dir, workers=1, segments=1,
        args=["--handler", HOOKS],
        env={**CLEAN_ENV, "FLEET_TEST_HOOK_LOG": str(log_dir), "FLEET_TEST_SLEEP_HANDLE": "600"},
    )

    _wait_ps_row(
        spawn, lambda r: (r.get("oldest_call") or 0) >= 3, "fleet ps shows the hung call's age"
    )
    text = spawn(["ps"], env=CLEAN_ENV, name="ps-text")
    assert text.wait(timeout=30) == 0
    assert "OLDEST" in text.log()
