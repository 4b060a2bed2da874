"""Supervisor hardening (issue 12 items 2, 4, 5, 6, 9, 10): the control socket, the child
pipes, the run directory and the respawn policy, with real `fleet up` processes.

- A slow control client (one byte at a time) does not freeze the arbiter: `ps` from
  another client is answered and a killed worker is reaped and respawned meanwhile.
- A child that closes its output does not make the supervisor spin; a child writing
  without newlines is passed on in bounded pieces.
- Two `fleet up` started at once in one directory: exactly one runs, the other exits 2
  with one line and leaves the winner's files alone.
- RSS recycling of a fresh worker backs off; a rolling restart onto a bad deploy with
  one worker does not end `fleet up`; the run directory is private and not a symlink.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fleet.server.embedded import EmbeddedEtcd
from fleet.supervise.control import request
from tests.support.fleet import CLEAN_ENV
from tests.support.procs import Spawner
from tests.support.supervised import (
    cpu_seconds,
    ps,
    run_dir,
    sleep_alive,
    start_up,
    wait_alive,
    wait_ready,
)
from tests.support.wait import wait_until

MAX_LINE = 64 * 1024  # fleet.supervise.plumbing.MAX_LINE

# -- issue 12 item 2: a slow client ------------------------------------------------------


def test_slow_control_client_does_not_freeze_the_arbiter(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint, workers=2, segments=4)
    _ep, rows = wait_ready(up, tmp_path, workers=2)
    stop = threading.Event()
    dribbled: list[bytes] = []

    def dribble() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(run_dir(tmp_path).sock))
            for byte in b'{"cmd": "ps"' + b" " * 1000:
                if stop.is_set():
                    break
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break  # the server gave up on us: fine
                time.sleep(0.3)
            sock.settimeout(1.0)
            try:
                dribbled.append(sock.recv(4096))
            except OSError:
                dribbled.append(b"")

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # the dribbler is connected and mid-request
        for _ in range(5):
            rows_now = request(run_dir(tmp_path), {"cmd": "ps"}, timeout=3.0)["slots"]
            assert len(rows_now) == 2
        os.kill(rows[0]["pid"], signal.SIGKILL)

        def respawned() -> bool:
            row = request(run_dir(tmp_path), {"cmd": "ps"}, timeout=3.0)["slots"][0]
            return row["state"] == "READY" and row["pid"] != rows[0]["pid"]

        wait_alive(up, respawned, "slot 0 respawned while a client dribbles", timeout=30)
        assert thread.is_alive() or dribbled, "the dribbler was served before the test ended"
    finally:
        stop.set()
        thread.join(timeout=30)


def test_a_crowd_of_idle_control_clients_does_not_lock_out_fleet_ps(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """More idle connections than the server holds: a new client evicts the oldest
    (found by the chaos suite's hostile_control fault: `ps` was refused while a crowd
    sat on every slot)."""
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint, workers=1, segments=2)
    wait_ready(up, tmp_path, workers=1)
    crowd = []
    try:
        for _ in range(48):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(run_dir(tmp_path).sock))
            crowd.append(sock)
        time.sleep(0.5)  # every one accepted (or evicted) by now
        for _ in range(5):
            assert len(request(run_dir(tmp_path), {"cmd": "ps"}, timeout=3.0)["slots"]) == 1
    finally:
        for sock in crowd:
            sock.close()


# -- issue 12 items 5 and 6: child output ------------------------------------------------


def test_child_closing_its_output_does_not_spin_the_supervisor(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(
        spawn, ledger_dir, etcd=etcd_server.endpoint, workers=1, segments=2,
        handler="tests.support.hostile:closing",
    )  # fmt: skip
    wait_ready(up, tmp_path, workers=1)
    wait_alive(up, lambda: "closing my output now" in up.log(), "the handler closing its output")
    sleep_alive(up, 1.0)
    before = cpu_seconds(up.pid)
    sleep_alive(up, 4.0)
    used = cpu_seconds(up.pid) - before
    print(f"fleet up CPU over 4 s after the child closed its output: {used:.2f} s")
    assert used < 1.0, f"fleet up used {used:.2f} s of CPU in 4 s after the child closed its output"
    rows = ps(tmp_path)
    assert rows[0]["state"] == "READY" and rows[0]["restarts"] == 0, rows


def test_output_without_newlines_is_passed_on_in_bounded_pieces(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(
        spawn, ledger_dir, etcd=etcd_server.endpoint, workers=1, segments=1,
        handler="tests.support.hostile:long_line", env={"FLEET_TEST_LONG_BYTES": "200000"},
    )  # fmt: skip
    wait_ready(up, tmp_path, workers=1)
    piece = "w0 | " + "x" * MAX_LINE

    def pieces() -> int:
        return sum(line == piece for line in up.log().splitlines())

    wait_alive(up, lambda: pieces() >= 3, "three full 64 KiB pieces of the long line", timeout=30)
    cmd = spawn(["down"], env=CLEAN_ENV, name="down")
    assert cmd.wait(timeout=60) == 0, cmd.log()
    assert up.wait(timeout=60) == 0, up.tail()
    text = up.log()
    total = sum(
        line.removeprefix("w0 | ").count("x")
        for line in text.splitlines()
        if line.startswith("w0 | ")
    )
    assert total == 200_000, total
    assert "progress 100%" in text, text[-500:]


def test_line_buffer_splits_only_new_data_and_bounds_lines() -> None:
    from fleet.supervise import plumbing
    from fleet.supervise.plumbing import LineBuffer

    assert plumbing.MAX_LINE == MAX_LINE
    buf = LineBuffer()
    assert buf.feed(b"abc") == []
    assert buf.feed(b"def\nghi\n") == [b"abcdef", b"ghi"]
    assert buf.feed(b"x" * (MAX_LINE - 1)) == []
    assert buf.feed(b"yy") == [b"x" * (MAX_LINE - 1) + b"y"]
    assert buf.flush() == [b"y"]
    assert buf.flush() == []
    big = buf.feed(b"z" * (3 * MAX_LINE + 5) + b"\n")
    assert big == [b"z" * MAX_LINE] * 3 + [b"zzzzz"]
    assert len(buf) == 0
    # Many small reads of one long line: each read only scans its own bytes.
    for _ in range(1000):
        buf.feed(b"q" * 10)
    assert len(buf) == 10_000


# -- issue 12 item 4: two fleet up in one directory --------------------------------------


def test_two_fleet_up_in_one_directory_exactly_one_runs(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    a = start_up(spawn, ledger_dir, workers=1, segments=2, name="up-a")
    b = start_up(spawn, ledger_dir, workers=1, segments=2, name="up-b")

    def one_exited() -> bool:
        return not a.alive or not b.alive

    wait_until(one_exited, timeout=60, message="one of the two fleet up exits")
    loser, winner = (a, b) if not a.alive else (b, a)
    assert loser.wait(timeout=10) == 2, loser.log()
    lines = [line for line in loser.log().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fleet: "), lines
    assert "already running" in lines[0], lines
    time.sleep(1.0)
    assert winner.alive, winner.tail()
    wait_ready(winner, tmp_path, workers=1)
    rd = run_dir(tmp_path)
    assert rd.pidfile.read_text().strip() == str(winner.pid)
    assert rd.sock.exists() and rd.info_file.exists()
    assert request(rd, {"cmd": "ps"})["pid"] == winner.pid


# -- issue 12 item 9: policy --------------------------------------------------------------


def test_rss_recycling_of_a_fresh_worker_backs_off(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(
        spawn, ledger_dir, etcd=etcd_server.endpoint, workers=1, segments=1,
        extra=["--max-rss-mb", "1"],
    )  # fmt: skip

    def backing_off() -> bool:
        row = ps(tmp_path)[0]
        return row["state"] == "BACKOFF" and "rss" in (row["last_exit"] or "")

    wait_alive(up, backing_off, "slot 0 in BACKOFF after an RSS recycle", timeout=60, interval=0.02)


def test_rolling_restart_onto_a_bad_deploy_keeps_a_one_worker_fleet_up(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    module = tmp_path / "deployed.py"
    module.write_text("from tests.support.recording import handle  # noqa: F401\n")
    up = start_up(
        spawn, ledger_dir, etcd=etcd_server.endpoint, workers=1, segments=1,
        handler="deployed:handle",
    )  # fmt: skip
    wait_ready(up, tmp_path, workers=1)
    module.write_text("raise ImportError('the new release is broken')\n")
    for cache in tmp_path.glob("__pycache__/deployed*"):
        cache.unlink()
    cmd = spawn(["restart"], env=CLEAN_ENV, name="restart")
    # `fleet restart` waits, and says the restart cannot finish: the new worker is FATAL.
    assert cmd.wait(timeout=60) == 1, cmd.log()
    assert "FATAL" in cmd.log(), cmd.log()
    wait_alive(up, lambda: ps(tmp_path)[0]["state"] == "FATAL", "slot 0 FATAL on the bad deploy")
    sleep_alive(up, 2.0)
    assert up.alive


# -- issue 12 item 10: the run directory --------------------------------------------------


def test_run_directory_is_private(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint, workers=1, segments=1)
    wait_ready(up, tmp_path, workers=1)
    mode = (tmp_path / ".fleet").stat().st_mode & 0o777
    assert mode == 0o700, oct(mode)
    for name in ("fleet.pid", "fleet.json"):
        assert (tmp_path / ".fleet" / name).stat().st_mode & 0o077 == 0, name


def test_run_directory_that_is_a_symlink_is_refused(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / ".fleet").symlink_to(elsewhere)
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint, workers=1, segments=1)
    assert up.wait(timeout=30) == 2, up.log()
    lines = [line for line in up.log().splitlines() if line.strip()]
    assert len(lines) == 1 and ".fleet" in lines[0] and "symlink" in lines[0], lines
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the directory to another user")
def test_run_directory_owned_by_another_user_is_refused(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    rd = tmp_path / ".fleet"
    rd.mkdir(mode=0o777)
    os.chown(rd, 65534, 65534)
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint, workers=1, segments=1)
    assert up.wait(timeout=30) == 2, up.log()
    lines = [line for line in up.log().splitlines() if line.strip()]
    assert len(lines) == 1 and "owned by uid 65534" in lines[0], lines
    assert list(rd.iterdir()) == []


def test_json_shape_of_ps_answer_has_etcd_row_only_when_embedded(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    up = start_up(spawn, ledger_dir, etcd=etcd_server.endpoint, workers=1, segments=1)
    wait_ready(up, tmp_path, workers=1)
    answer = request(run_dir(tmp_path), {"cmd": "ps"})
    assert answer.get("etcd_server") is None, json.dumps(answer)


# -- issue 12 item 11: SIGTERM while the embedded etcd starts ------------------------------


def test_sigterm_while_the_embedded_etcd_starts_stops_at_once(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    slow = tmp_path / "slow-etcd"
    slow.write_text('#!/bin/sh\n[ "$1" = "--version" ] || sleep 30\nexec /usr/bin/etcd "$@"\n')
    slow.chmod(0o755)
    up = start_up(spawn, ledger_dir, workers=1, segments=1, env={"FLEET_ETCD_BINARY": str(slow)})
    wait_until(
        lambda: any("sleep" in " ".join(p.cmdline()) for p in psutil.Process(up.pid).children(recursive=True)),
        timeout=30, message="the slow etcd starting",
    )  # fmt: skip
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=15) == 0, up.tail()
    assert "Traceback" not in up.log(), up.log()
    assert not (tmp_path / ".fleet" / "fleet.pid").exists()


def test_embedded_etcd_that_cannot_start_is_one_line_exit_3(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-etcd"
    broken.write_text('#!/bin/sh\n[ "$1" = "--version" ] && exit 0\necho "bad flag" >&2\nexit 1\n')
    broken.chmod(0o755)
    up = start_up(spawn, ledger_dir, workers=1, segments=1, env={"FLEET_ETCD_BINARY": str(broken)})
    assert up.wait(timeout=60) == 3, up.log()
    lines = [line for line in up.log().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fleet: "), lines
    assert "embedded etcd did not start" in lines[0] and "etcd.log" in lines[0], lines


# -- issue 12 item 9b: settling in a multi-host fleet ------------------------------------


def test_rolling_restart_completes_for_a_host_whose_slots_hold_no_segment(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    """Two `fleet up` (two "hosts") share one fleet with more members than segments, and
    every slot of host A is assigned nothing: a `fleet restart` on A must still go
    through (before: a slot with 0 segments never "settled" unless the fleet had fewer
    segments than *local* workers, so the rolling restart silently never started)."""
    dirs = {host: tmp_path / host for host in ("a", "b")}
    for path in dirs.values():
        path.mkdir()
    # Host b first: it owns both segments, and host a's light members join with nothing
    # (the assignment is sticky and weight-aware).
    for host, weight in (("b", "10"), ("a", "0.1")):
        argv = [
            sys.executable, "-m", "fleet", "up", "--workers", "2", "--segments", "2",
            "--etcd", etcd_server.endpoint, "--handler", "tests.support.recording:handle",
            "--interval", "0.05", "--id", f"host{host}", "--weight", weight,
        ]  # fmt: skip
        spawn.command(argv, env={**CLEAN_ENV, "FLEET_TEST_LEDGER": str(ledger_dir)},
                      name=f"up-{host}", cwd=dirs[host])
        if host == "b":
            wait_converged_weighted(etcd_server.endpoint, ["hostb-0", "hostb-1"])
    ids = ["hosta-0", "hosta-1", "hostb-0", "hostb-1"]
    st = wait_converged_weighted(etcd_server.endpoint, ids)
    assert all(not m["assigned"] for m in st["members"] if m["id"].startswith("hosta")), st
    before = {r["slot"]: r["restarts"] for r in ps(dirs["a"])}
    restart = spawn.command([sys.executable, "-m", "fleet", "restart"], env=CLEAN_ENV,
                            name="restart", cwd=dirs["a"])
    assert restart.wait(timeout=60) == 0, restart.log()
    wait_until(
        lambda: all(r["restarts"] > before[r["slot"]] and r["state"] == "READY"
                    for r in ps(dirs["a"])),
        timeout=90,
        message="host a's rolling restart went through every slot",
    )


def wait_converged_weighted(endpoint: str, ids: list[str]) -> dict[str, object]:
    """Every member in and every segment owned by its assignee (balance is by weight
    here, so `tests.support.fleet.converged`'s max-min <= 1 does not apply)."""
    from tests.support.fleet import status

    def check() -> dict[str, object] | None:
        st = status(endpoint)
        members = sorted(m["id"] for m in st["members"])
        return st if members == sorted(ids) and not st["moving"] and not st["unowned"] else None

    found: dict[str, object] = wait_until(check, timeout=60, message=f"fleet of {ids} converged")
    return found
