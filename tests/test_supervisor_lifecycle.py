"""Acceptance: the life of a `fleet up` supervisor, with real etcd and real processes.

Rolling restart (`fleet restart`, `--slot`, SIGHUP) keeps all but one slot READY and
every segment owned after each step; `fleet down` returns only once every process of
the fleet (embedded etcd included) has exited and leaves no member, owner or election
key behind; a `fleet up` killed with -9 takes its children (and its embedded etcd)
with it; SIGTERM stops gracefully and the output carries the summary and prefixed
child lines; bad input ends with exit 2 and one ``fleet: ...`` line.

Every scenario that runs workers uses the recording handler and ends with the ledger
check (no segment ever worked on under two tokens at once, tokens only grow).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from fleet.coord.etcd import Etcd
from fleet.coord.keys import Keys
from fleet.coord.status import collect
from fleet.server.embedded import EmbeddedEtcd
from fleet.supervise.control import RunDir, request
from tests.support.checker import assert_history_ok
from tests.support.fleet import CLEAN_ENV, RECORDING, converged, status, wait_converged
from tests.support.procs import Proc, Spawner
from tests.support.supervised import wait_alive, wait_calls
from tests.support.wait import wait_until

T = TypeVar("T")

WORKERS = 3
SEGMENTS = 12
EXIT_USAGE = 2
CONVERGE_TIMEOUT = 60.0
STEP_OWNED_TIMEOUT = 30.0  # after a slot is READY again, every segment is owned by then
ROLLING_TIMEOUT = 120.0
KEYS = Keys("/fleet", "default")
NOT_READY = ("STARTING", "STOPPING", "STOPPED", "BACKOFF", "FATAL")
SUMMARY = re.compile(
    rf"^fleet \| {WORKERS}/{WORKERS} workers ready, {SEGMENTS}/{SEGMENTS} segments owned, "
    r"leader \S+",
    re.MULTILINE,
)


# -- helpers ------------------------------------------------------------------------------


def fleet_env(ledger_dir: Path) -> dict[str, str | None]:
    return {
        **CLEAN_ENV,
        "FLEET_TEST_LEDGER": str(ledger_dir),
        "FLEET_TEST_CALL_SECONDS": "0.05",
        "FLEET_EMBEDDED_PORT": "0",  # never 2379: any free port
    }


def start_up(
    spawn: Spawner,
    ledger_dir: Path,
    *,
    etcd: str | None = None,
    workers: int = WORKERS,
    extra: Sequence[str] = (),
    name: str = "up",
) -> Proc:
    """`fleet up` in tmp_path with the recording handler (embedded etcd unless `etcd`)."""
    args = [
        "up", "--workers", str(workers), "--segments", str(SEGMENTS),
        "--handler", RECORDING, "--interval", "0.05",
    ]  # fmt: skip
    if etcd is not None:
        args += ["--etcd", etcd]
    return spawn([*args, *extra], env=fleet_env(ledger_dir), name=name)


def run_dir(tmp_path: Path) -> RunDir:
    return RunDir(tmp_path / ".fleet")


def ps(tmp_path: Path) -> list[dict[str, Any]]:
    """`fleet ps --json`, over the control socket."""
    rows: list[dict[str, Any]] = request(run_dir(tmp_path), {"cmd": "ps"})["slots"]
    return rows


def wait_ready(
    up: Proc, tmp_path: Path, workers: int = WORKERS
) -> tuple[str, list[dict[str, Any]]]:
    """(etcd endpoint, ps rows) once every slot is READY and etcd shows the fleet converged."""

    def info() -> dict[str, Any] | None:
        data = run_dir(tmp_path).read_info()
        return data if data and data.get("etcd") else None

    found = wait_alive(up, info, ".fleet/fleet.json", timeout=CONVERGE_TIMEOUT)
    assert found is not None  # wait_until only returns a truthy value
    endpoint = str(found["etcd"][0])

    def all_ready() -> list[dict[str, Any]] | None:
        rows = ps(tmp_path)
        ok = len(rows) == workers and all(r["state"] == "READY" for r in rows)
        return rows if ok else None

    wait_alive(up, all_ready, f"{workers} READY slots", timeout=CONVERGE_TIMEOUT)
    members = [r["member"] for r in ps(tmp_path)]
    wait_converged(endpoint, members, timeout=CONVERGE_TIMEOUT)
    rows = wait_alive(up, all_ready, f"{workers} READY slots", timeout=CONVERGE_TIMEOUT)
    assert rows is not None
    return endpoint, rows


def gone(proc: psutil.Process) -> bool:
    """Exited (or a zombie): `is_running` also guards against a reused pid."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def describe(procs: Sequence[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]} ({p.status()})")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return out


