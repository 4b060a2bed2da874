"""Issue 10, items 14 and 4: several fleets on one host, and `fleet etcd` + `fleet up`.

Item 14: a second `fleet up` (another directory) finds 2379 taken and takes another
port; its start line says who holds 2379, and its member ids differ from the first
fleet's (the default id prefix is the host name plus a hash of the run directory), yet
stay the same across restarts in one directory. Item 4: `fleet up` in a directory whose
`.fleet/etcd` a `fleet etcd` already serves uses that etcd (and leaves it running); an
etcd there that does not answer is one line and exit 3.

Real processes and a real etcd throughout. The preferred port is one the test chose
(FLEET_EMBEDDED_PORT=<n> prefers n and n+1 instead of 2379/2380), never 2379 itself:
other tests and other users of the machine may hold that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet import config as config_mod
from fleet.server.diagnose import busy_note, etcd_processes_using
from fleet.server.embedded import EmbeddedEtcd, free_port
from fleet.supervise.rundir import RunDir
from tests.support.procs import Proc, Spawner
from tests.support.supervised import fleet_env, wait_alive, wait_ready

EXIT_OK, EXIT_USAGE, EXIT_ETCD = 0, 2, 3
HOST = socket.gethostname()


def expected_prefix(directory: Path) -> str:
    """The documented default: `<hostname>-<first 4 hex of sha1(resolved run dir)>`."""
    digest = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:4]
    return f"{HOST}-{digest}"


def start_up(
    spawn: Spawner, ledger_dir: Path, directory: Path, env: dict[str, str | None], name: str
) -> Proc:
    args = [
        sys.executable, "-m", "fleet", "up", "--workers", "2", "--segments", "4",
        "--handler", "tests.support.recording:handle", "--interval", "0.05",
    ]  # fmt: skip
    return spawn.command(args, env=fleet_env(ledger_dir, env), name=name, cwd=directory)


def run_cli(spawn: Spawner, directory: Path, *args: str, name: str) -> tuple[int, str]:
    proc = spawn(list(args), env=fleet_env(Path(directory)), name=name, cwd=directory)
    code = proc.wait(timeout=60)
    return code, proc.log()


def ps_members(spawn: Spawner, directory: Path, name: str) -> list[str]:
    code, out = run_cli(spawn, directory, "ps", "--json", name=name)
    assert code == EXIT_OK, out
    return [row["member"] for row in json.loads(out)]


def status_members(spawn: Spawner, directory: Path, name: str) -> list[str]:
    code, out = run_cli(spawn, directory, "status", "--json", name=name)
    assert code == EXIT_OK, out
    return sorted(m["id"] for m in json.loads(out)["members"])


def start_line(up: Proc) -> str:
    lines = [line for line in up.log().splitlines() if "etcd at http" in line]
    assert lines, up.log()
    return lines[0]


def down(spawn: Spawner, directory: Path, up: Proc, name: str) -> None:
    code, out = run_cli(spawn, directory, "down", name=name)
    assert code == EXIT_OK, out
    assert up.wait(timeout=60) == EXIT_OK, up.tail()


def health(endpoint: str, timeout: float = 2.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{endpoint}/health", timeout=timeout) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


@pytest.fixture
def preferred_port() -> int:
    """A port free now, with the next one free too (the peer port it implies)."""
    for _ in range(50):
        port = free_port()
        if port < 65535:
            with contextlib.suppress(OSError), socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
                return port
    pytest.skip("no pair of free ports")


@pytest.fixture
def held_port(preferred_port: int) -> Iterator[int]:
    """`preferred_port`, held (listening) by this test process."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", preferred_port))
        sock.listen()
        yield preferred_port


# -- item 14: the start line names what holds the preferred port ----------------------


