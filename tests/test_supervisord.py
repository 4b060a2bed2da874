"""Issue 8, the supervisord path: `fleet supervisord-conf` and `fleet supervisord-listener`.

The acceptance tests run the real supervisord of the `supervisor` package in the
foreground (`-n`, so the `spawn` fixture's teardown kills it and everything it started:
the workers inherit the fixture's tag) on a file rendered by `fleet supervisord-conf`,
against a real etcd on a free loopback port. The rendering tests parse the rendered file
with supervisord's own option parser, so "escaped for supervisord" means what
supervisord reads back, not what we think it reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from supervisor.options import ServerOptions

from fleet.config import ConfigError
from fleet.coord.etcd import Etcd
from fleet.coord.keys import Keys
from fleet.server.embedded import EmbeddedEtcd
from fleet.supervise import listener, supervisord
from tests.support.checker import assert_history_ok
from tests.support.fleet import CLEAN_ENV, RECORDING, owners, status, tokens, wait_converged
from tests.support.procs import Proc, Spawner, tagged_processes
from tests.support.wait import wait_until

BIN = Path(sys.executable).parent
SUPERVISORD = str(BIN / "supervisord")
SUPERVISORCTL = str(BIN / "supervisorctl")
HOST = "h"
SEGMENTS = 12


# -- rendering ------------------------------------------------------------------------------


def _render(cwd: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`fleet supervisord-conf ARGS` in a child (its working directory matters)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    full.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "fleet", "supervisord-conf", *args],
        cwd=cwd, env=full, capture_output=True, text=True, timeout=60,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _parsed(conf: Path) -> ServerOptions:
    """The file as supervisord itself reads it."""
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    return options


def _programs(options: ServerOptions) -> dict[str, Any]:
    return {p.name: p for g in options.process_group_configs for p in g.process_configs}


def test_rendered_file_reads_back_exactly_in_supervisord(tmp_path: Path) -> None:
    """'%' doubled (quadrupled where supervisord expands twice), absolute paths from a
    relative --run-dir, the worker by absolute path without a shell, one program per slot
    with a stable member id, and every option of the issue."""
    cwd = tmp_path / "odd%dir"
    cwd.mkdir()
    (cwd / "fleet.toml").write_text('handler = "tests.support.recording:handle"\n')
    code, out, err = _render(
        cwd, "--workers", "3", "--etcd", "127.0.0.1:2379", "--host-id", HOST,
        "--run-dir", "sv%d", "--prefix", "/f%(x)s", "--graceful-timeout", "7", "-o", "s.conf",
    )
    assert code == 0, err
    assert out == ""
    conf = cwd / "s.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    assert (cwd / "sv%d").stat().st_mode & 0o777 == 0o700
    text = conf.read_text()
    assert "%%" in text
    options = _parsed(conf)
    run_dir = cwd / "sv%d"
    assert options.server_configs[0]["file"] == str(run_dir / "supervisor.sock")
    assert options.server_configs[0]["chmod"] == 0o700
    assert options.serverurl == f"unix://{run_dir / 'supervisor.sock'}"
    assert options.logfile == str(run_dir / "supervisord.log")
    assert options.pidfile == str(run_dir / "supervisord.pid")
    programs = _programs(options)
    assert sorted(programs) == ["fleet-monitor", "fleet-worker-0", "fleet-worker-1",
                                "fleet-worker-2"]
    for slot in range(3):
        p = programs[f"fleet-worker-{slot}"]
        argv = shlex.split(p.command)
        assert argv == [
            os.path.abspath(sys.executable), "-m", "fleet", "worker",
            "--config", str(cwd / "fleet.toml"), "--etcd", "http://127.0.0.1:2379",
            "--prefix", "/f%(x)s", "--graceful-timeout", "7", "--id", f"{HOST}-{slot}",
        ]
        assert p.directory == str(cwd)
        assert p.environment == {
            "PYTHONUNBUFFERED": "1",
            "FLEET_WORKER_INDEX": str(slot),
            "FLEET_EXPECTED_WORKERS": "3",  # the cold start waits for this host's 3
        }
        assert p.autorestart is not True and p.autorestart is not False  # "unexpected"
        assert p.exitcodes == [2]
        assert p.startsecs >= 5 and 1 <= p.startretries <= 5
        assert p.stopsignal == 15 and p.stopwaitsecs > 7
        assert p.stopasgroup and p.killasgroup and p.redirect_stderr
        assert p.stdout_logfile == str(run_dir / f"fleet-worker-{slot}.log")
        assert p.stdout_logfile_maxbytes > 0 and p.stdout_logfile_backups > 0
    monitor = programs["fleet-monitor"]
    assert shlex.split(monitor.command) == [
        os.path.abspath(sys.executable), "-m", "fleet", "supervisord-listener",
        "--config", str(cwd / "fleet.toml"), "--etcd", "http://127.0.0.1:2379",
        "--prefix", "/f%(x)s", "--host-id", HOST,
    ]
    assert monitor.stderr_logfile == str(run_dir / "fleet-monitor.log")
    group = next(g for g in options.process_group_configs if g.name == "fleet-monitor")
    assert {e.__name__ for e in group.pool_events} == {
        "ProcessStateExitedEvent", "ProcessStateStoppedEvent", "ProcessStateBackoffEvent",
        "ProcessStateFatalEvent", "ProcessStateStartingEvent", "ProcessStateRunningEvent",
    }


def test_rendered_file_holds_no_secret(tmp_path: Path) -> None:
    """Credentials stay in the --config file: neither the file's password nor one from
    the environment reaches the rendered file; the file is named instead."""
    cfg = tmp_path / "secret.toml"
    cfg.write_text('[etcd]\nuser = "fleet"\npassword = "s3cr3t-Pa55"\n')
    code, out, err = _render(
        tmp_path, "--config", "secret.toml", "--etcd", "127.0.0.1:2379", "--run-dir", "sv",
        env={"FLEET_ETCD_PASSWORD": "env-Pa55w0rd"},
    )
    assert code == 0, err
    assert "s3cr3t" not in out and "env-Pa55w0rd" not in out and "Pa55" not in err
    assert f"--config {cfg}" in out


def test_user_is_set_on_every_program(tmp_path: Path) -> None:
    code, out, err = _render(tmp_path, "--etcd", "127.0.0.1:2379", "--run-dir", "sv",
                             "--workers", "2", "--user", "root", "-o", "s.conf")
    assert code == 0, err
    programs = _programs(_parsed(tmp_path / "s.conf"))
    assert {name: p.uid for name, p in programs.items()} == {
        "fleet-monitor": 0, "fleet-worker-0": 0, "fleet-worker-1": 0}
    code, out, err = _render(tmp_path, "--etcd", "127.0.0.1:2379", "--run-dir", "sv")
    assert code == 0, err
    assert not any(line.startswith("user") for line in out.splitlines())


def test_a_secret_that_would_land_in_the_file_is_refused() -> None:
    plan = supervisord.Plan(
        workers=1, host_id="h", python=sys.executable, run_dir=Path("/tmp/x"),
        directory=Path("/tmp"), worker_flags=("--name", "hunter2"), listener_flags=(),
        graceful_timeout=30, etcd_timeout=3,
    )
    template = supervisord.default_template().read_text()
    assert "hunter2" in supervisord.render(plan, template)
    with pytest.raises(ConfigError, match="secret"):
        supervisord.render(plan, template, secrets=["hunter2"])


@pytest.mark.parametrize(
    ("run_dir", "message"),
    [
        ("a\nb", "control characters"),
        ("a ;b", "start a comment"),
        ("a #b", "start a comment"),
        ("x" * 200, "longer than the 107 bytes"),
    ],
)
def test_values_supervisord_cannot_read_back_are_refused(
    tmp_path: Path, run_dir: str, message: str
) -> None:
    code, out, err = _render(tmp_path, "--etcd", "127.0.0.1:2379", "--run-dir", run_dir)
    assert code == 2, (out, err)
    assert out == ""
    assert err.startswith("fleet: ") and message in err and len(err.splitlines()) == 1


def test_render_needs_an_etcd_endpoint(tmp_path: Path) -> None:
    code, out, err = _render(tmp_path, "--workers", "2")
    assert code == 2 and out == "" and "no etcd endpoint" in err


def test_etcd_from_the_environment_is_written_into_the_file(tmp_path: Path) -> None:
    """supervisord does not run in this shell: endpoints known only from FLEET_ETCD are
    written as --etcd, or the workers would not find etcd."""
    code, out, err = _render(tmp_path, "--run-dir", "sv", env={"FLEET_ETCD": "10.0.0.1:2379"})
    assert code == 0, err
    assert "--etcd http://10.0.0.1:2379" in out


def test_host_id_config_key(tmp_path: Path) -> None:
    from fleet import config

    assert config.load({}, {}).host_id == socket.gethostname()
    assert config.load({}, {"FLEET_HOST_ID": "rack1.a"}).host_id == "rack1.a"
    assert config.load({"host_id": "b"}, {"FLEET_HOST_ID": "a"}).host_id == "b"
    with pytest.raises(ConfigError, match=r"host_id = 'a b' \(from --host-id\)"):
        config.load({"host_id": "a b"}, {})


# -- the listener's decisions -----------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_decide_never_revokes_a_newer_incarnation() -> None:
    host = socket.gethostname()
    dead = _dead_pid()

    def alive(pid: int) -> bool:
        return pid != dead

    def job(pid: int | None) -> listener.Job:
        return listener.Job("h-0", pid, "PROCESS_STATE_EXITED", 0.0)

    assert listener.decide({"host": host, "pid": dead}, job(dead), host, alive) == "revoke"
    assert listener.decide({"host": host, "pid": dead}, job(None), host, alive) == "revoke"
    # The slot was restarted and the new incarnation registered before we read the record.
    assert "newer incarnation" in listener.decide(
        {"host": host, "pid": os.getpid()}, job(dead), host, alive
    )
    assert "running" in listener.decide({"host": host, "pid": os.getpid()}, job(None), host,
                                        alive)
    assert "running" in listener.decide({"host": host, "pid": dead}, job(dead), host,
                                        lambda pid: True)  # pid reused: skip
    assert "host" in listener.decide({"host": "other", "pid": dead}, job(dead), host, alive)
    assert "no pid" in listener.decide({"host": host}, job(None), host, alive)


def test_slot_of_only_names_fleet_worker_programs() -> None:
    assert listener.slot_of({"processname": "fleet-worker-3", "groupname": "fleet-worker-3"}) == 3
    assert listener.slot_of({"processname": "fleet-worker-3", "groupname": "g"}) is None
    assert listener.slot_of({"processname": "fleet-monitor", "groupname": "fleet-monitor"}) is None
    assert listener.slot_of({"processname": "nginx", "groupname": "nginx"}) is None


def _member(etcd: Etcd, keys: Keys, member_id: str, pid: int) -> int:
    lease, _ = etcd.grant(30)
    record = {"id": member_id, "host": socket.gethostname(), "pid": pid, "lease": lease}
    etcd.put(keys.member(member_id), json.dumps(record).encode(), lease)
    return lease


def _event(name: str, processname: str, **fields: object) -> str:
    body = " ".join(
        [f"processname:{processname}", f"groupname:{processname}", "from_state:RUNNING"]
        + [f"{k}:{v}" for k, v in fields.items()]
    )
    header = (
        f"ver:3.0 server:supervisor serial:1 pool:fleet-monitor poolserial:1 "
        f"eventname:{name} len:{len(body)}\n"
    )
    return header + body


def test_listener_answers_while_etcd_is_down_and_revokes_once_it_is_back(
    etcd_server: EmbeddedEtcd,
) -> None:
    """Every event is answered at once with etcd stopped; the revoke is retried and lands
    when etcd is back; a record of a live pid (a newer incarnation) is left alone."""
    keys = Keys("/fleet", "default")
    etcd = Etcd([etcd_server.endpoint])
    dead = _dead_pid()
    try:
        gone_lease = _member(etcd, keys, "h-0", dead)
        kept_lease = _member(etcd, keys, "h-1", os.getpid())
        etcd_server.stop()
        revocations = listener.Revocations(
            lambda: Etcd([etcd_server.endpoint], timeout=0.5), keys
        )
        events = (
            _event("PROCESS_STATE_EXITED", "fleet-worker-0", expected=0, pid=dead)
            + _event("PROCESS_STATE_EXITED", "fleet-worker-1", expected=0, pid=dead)
            + _event("PROCESS_STATE_RUNNING", "fleet-worker-2", pid=os.getpid())
        )
        stdout = io.StringIO()
        started = time.monotonic()
        code = listener.serve(HOST, revocations, io.StringIO(events), stdout)
        assert code == 0  # our stdin ended: supervisord is gone
        assert time.monotonic() - started < 5.0  # answered without waiting for etcd
        assert stdout.getvalue() == "READY\nRESULT 2\nOK" * 3 + "READY\n"
        assert revocations.pending() == 2
        time.sleep(1.0)  # a few failed rounds
        assert revocations.pending() == 2
        etcd_server.restart()
        wait_until(lambda: revocations.pending() == 0, timeout=30, message="revokes done")
        revocations.close()
        assert etcd.lease_ttl(gone_lease) == -1
        assert etcd.get(keys.member("h-0"))[0] is None
        assert etcd.lease_ttl(kept_lease) > 0
        assert etcd.get(keys.member("h-1"))[0] is not None
    finally:
        etcd.close()


def test_exit_watch_sees_an_exit_at_once() -> None:
    """The pidfd watch reports a worker's exit itself, without supervisord's event."""
    seen: list[tuple[int, int, float]] = []
    watch = listener.ExitWatch(lambda slot, pid: seen.append((slot, pid, time.monotonic())))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch.track(4, child.pid)
        time.sleep(0.2)
        assert seen == []
        killed = time.monotonic()
        child.kill()  # not reaped yet: a zombie counts as exited
        wait_until(lambda: seen, timeout=10, interval=0.005, message="exit seen")
        assert seen[0][:2] == (4, child.pid)
        print(f"exit seen {1000 * (seen[0][2] - killed):.1f} ms after the kill")
    finally:
        child.kill()
        child.wait()
    watch.track(5, child.pid)  # already gone: reported at once
    assert seen[-1][:2] == (5, child.pid)


def _orphaned_group() -> tuple[int, subprocess.Popen[bytes]]:
    """A process group whose leader has exited (and been reaped) while a member runs:
    what a worker killed with -9 leaves behind when its handler started a child."""
    leader = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess; p = subprocess.Popen(['sleep', '60'], "
         "stdout=subprocess.DEVNULL); print(p.pid)"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    out, _ = leader.communicate(timeout=30)
    member = psutil.Process(int(out))
    assert os.getpgid(member.pid) == leader.pid
    return leader.pid, member  # type: ignore[return-value]


@pytest.mark.parametrize("known", [True, False])
def test_the_group_is_killed_only_on_supervisords_word(
    etcd_server: EmbeddedEtcd, known: bool
) -> None:
    """BACKOFF/FATAL carry no pid, so the lease is found through the record; the dead
    worker's group is killed only if supervisord reported that pid for the slot (a
    record is etcd data and may name any group on this host). The lease is revoked
    either way: its owner is dead."""
    keys = Keys("/fleet", "default")
    etcd = Etcd([etcd_server.endpoint])
    leader, member = _orphaned_group()
    try:
        lease = _member(etcd, keys, "h-0", leader)
        revocations = listener.Revocations(lambda: Etcd([etcd_server.endpoint]), keys)
        pids = frozenset({leader}) if known else frozenset()
        listener.ended(0, None, "PROCESS_STATE_BACKOFF", HOST, revocations, pids)
        wait_until(lambda: revocations.pending() == 0, timeout=30, message="job done")
        revocations.close()
        assert etcd.lease_ttl(lease) == -1
        if known:
            wait_until(lambda: not listener.pid_alive(member.pid), timeout=10,
                       message="the leftover of the group was killed")
        else:
            time.sleep(0.3)
            assert listener.pid_alive(member.pid)
    finally:
        with contextlib.suppress(psutil.Error):
            member.kill()
        etcd.close()


def test_listener_stdout_is_only_the_protocol(tmp_path: Path, spawn: Spawner) -> None:
    """A print from anywhere in the listener process lands on stderr, not in the protocol."""
    script = (
        "import sys, io\n"
        "from fleet.supervise import listener\n"
        "out = listener.protocol_stdout()\n"
        "print('stray print'); sys.stdout.flush()\n"
        "import os; os.write(1, b'stray fd write\\n')\n"
        "from supervisor import childutils\n"
        "childutils.listener.ready(out)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
        env={**spawn.env()},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "READY\n"
    assert "stray print" in proc.stderr and "stray fd write" in proc.stderr


# -- acceptance: real supervisord -------------------------------------------------------------


class Supervised:
    """A rendered file and the supervisord running it, in `tmp_path`."""

    def __init__(self, tmp_path: Path, spawn: Spawner, proc: Proc, conf: Path) -> None:
        self.tmp_path, self.spawn, self.proc, self.conf = tmp_path, spawn, proc, conf

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [SUPERVISORCTL, "-c", str(self.conf), *args],
            capture_output=True, text=True, timeout=timeout,
        )
        return done.stdout + done.stderr

    def states(self) -> dict[str, tuple[str, int | None]]:
        """program -> (state, pid) from `supervisorctl status`."""
        found: dict[str, tuple[str, int | None]] = {}
        for line in self.ctl("status").splitlines():
            m = re.match(r"(\S+)\s+([A-Z]+)(?:\s+pid (\d+))?", line)
            if m:
                found[m.group(1)] = (m.group(2), int(m.group(3)) if m.group(3) else None)
        return found

    def wait_states(self, want: dict[str, str], timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.states()
            ok = all(st.get(name, ("", None))[0] == state for name, state in want.items())
            return st if ok else None

        result: dict[str, Any] = wait_until(
            check, timeout=timeout, interval=0.2, message=f"supervisorctl status never {want}"
        )
        return result


def start_supervised(
    tmp_path: Path, spawn: Spawner, endpoint: str, ledger_dir: Path | None, workers: int,
    *args: str,
) -> Supervised:
    conf = tmp_path / "supervisord.conf"
    code, _, err = _render(
        tmp_path, "--workers", str(workers), "--etcd", endpoint, "--host-id", HOST,
        "--segments", str(SEGMENTS), "--interval", "0.05", "--lease-ttl", "10",
        "--run-dir", str(tmp_path / "sv"), "-o", str(conf), *args,
    )
    assert code == 0, err
    env: dict[str, str | None] = dict(CLEAN_ENV)
    if ledger_dir is not None:
        env.update({"FLEET_TEST_LEDGER": str(ledger_dir), "FLEET_TEST_CALL_SECONDS": "0.02"})
    proc = spawn.command([SUPERVISORD, "-n", "-c", str(conf)], env=env, name="supervisord")
    return Supervised(tmp_path, spawn, proc, conf)


def _register_logs(request: pytest.FixtureRequest, tmp_path: Path, workers: int) -> None:
    from tests.conftest import register_log

    register_log(request.node, "fleet-monitor", tmp_path / "sv" / "fleet-monitor.log")
    for slot in range(workers):
        register_log(request.node, f"fleet-worker-{slot}", tmp_path / "sv" /
                     f"fleet-worker-{slot}.log")


def _members(workers: int) -> list[str]:
    return [f"{HOST}-{i}" for i in range(workers)]


def test_three_workers_under_supervisord_own_everything(
    tmp_path: Path, spawn: Spawner, etcd_server: EmbeddedEtcd, ledger_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Acceptance 1: all segments owned 3 ways; 3 RUNNING workers and the listener."""
    _register_logs(request, tmp_path, 3)
    sup = start_supervised(tmp_path, spawn, etcd_server.endpoint, ledger_dir, 3,
                           "--handler", RECORDING)
    st = wait_converged(etcd_server.endpoint, _members(3))
    assert sorted(len(m["owned"]) for m in st["members"]) == [4, 4, 4]
    assert {m["slot"] for m in st["members"]} == {0, 1, 2}
    states = sup.wait_states({"fleet-monitor": "RUNNING", **{
        f"fleet-worker-{i}": "RUNNING" for i in range(3)}})
    pids = {m["id"]: m["pid"] for m in st["members"]}
    assert pids == {f"{HOST}-{i}": states[f"fleet-worker-{i}"][1] for i in range(3)}