def fleet_keys(endpoint: str) -> list[str]:
    etcd = Etcd([endpoint], timeout=3.0)
    try:
        return [kv.key for kv in etcd.get_prefix(KEYS.root).kvs]
    finally:
        etcd.close()


def live_keys(keys: Sequence[str]) -> list[str]:
    """Keys that only a live member may hold."""
    return [k for k in keys if k.startswith((KEYS.members, KEYS.owners, KEYS.election))]


def assert_one_line_error(proc: Proc, *names: str, timeout: float = 30) -> str:
    """`proc` exits 2 having written one ``fleet: ...`` line naming `names`."""
    rc = proc.wait(timeout=timeout)
    out = proc.log()
    assert "Traceback" not in out, f"{proc.name} printed a traceback:\n{out}"
    assert rc == EXIT_USAGE, f"{proc.name} exited {rc}, expected {EXIT_USAGE}:\n{out}"
    lines = out.splitlines()
    assert len(lines) == 1, f"{proc.name} wrote {len(lines)} lines, expected one:\n{out}"
    line = lines[0]
    assert line.startswith("fleet: "), f"{proc.name}: does not start with 'fleet: ': {line}"
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


class StatusPoller:
    """Samples `fleet status` in a thread: (monotonic time, converged?, member -> pid)."""

    def __init__(self, endpoint: str, members: Sequence[str], interval: float = 0.005) -> None:
        self.endpoint = endpoint
        self.members = list(members)
        self.interval = interval
        self.samples: list[tuple[float, bool, dict[str, int | None]]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-poller", daemon=True)

    def __enter__(self) -> StatusPoller:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        etcd = Etcd([self.endpoint], timeout=2.0)
        try:
            while not self._stop.is_set():
                try:
                    st = collect(etcd, KEYS)
                except Exception:  # a slow read is not what this records
                    self.errors += 1
                else:
                    pids = {m["id"]: m["pid"] for m in st["members"]}
                    self.samples.append((time.monotonic(), converged(st, self.members), pids))
                self._stop.wait(self.interval)
        finally:
            etcd.close()

    def converged_after(self, since: float, member: str, pid: int) -> float | None:
        """The first sample time at or after `since` at which the fleet was converged
        (every segment owned by its assigned member, balanced) with `member` run by `pid`."""
        for t, ok, pids in list(self.samples):
            if t >= since and ok and pids.get(member) == pid:
                return t
        return None


def watch_restart(
    up: Proc,
    tmp_path: Path,
    endpoint: str,
    before: dict[int, dict[str, Any]],
    restarted: set[int],
) -> dict[int, dict[str, Any]]:
    """Sample ps every ~20 ms until each slot of `restarted` is READY with a new pid.

    At every sample at most one slot is not READY (missing counts as not READY) and no
    slot outside `restarted` changed; after each step (a slot READY again with its new
    pid) the fleet is converged again within STEP_OWNED_TIMEOUT: every segment owned by
    its assigned member, balanced, the new pid among the members. Returns the last rows
    by slot.
    """
    stepped: dict[int, float] = {}  # slot -> when first seen READY with its new pid
    went_down: list[int] = []  # slots in the order they left READY
    samples = 0
    deadline = time.monotonic() + ROLLING_TIMEOUT
    members = [before[i]["member"] for i in sorted(before)]
    with StatusPoller(endpoint, members) as poller:
        while True:
            assert up.alive, f"fleet up exited {up.returncode}:\n{up.tail()}"
            rows = {r["slot"]: r for r in ps(tmp_path)}
            now = time.monotonic()
            samples += 1
            not_ready = [i for i in before if i not in rows or rows[i]["state"] != "READY"]
            assert len(not_ready) <= 1, f"slots {not_ready} not READY at once: {rows}"
            for i in before:
                row = rows.get(i)
                if row is None:
                    continue
                if row["state"] in NOT_READY:
                    assert row["state"] not in ("BACKOFF", "FATAL"), f"slot {i}: {row}"
                    if i not in went_down:
                        went_down.append(i)
                if i not in restarted:
                    assert row["pid"] == before[i]["pid"], f"slot {i} was restarted: {row}"
                    assert row["restarts"] == before[i]["restarts"], row
                    continue
                assert row["restarts"] <= before[i]["restarts"] + 1, f"slot {i}: {row}"
                new = row["pid"] is not None and row["pid"] != before[i]["pid"]
                if new and row["state"] == "READY" and i not in stepped:
                    stepped[i] = now
            done = all(
                i in stepped
                and rows[i]["state"] == "READY"
                and rows[i]["restarts"] == before[i]["restarts"] + 1
                for i in restarted
            )
            if done:
                break
            assert now < deadline, (
                f"rolling restart of {sorted(restarted)} not done after {ROLLING_TIMEOUT}s "
                f"(stepped {stepped}): {rows}\n{up.tail()}"
            )
            time.sleep(0.02)
        for i, since in sorted(stepped.items(), key=lambda item: item[1]):

            def converged_again(since: float = since, i: int = i) -> float | None:
                return poller.converged_after(since, rows[i]["member"], rows[i]["pid"])

            owned_at = wait_until(
                converged_again,
                timeout=max(0.5, since + STEP_OWNED_TIMEOUT - time.monotonic()),
                interval=0.05,
                message=f"every segment owned again (converged) after slot {i} was READY",
            )
            assert owned_at is not None and owned_at - since <= STEP_OWNED_TIMEOUT
            print(f"slot {i} READY again; converged {owned_at - since:.3f} s later")
    assert sorted(went_down) == sorted(restarted), (went_down, restarted)
    print(f"restart order {went_down}, {samples} ps samples, {len(poller.samples)} status samples")
    for i in restarted:
        assert rows[i]["last_exit"] == "exit 0", f"slot {i} did not stop gracefully: {rows[i]}"
    return rows


# -- 6: rolling restart -------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["command", "sighup"])
def test_rolling_restart_keeps_all_but_one_ready(
    etcd_server: EmbeddedEtcd,
    spawn: Spawner,
    ledger_dir: Path,
    tmp_path: Path,
    trigger: str,
) -> None:
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint)
    ep, rows = wait_ready(up, tmp_path)
    before = {r["slot"]: r for r in rows}
    assert all(r["restarts"] == 0 for r in rows), rows

    if trigger == "command":
        cmd = spawn(["restart", "--no-wait"], env=CLEAN_ENV, name="restart")
        assert cmd.wait(timeout=30) == 0, cmd.log()
    else:
        up.signal(signal.SIGHUP)

    after = watch_restart(up, tmp_path, ep, before, restarted=set(before))
    new_pids = {r["pid"] for r in after.values()}
    assert not new_pids & {r["pid"] for r in before.values()}, (before, after)
    members = [r["member"] for r in after.values()]
    st = wait_converged(ep, members, timeout=CONVERGE_TIMEOUT)
    assert {m["pid"] for m in st["members"]} == new_pids, (st["members"], after)
    assert up.alive, up.tail()

    time.sleep(0.3)
    assert_history_ok(ledger_dir, min_calls=20)