def test_second_fleet_up_names_the_first_and_has_other_ids(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path, preferred_port: int
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    env: dict[str, str | None] = {"FLEET_EMBEDDED_PORT": str(preferred_port)}
    up_a = start_up(spawn, ledger_dir, first, env, "up-a")
    endpoint_a, rows_a = wait_ready(up_a, first, 2)
    assert endpoint_a == f"http://127.0.0.1:{preferred_port}", start_line(up_a)
    assert "busy" not in start_line(up_a)

    up_b = start_up(spawn, ledger_dir, second, env, "up-b")
    endpoint_b, rows_b = wait_ready(up_b, second, 2)
    assert endpoint_b != endpoint_a
    line = start_line(up_b)
    # The peer port (the next one) is the first fleet's too, unless someone else had it.
    busy = rf"ports? {preferred_port}(, {preferred_port + 1})? busy"
    assert re.search(rf"{busy} \(fleet up in {re.escape(str(first.resolve()))}\)", line), line

    ids_a = ps_members(spawn, first, "ps-a")
    ids_b = ps_members(spawn, second, "ps-b")
    assert ids_a == [f"{expected_prefix(first)}-0", f"{expected_prefix(first)}-1"]
    assert ids_b == [f"{expected_prefix(second)}-0", f"{expected_prefix(second)}-1"]
    assert not set(ids_a) & set(ids_b)
    assert status_members(spawn, first, "status-a") == ids_a
    assert status_members(spawn, second, "status-b") == ids_b

    # The same fleet restarted in the same directory keeps its ids.
    down(spawn, second, up_b, "down-b")
    up_b2 = start_up(spawn, ledger_dir, second, env, "up-b2")
    wait_ready(up_b2, second, 2)
    assert ps_members(spawn, second, "ps-b2") == ids_b
    assert status_members(spawn, second, "status-b2") == ids_b
    down(spawn, second, up_b2, "down-b2")
    down(spawn, first, up_a, "down-a")


def test_fleet_etcd_says_which_process_holds_the_port(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path, held_port: int
) -> None:
    etcd = spawn(
        ["etcd"], env=fleet_env(ledger_dir, {"FLEET_EMBEDDED_PORT": str(held_port)}), name="etcd"
    )
    wait_alive(etcd, lambda: "etcd ready at" in etcd.log(), "fleet etcd ready")
    me = psutil.Process().name()
    assert f"port {held_port} busy (pid {os.getpid()} {me})" in etcd.log(), etcd.log()
    ready = next(line for line in etcd.log().splitlines() if line.startswith("etcd ready at"))
    assert f":{held_port} " not in ready, ready
    etcd.signal(signal.SIGINT)
    assert etcd.wait(timeout=30) == EXIT_OK, etcd.tail()


def test_busy_note_names_an_etcd_and_a_fleet_etcd(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path, etcd_server: EmbeddedEtcd
) -> None:
    note = busy_note([etcd_server.client_port])
    assert note == f"port {etcd_server.client_port} busy (etcd pid {etcd_server.pid})"
    assert busy_note([]) is None

    fe = spawn(["etcd"], env=fleet_env(ledger_dir), name="fleet-etcd")
    wait_alive(fe, lambda: "etcd ready at" in fe.log(), "fleet etcd ready")
    port = int(re.search(r"etcd ready at http://127\.0\.0\.1:(\d+)", fe.log())[1])  # type: ignore[index]
    note = busy_note([port])
    assert note == f"port {port} busy (fleet etcd in {tmp_path.resolve()})", note


def test_bad_embedded_port_value_is_one_line(spawn: Spawner, ledger_dir: Path) -> None:
    proc = spawn(["etcd"], env=fleet_env(ledger_dir, {"FLEET_EMBEDDED_PORT": "x1"}), name="etcd")
    assert proc.wait(timeout=60) == EXIT_USAGE, proc.log()
    lines = proc.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleet: FLEET_EMBEDDED_PORT"), lines
    assert "'x1'" in lines[0]


# -- item 14: member ids, pure ------------------------------------------------------------


@given(
    host=st.from_regex(r"[A-Za-z0-9._-]{1,200}", fullmatch=True),
    parts=st.lists(st.text(min_size=1, max_size=12).filter(lambda s: "/" not in s), max_size=5),
)
def test_directory_id_prefix_is_stable_short_and_valid(host: str, parts: list[str]) -> None:
    directory = "/" + "/".join(parts)
    prefix = config_mod.directory_host_id(host, directory)
    assert prefix == config_mod.directory_host_id(host, directory)
    digest = hashlib.sha1(directory.encode("utf-8", "surrogateescape")).hexdigest()[:4]
    assert prefix.endswith(f"-{digest}")
    assert host.startswith(prefix[: -len(digest) - 1])
    # `<prefix>-<slot>` is a valid --id for any slot fleet up can have.
    assert re.fullmatch(r"[A-Za-z0-9._@:-]{1,128}", f"{prefix}-1023")


def test_explicit_ids_win_over_the_directory_default(tmp_path: Path) -> None:
    where = str(tmp_path)
    plain = config_mod.load({}, {})
    assert config_mod.supervised_id_prefix(plain, where) == config_mod.directory_host_id(
        HOST, where
    )
    assert plain.host_id == HOST  # supervisord's template and listener keep the host name
    by_host = config_mod.load({}, {"FLEET_HOST_ID": "rack1"})
    assert config_mod.supervised_id_prefix(by_host, where) == "rack1"
    by_id = config_mod.load({"id": "api"}, {"FLEET_HOST_ID": "rack1"})
    assert config_mod.supervised_id_prefix(by_id, where) == "api"


# -- item 4: fleet up on the data dir of a running fleet etcd ----------------------------


def start_fleet_etcd(spawn: Spawner, ledger_dir: Path) -> tuple[Proc, str, psutil.Process]:
    fe = spawn(["etcd"], env=fleet_env(ledger_dir), name="fleet-etcd")
    wait_alive(fe, lambda: "etcd ready at" in fe.log(), "fleet etcd ready")
    match = re.search(r"etcd ready at (http://\S+) ", fe.log())
    assert match, fe.log()
    server = psutil.Process(fe.pid).children()
    assert len(server) == 1, server
    return fe, match[1], server[0]


def test_fleet_up_uses_the_running_fleet_etcd_and_leaves_it_running(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    fe, endpoint, server = start_fleet_etcd(spawn, ledger_dir)
    up = start_up(spawn, ledger_dir, tmp_path, {}, "up")
    used, _rows = wait_ready(up, tmp_path, 2)
    assert used == endpoint
    assert f"fleet | using the running fleet etcd (pid {fe.pid}) at {endpoint}" in up.log()
    assert etcd_processes_using(tmp_path / ".fleet" / "etcd") == [server]

    answer = _ps_answer(tmp_path)
    row = answer["etcd_server"]
    assert row["state"] == "EXTERNAL" and row["endpoint"] == endpoint, row
    assert row["pid"] == server.pid and row["fleet_etcd_pid"] == fe.pid, row
    code, out = run_cli(spawn, tmp_path, "ps", name="ps")
    assert code == EXIT_OK, out
    etcd_line = next(line for line in out.splitlines() if line.startswith("etcd "))
    assert "EXTERNAL" in etcd_line and f"fleet etcd pid {fe.pid}" in etcd_line, etcd_line
    assert "restarts" not in etcd_line, etcd_line

    down(spawn, tmp_path, up, "down")
    assert fe.alive and server.is_running()
    assert health(endpoint)
    fe.signal(signal.SIGINT)
    assert fe.wait(timeout=30) == EXIT_OK, fe.tail()
    assert etcd_processes_using(tmp_path / ".fleet" / "etcd") == []


def test_fleet_up_on_a_frozen_fleet_etcd_is_one_line_exit_3(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    fe, endpoint, server = start_fleet_etcd(spawn, ledger_dir)
    server.suspend()  # SIGSTOP: the process is there, its data dir held, nothing answers
    try:
        up = start_up(spawn, ledger_dir, tmp_path, {}, "up")
        code = up.wait(timeout=60)
        out = up.log()
        assert code == EXIT_ETCD, out
        assert "Traceback" not in out and "did not become healthy" not in out, out
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines[-1].startswith("fleet: "), out
        assert f"fleet etcd (pid {fe.pid})" in lines[-1] and endpoint in lines[-1], lines[-1]
        assert not (tmp_path / ".fleet" / "fleet.pid").exists()
    finally:
        server.resume()
    assert health(endpoint, timeout=10)
    fe.signal(signal.SIGTERM)
    assert fe.wait(timeout=30) == EXIT_OK, fe.tail()


def test_fleet_up_still_refuses_a_plain_etcd_on_its_data_dir(
    spawn: Spawner, ledger_dir: Path, tmp_path: Path
) -> None:
    plain = EmbeddedEtcd(tmp_path / ".fleet" / "etcd", log_path=tmp_path / "plain.log")
    try:
        plain.start()
        up = start_up(spawn, ledger_dir, tmp_path, {}, "up")
        code = up.wait(timeout=60)
        out = up.log()
        assert code == EXIT_USAGE, out
        assert "Traceback" not in out, out
        last = [line for line in out.splitlines() if line.strip()][-1]
        assert last.startswith("fleet: ") and f"pid {plain.pid}" in last, last
        assert plain.healthy()
    finally:
        plain.kill()


def _ps_answer(directory: Path) -> dict[str, Any]:
    from fleet.supervise.control import request

    answer: dict[str, Any] = request(RunDir(directory / ".fleet"), {"cmd": "ps"}, timeout=10)
    return answer