def test_kill_9_under_supervisord_fails_over_through_the_listener(
    tmp_path: Path, spawn: Spawner, etcd_server: EmbeddedEtcd, ledger_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Acceptance 2: kill -9 of a worker: the listener revokes its lease and the other two
    own its segments well within the 10 s TTL (under 1 s); supervisord restarts it and it
    takes its share back; no overlap in the ledger."""
    _register_logs(request, tmp_path, 3)
    sup = start_supervised(tmp_path, spawn, etcd_server.endpoint, ledger_dir, 3,
                           "--handler", RECORDING)
    before = wait_converged(etcd_server.endpoint, _members(3))
    sup.wait_states({"fleet-monitor": "RUNNING", "fleet-worker-1": "RUNNING"})
    victim = next(m for m in before["members"] if m["id"] == f"{HOST}-1")
    theirs = set(victim["owned"])
    old_tokens = tokens(before)
    others = {f"{HOST}-0", f"{HOST}-2"}

    def moved() -> bool:
        st = status(etcd_server.endpoint)
        own, tok = owners(st), tokens(st)
        return all(own[s] in others and tok[s] != old_tokens[s] for s in theirs)

    killed_at = time.monotonic()
    os.kill(victim["pid"], 9)
    wait_until(moved, timeout=30, interval=0.01, message="the others own the victim's share")
    failover = time.monotonic() - killed_at
    print(f"failover under supervisord: {failover * 1000:.0f} ms (lease TTL 10 s)")
    assert failover < 1.0, f"failover took {failover:.2f} s: the listener did not revoke"
    assert "revoked lease" in (tmp_path / "sv" / "fleet-monitor.log").read_text()

    after = wait_converged(etcd_server.endpoint, _members(3))
    back = next(m for m in after["members"] if m["id"] == f"{HOST}-1")
    assert back["pid"] != victim["pid"] and len(back["owned"]) == 4
    states = sup.wait_states({"fleet-worker-1": "RUNNING"})
    assert states["fleet-worker-1"][1] == back["pid"]
    sup.ctl("stop", "all")
    sup.wait_states({f"fleet-worker-{i}": "STOPPED" for i in range(3)})
    assert_history_ok(ledger_dir, min_calls=50)


def test_a_restarted_listener_watches_the_workers_already_running(
    tmp_path: Path, spawn: Spawner, etcd_server: EmbeddedEtcd, ledger_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A listener restarted while the workers run asks supervisord for their pids, so it
    still sees an exit itself (not only through supervisord's late event)."""
    _register_logs(request, tmp_path, 2)
    sup = start_supervised(tmp_path, spawn, etcd_server.endpoint, ledger_dir, 2,
                           "--handler", RECORDING)
    st = wait_converged(etcd_server.endpoint, _members(2))
    sup.wait_states({"fleet-monitor": "RUNNING", "fleet-worker-0": "RUNNING"})
    sup.ctl("restart", "fleet-monitor")
    sup.wait_states({"fleet-monitor": "RUNNING"})
    victim = next(m["pid"] for m in st["members"] if m["id"] == f"{HOST}-0")
    os.kill(victim, 9)
    log = tmp_path / "sv" / "fleet-monitor.log"
    wait_until(lambda: f"{HOST}-0 exit (pid {victim}): revoked lease" in log.read_text(),
               timeout=30, message="the restarted listener revoked through its pid watch")


def test_unimportable_handler_ends_fatal_after_a_few_retries(
    tmp_path: Path, spawn: Spawner, etcd_server: EmbeddedEtcd, request: pytest.FixtureRequest,
) -> None:
    """Acceptance 3: a configuration error (exit 2 at start) is not restarted forever."""
    _register_logs(request, tmp_path, 1)
    sup = start_supervised(tmp_path, spawn, etcd_server.endpoint, None, 1,
                           "--handler", "no_such_module_xyz:handle")
    sup.wait_states({"fleet-worker-0": "FATAL"}, timeout=90)
    log = (tmp_path / "sv" / "supervisord.log").read_text()
    spawns = len(re.findall(r"spawned: 'fleet-worker-0'", log))
    assert 2 <= spawns <= 1 + supervisord.START_RETRIES, log
    assert "no_such_module_xyz" in (tmp_path / "sv" / "fleet-worker-0.log").read_text()
    time.sleep(3)
    assert len(re.findall(r"spawned: 'fleet-worker-0'",
                          (tmp_path / "sv" / "supervisord.log").read_text())) == spawns
    assert sup.states()["fleet-monitor"][0] == "RUNNING"


def test_stop_all_leaves_no_key_and_shutdown_no_process(
    tmp_path: Path, spawn: Spawner, etcd_server: EmbeddedEtcd, ledger_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Acceptance 4: `supervisorctl stop all` leaves no member/owner/election key;
    `supervisorctl shutdown` leaves no process."""
    _register_logs(request, tmp_path, 3)
    sup = start_supervised(tmp_path, spawn, etcd_server.endpoint, ledger_dir, 3,
                           "--handler", RECORDING)
    wait_converged(etcd_server.endpoint, _members(3))
    sup.wait_states({"fleet-monitor": "RUNNING"})
    sup.ctl("stop", "all")
    sup.wait_states({**{f"fleet-worker-{i}": "STOPPED" for i in range(3)},
                     "fleet-monitor": "STOPPED"})
    keys = Keys("/fleet", "default")
    etcd = Etcd([etcd_server.endpoint])
    try:
        left = [kv.key for kv in etcd.get_prefix(keys.root).kvs
                if kv.key.startswith((keys.members, keys.owners, keys.election))]
    finally:
        etcd.close()
    assert left == []
    sup.ctl("shutdown")
    assert sup.proc.wait(timeout=60) == 0
    wait_until(lambda: not tagged_processes(spawn.tag), timeout=30,
               message="every process supervisord started has exited")
    assert_history_ok(ledger_dir, min_calls=10)


def test_the_template_ships_in_the_package() -> None:
    """A wheel install has no repository root: the template must be package data."""
    import fleet.supervise
    from fleet.supervise.supervisord import default_template

    path = default_template()
    assert path.is_file() and path.parent == Path(fleet.supervise.__file__).parent