def test_restart_one_slot_restarts_only_that_slot(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint)
    ep, rows = wait_ready(up, tmp_path)
    before = {r["slot"]: r for r in rows}

    cmd = spawn(["restart", "--slot", "1", "--no-wait"], env=CLEAN_ENV, name="restart")
    assert cmd.wait(timeout=30) == 0, cmd.log()
    after = watch_restart(up, tmp_path, ep, before, restarted={1})
    assert after[1]["restarts"] == 1 and after[1]["pid"] != before[1]["pid"], after

    wait_converged(ep, [r["member"] for r in after.values()], timeout=CONVERGE_TIMEOUT)
    time.sleep(1.0)  # nothing else is queued behind slot 1
    final = {r["slot"]: r for r in ps(tmp_path)}
    assert [final[i]["restarts"] for i in range(WORKERS)] == [0, 1, 0], final
    assert [final[i]["pid"] for i in range(WORKERS)] == [
        before[0]["pid"],
        after[1]["pid"],
        before[2]["pid"],
    ], final
    assert all(r["state"] == "READY" for r in final.values()), final

    assert_history_ok(ledger_dir, min_calls=20)


# -- 7: fleet down ------------------------------------------------------------------------


def test_down_returns_after_every_process_exited_embedded_etcd(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir)  # no --etcd: fleet up starts its own
    ep, _rows = wait_ready(up, tmp_path)
    wait_calls(up, ledger_dir)
    info = json.loads((tmp_path / ".fleet" / "fleet.json").read_text())
    assert info["etcd"] == [ep] and info["pid"] == up.pid, info

    root = psutil.Process(up.pid)
    tree = [root, *root.children(recursive=True)]
    names = describe(tree)
    etcds = [p for p in tree[1:] if "etcd" in p.name()]
    assert len(etcds) == 1, f"no embedded etcd among fleet up's children: {names}"
    assert len(tree) == 1 + WORKERS + 1, names

    down = spawn(["down"], env=CLEAN_ENV, name="down")
    rc = down.wait(timeout=90)
    alive = [p for p in tree if not gone(p)]  # immediately after `fleet down` returned
    assert rc == 0, f"fleet down exited {rc}:\n{down.log()}"
    assert not alive, f"still running after fleet down returned: {describe(alive)}"
    assert "Traceback" not in down.log(), down.log()
    assert up.wait(timeout=10) == 0, up.tail()
    for leftover in ("fleet.pid", "fleet.sock"):
        assert not (tmp_path / ".fleet" / leftover).exists(), leftover

    assert_history_ok(ledger_dir, min_calls=20)


