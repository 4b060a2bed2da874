"""What a user sees when they get it wrong: exit code and one clear line, no traceback.

DESIGN.md, "Exit codes": 2 for usage or configuration errors (the message names the
bad key, flag or value), 3 when etcd cannot be reached (the message names the
endpoint). Each error is exactly one line starting with ``fleet: ``. Also the two
machine-readable outputs other tools rely on: ``fleet status --json`` and
``--log-format json``.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from fleet.server.embedded import EmbeddedEtcd, free_port
from tests.support.fleet import RECORDING, counts, start_worker, status, wait_converged
from tests.support.procs import Proc, Spawner

EXIT_USAGE, EXIT_ETCD = 2, 3


def assert_one_line_error(proc: Proc, code: int, *names: str, timeout: float = 15) -> str:
    """`proc` exits with `code` having written one ``fleet: ...`` line naming `names`."""
    rc = proc.wait(timeout=timeout)
    out = proc.log()
    assert "Traceback" not in out, f"{proc.name} printed a traceback:\n{out}"
    assert rc == code, f"{proc.name} exited {rc}, expected {code}:\n{out}"
    lines = out.splitlines()
    assert len(lines) == 1, f"{proc.name} wrote {len(lines)} lines, expected one:\n{out}"
    line = lines[0]
    assert line.startswith("fleet: "), line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


def _write(tmp_path: Path, text: str) -> Path:
    # Not ./fleet.toml: that is read by default by every command run in tmp_path.
    path = tmp_path / "conf" / "bad.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        pytest.param("segmnts = 3\n", ["'segmnts'"], id="unknown-key"),
        pytest.param('segments = "ten"\n', ["segments", "'ten'"], id="segments-not-int"),
    ],
)
def test_bad_config_file_exits_2(
    spawn: Spawner, tmp_path: Path, toml: str, names: list[str]
) -> None:
    path = _write(tmp_path, toml)
    proc = spawn(["worker", "--config", str(path)], name="worker")
    assert_one_line_error(proc, EXIT_USAGE, *names, str(path.name))


@pytest.mark.parametrize(
    ("args", "names"),
    [
        pytest.param(["worker", "--segments", "0"], ["segments", "'0'"], id="segments-0"),
        pytest.param(["worker", "--bogus"], ["--bogus"], id="unknown-flag"),
        pytest.param(["status", "--bogus"], ["--bogus"], id="status-unknown-flag"),
    ],
)
def test_bad_flags_exit_2(spawn: Spawner, args: list[str], names: list[str]) -> None:
    proc = spawn(args, name="fleet")
    assert_one_line_error(proc, EXIT_USAGE, *names)


def test_no_command_exits_2_with_usage(spawn: Spawner) -> None:
    proc = spawn([], name="fleet")
    rc = proc.wait(timeout=15)
    out = proc.log()
    assert rc == EXIT_USAGE, out
    assert "Traceback" not in out, out
    assert "usage:" in out and "worker" in out, out


def test_handler_that_cannot_be_imported_exits_2(etcd_server: EmbeddedEtcd, spawn: Spawner) -> None:
    proc = spawn(
        ["worker", "--etcd", etcd_server.endpoint, "--handler", "nosuch.module:handle"],
        name="worker",
    )
    assert_one_line_error(proc, EXIT_USAGE, "nosuch.module")


def test_unreachable_etcd_exits_3_naming_the_endpoint(spawn: Spawner) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = spawn(["worker", "--etcd", endpoint, "--handler", RECORDING], name="worker")
    assert_one_line_error(proc, EXIT_ETCD, endpoint, timeout=15)
    assert time.monotonic() - started < 15


def test_segment_count_mismatch_exits_2_and_default_count_joins(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    ep = etcd_server.endpoint
    start_worker(spawn, ep, "w0", ledger_dir, segments=12)
    wait_converged(ep, ["w0"])

    bad = spawn(
        ["worker", "--etcd", ep, "--id", "w7", "--segments", "7", "--handler", RECORDING],
        env={"FLEET_TEST_LEDGER": str(ledger_dir)},
        name="w7",
    )
    assert_one_line_error(bad, EXIT_USAGE, "12", "7")

    # No --segments (and none from the environment): it takes the fleet's 12.
    argv = ["worker", "--etcd", ep, "--id", "w1", "--handler", RECORDING]
    argv += ["--interval", "0.05", "--lease-ttl", "10"]
    env = {"FLEET_TEST_LEDGER": str(ledger_dir), "FLEET_SEGMENTS": None}
    joiner = spawn(argv, env=env, name="w1")
    st = wait_converged(ep, ["w0", "w1"])
    assert st["segments"] == 12
    assert counts(st) == {"w0": 6, "w1": 6}
    assert joiner.alive


STATUS_KEYS = {
    "fleet",
    "revision",
    "segments",
    "leader",
    "generation",
    "members",
    "segment_owners",
    "unowned",
    "moving",
}


def test_status_json_and_json_logs(
    etcd_server: EmbeddedEtcd, spawn: Spawner, ledger_dir: Path
) -> None:
    ep = etcd_server.endpoint
    worker = start_worker(spawn, ep, "j0", ledger_dir, args=["--log-format", "json"])
    wait_converged(ep, ["j0"])

    proc = spawn(["status", "--json", "--etcd", ep], name="status")
    assert proc.wait(timeout=15) == 0, proc.log()
    st = json.loads(proc.log())
    assert st.keys() >= STATUS_KEYS, f"missing {STATUS_KEYS - st.keys()}"
    assert st["fleet"] == "default"
    assert st["segments"] == 12
    assert st["leader"] == "j0"
    assert st["generation"] >= 1
    assert [m["id"] for m in st["members"]] == ["j0"]
    assert st["members"][0]["owned"] == list(range(12))
    assert [s["owner"] for s in st["segment_owners"]] == ["j0"] * 12
    assert st["unowned"] == [] and st["moving"] == []
    assert st["revision"] <= status(ep)["revision"]

    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.tail()
    lines = worker.log().splitlines()
    assert len(lines) >= 3, lines  # joined, leader, acquired..., stopping, stopped
    for line in lines:
        record = json.loads(line)
        assert record["member"] == "j0", line
    assert any("joined fleet" in json.loads(line)["msg"] for line in lines)