def test_down_leaves_only_checkpoints_in_etcd(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint)
    ep, _rows = wait_ready(up, tmp_path)
    wait_calls(up, ledger_dir)
    keys = fleet_keys(ep)
    assert len([k for k in keys if k.startswith(KEYS.owners)]) == SEGMENTS, keys
    assert any(k.startswith(KEYS.election) for k in keys), keys

    down = spawn(["down"], env=CLEAN_ENV, name="down")
    rc = down.wait(timeout=90)
    keys = fleet_keys(ep)  # immediately after `fleet down` returned
    assert rc == 0, f"fleet down exited {rc}:\n{down.log()}"
    assert not live_keys(keys), f"keys left behind by fleet down: {live_keys(keys)}"
    checkpoints = [k for k in keys if k.startswith(KEYS.checkpoints)]
    assert len(checkpoints) == SEGMENTS, keys
    assert up.wait(timeout=10) == 0, up.tail()
    for leftover in ("fleet.pid", "fleet.sock"):
        assert not (tmp_path / ".fleet" / leftover).exists(), leftover

    assert_history_ok(ledger_dir, min_calls=20)


# -- 8: kill -9 of fleet up ---------------------------------------------------------------


def kill_up_and_wait_children(up: Proc, tmp_path: Path) -> dict[psutil.Process, str]:
    """kill -9 the pid of .fleet/fleet.pid; its children (taken before) exit within 10 s.

    Returns the children with their process names (as read before the kill).
    """
    pid = int((tmp_path / ".fleet" / "fleet.pid").read_text().strip())
    assert pid == up.pid
    children = {c: c.name() for c in psutil.Process(pid).children(recursive=True)}
    assert children, "fleet up has no children"
    up.signal(signal.SIGKILL)
    assert up.wait(timeout=10) == -signal.SIGKILL
    killed = time.monotonic()
    try:
        wait_until(lambda: all(gone(c) for c in children), timeout=10, interval=0.05)
    except AssertionError:
        alive = [c for c in children if not gone(c)]
        pytest.fail(f"children still running 10 s after kill -9 of fleet up: {describe(alive)}")
    print(f"children of fleet up exited {time.monotonic() - killed:.2f} s after its kill -9")
    return children


def test_kill_9_of_fleet_up_children_exit_and_release(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    ttl = 3
    ep = etcd_server.endpoint
    up = start_up(spawn, ledger_dir, etcd=ep, extra=["--lease-ttl", str(ttl)])
    wait_ready(up, tmp_path)
    wait_calls(up, ledger_dir)

    children = kill_up_and_wait_children(up, tmp_path)
    names = sorted(children.values())
    assert len(names) == WORKERS and not any("etcd" in n for n in names), names
    exited = time.monotonic()

    # The children stop gracefully (releasing, revoking); whatever lingers goes with its TTL.
    wait_until(
        lambda: not live_keys(fleet_keys(ep)),
        timeout=ttl + 10,
        message="member/owner/election keys gone after the children exited",
    )
    print(f"live keys gone {time.monotonic() - exited:.2f} s after the children exited")
    st = status(ep)
    assert st["unowned"] == list(range(SEGMENTS)) and not st["members"], st
    assert len([k for k in fleet_keys(ep) if k.startswith(KEYS.checkpoints)]) == SEGMENTS

    # The stale pidfile does not fool the other commands.
    ps_cmd = spawn(["ps"], env=CLEAN_ENV, name="ps")
    assert_one_line_error(ps_cmd, "no fleet is running")

    assert_history_ok(ledger_dir, min_calls=20)


def test_kill_9_of_fleet_up_takes_embedded_etcd_along(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    # A short TTL: a worker whose etcd vanished at the same moment as its supervisor
    # retries its in-flight commits until its lease deadline before it exits.
    up = start_up(spawn, ledger_dir, extra=["--lease-ttl", "3"])
    wait_ready(up, tmp_path)
    wait_calls(up, ledger_dir)
    children = kill_up_and_wait_children(up, tmp_path)
    names = sorted(children.values())
    assert len([n for n in names if "etcd" in n]) == 1, f"no embedded etcd among {names}"
    assert len(names) == WORKERS + 1, names

    assert_history_ok(ledger_dir, min_calls=20)


# -- 9: bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        pytest.param(["up", "--workers", "0"], ["workers", "'0'"], id="up-workers-0"),
        pytest.param(["up", "--workers", "many"], ["workers", "'many'"], id="up-workers-many"),
        pytest.param(["scale", "3"], ["no fleet is running"], id="scale-no-fleet"),
        pytest.param(["ps"], ["no fleet is running"], id="ps-no-fleet"),
        pytest.param(["ps", "--json"], ["no fleet is running"], id="ps-json-no-fleet"),
        pytest.param(["restart"], ["no fleet is running"], id="restart-no-fleet"),
    ],
)
def test_bad_input_without_a_fleet_exits_2(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path, args: list[str], names: list[str]
) -> None:
    proc = spawn(args, env=fleet_env(ledger_dir), name="fleet")
    line = assert_one_line_error(proc, *names)
    if "no fleet is running" in names:
        assert str(tmp_path) in line, line  # names the directory it looked in
    assert not (tmp_path / ".fleet" / "fleet.pid").exists()


def test_bad_input_while_a_fleet_runs_exits_2(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    ep = etcd_server.endpoint
    up = start_up(spawn, ledger_dir, etcd=ep, workers=1)
    _ep, rows = wait_ready(up, tmp_path, workers=1)

    second = start_up(spawn, ledger_dir, etcd=ep, workers=1, name="up-second")
    assert_one_line_error(second, "already running", str(up.pid))

    # Every refusal is checked before the failures are reported, so one wrong message
    # does not hide the others (nor the checks of the running fleet below).
    failures: list[str] = []
    for args, names in (
        (["scale", "zero"], ["'zero'"]),
        (["scale", "0"], ["'0'"]),
        (["restart", "--slot", "x"], ["'x'"]),
        (["restart", "--slot", "7"], ["7"]),
    ):
        proc = spawn(args, env=CLEAN_ENV, name="fleet")
        try:
            assert_one_line_error(proc, *names)
        except AssertionError as exc:
            failures.append(f"fleet {' '.join(args)}: {exc}")

    # The refused commands changed nothing: same pidfile, same socket, same child.
    assert (tmp_path / ".fleet" / "fleet.pid").read_text().strip() == str(up.pid)
    now = [(r["pid"], r["state"], r["restarts"]) for r in ps(tmp_path)]
    assert now == [(rows[0]["pid"], "READY", 0)], now

    up.signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0, up.tail()
    assert_history_ok(ledger_dir, min_calls=10)
    assert not failures, "\n".join(failures)


# -- SIGTERM ------------------------------------------------------------------------------


def test_sigterm_stops_gracefully_and_output_has_summary_and_prefixed_lines(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    ep = etcd_server.endpoint
    up = start_up(spawn, ledger_dir, etcd=ep)
    wait_ready(up, tmp_path)
    wait_calls(up, ledger_dir)
    wait_alive(up, lambda: SUMMARY.search(up.log()), "the summary line", timeout=30)
    root = psutil.Process(up.pid)
    tree = [root, *root.children(recursive=True)]
    assert len(tree) == 1 + WORKERS, describe(tree)

    up.signal(signal.SIGTERM)
    rc = up.wait(timeout=60)
    out = up.log()
    assert rc == 0, f"fleet up exited {rc} on SIGTERM:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    alive = [p for p in tree if not gone(p)]
    assert not alive, f"still running after fleet up exited: {describe(alive)}"
    for i in range(WORKERS):
        assert re.search(rf"^w{i} \| ", out, re.MULTILINE), f"no 'w{i} | ' line:\n{out[-4000:]}"
    assert SUMMARY.search(out), out[-4000:]
    assert not live_keys(fleet_keys(ep)), fleet_keys(ep)
    for leftover in ("fleet.pid", "fleet.sock"):
        assert not (tmp_path / ".fleet" / leftover).exists(), leftover

    assert_history_ok(ledger_dir, min_calls=20)


def test_every_worker_refusing_its_config_ends_fleet_up_with_exit_2(
    etcd_server: EmbeddedEtcd, spawn: Spawner
) -> None:
    """A handler whose module imports but lacks the attribute fails in the workers (exit 2,
    FATAL at once); with every slot FATAL for that reason fleet up gives up with exit 2
    instead of retrying forever."""
    up = spawn(
        ["up", "--workers", "2", "--etcd", etcd_server.endpoint, "--handler", "json:nosuch"],
        name="up",
    )
    assert up.wait(timeout=60) == 2
    log = up.log()
    assert "FATAL: configuration error" in log
    assert "giving up" in log
    assert "Traceback" not in log


def test_rolling_restart_with_a_fatal_slot_restarts_the_others(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """Regression (found by the chaos suite): a FATAL slot never becomes READY, and the
    rolling restart used to wait for it forever (its cool-down is 5 minutes)."""
    env = {**fleet_env(ledger_dir), "FLEET_TEST_EXIT_ON_CALL": "1", "FLEET_TEST_EXIT_SLOT": "2"}
    args = [
        "up", "--workers", str(WORKERS), "--segments", str(SEGMENTS), "--handler", RECORDING,
        "--interval", "0.05", "--etcd", etcd_server.endpoint,
    ]  # fmt: skip
    up = spawn(args, env=env, name="up")
    def slot_2_fatal() -> list[dict[str, Any]] | None:
        now = ps(tmp_path)
        return now if now[2]["state"] == "FATAL" else None

    rows = wait_alive(up, slot_2_fatal, timeout=90, message="slot 2 FATAL")
    members = [r["member"] for r in rows if r["slot"] != 2]
    wait_converged(etcd_server.endpoint, members, timeout=CONVERGE_TIMEOUT)
    before = {r["slot"]: r["pid"] for r in rows}

    cmd = spawn(["restart", "--no-wait"], env=CLEAN_ENV, name="restart")
    assert cmd.wait(timeout=30) == 0, cmd.log()

    def restarted() -> list[dict[str, Any]] | None:
        now = ps(tmp_path)
        done = all(
            r["state"] == "READY" and r["pid"] != before[r["slot"]]
            for r in now
            if r["slot"] != 2
        )
        return now if done else None

    after = wait_alive(up, restarted, timeout=60, message="slots 0, 1 restarted")
    assert after[2]["state"] == "FATAL"
    wait_converged(etcd_server.endpoint, members, timeout=CONVERGE_TIMEOUT)
    assert_history_ok(ledger_dir, min_calls=20)


def test_ttin_adds_a_worker_and_ttou_removes_the_highest_slot(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint)
    ep, rows = wait_ready(up, tmp_path)
    up.signal(signal.SIGTTIN)
    _, rows = wait_ready(up, tmp_path, workers=WORKERS + 1)
    assert sorted(r["slot"] for r in rows) == list(range(WORKERS + 1))
    # One at a time: two identical signals sent back to back may be delivered as one.
    up.signal(signal.SIGTTOU)
    wait_ready(up, tmp_path, workers=WORKERS)
    up.signal(signal.SIGTTOU)
    _, rows = wait_ready(up, tmp_path, workers=WORKERS - 1)
    assert sorted(r["slot"] for r in rows) == list(range(WORKERS - 1))
    wait_converged(ep, [r["member"] for r in rows], timeout=CONVERGE_TIMEOUT)
    assert_history_ok(ledger_dir, min_calls=20)
