"""Driving a `fleet up` for the supervisor-hardening tests: start it, ask it, wait on it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from fleet.supervise.control import RunDir, request
from tests.support.fleet import CLEAN_ENV, RECORDING, wait_converged
from tests.support.procs import Proc, Spawner
from tests.support.wait import wait_until

T = TypeVar("T")
TIMEOUT = 60.0


def fleet_env(
    ledger_dir: Path, extra: Mapping[str, str | None] | None = None
) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        **CLEAN_ENV,
        "FLEET_TEST_LEDGER": str(ledger_dir),
        "FLEET_TEST_CALL_SECONDS": "0.05",
        "FLEET_EMBEDDED_PORT": "0",  # never 2379: any free port
    }
    env.update(extra or {})
    return env


def start_up(
    spawn: Spawner,
    ledger_dir: Path,
    *,
    etcd: str | None = None,
    workers: int = 2,
    segments: int = 8,
    handler: str = RECORDING,
    extra: Sequence[str] = (),
    env: Mapping[str, str | None] | None = None,
    name: str = "up",
    faulty: bool = False,
    prefix: Sequence[str] = (),
) -> Proc:
    """`fleet up` in the test's directory (embedded etcd unless `etcd`); with `faulty`, run
    through `tests.support.faulty_fleet` so its fault seams (see there) apply."""
    args = [
        "up", "--workers", str(workers), "--segments", str(segments),
        "--handler", handler, "--interval", "0.05",
    ]  # fmt: skip
    if etcd is not None:
        args += ["--etcd", etcd]
    module = "tests.support.faulty_fleet" if faulty else "fleet"
    argv = [*prefix, sys.executable, "-m", module, *args, *extra]
    return spawn.command(argv, env=fleet_env(ledger_dir, env), name=name)


def run_dir(tmp_path: Path) -> RunDir:
    return RunDir(tmp_path / ".fleet")


def ps_answer(tmp_path: Path, timeout: float = 10.0) -> dict[str, Any]:
    return request(run_dir(tmp_path), {"cmd": "ps"}, timeout=timeout)


def ps(tmp_path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = ps_answer(tmp_path)["slots"]
    return rows


def wait_alive(
    up: Proc,
    predicate: Callable[[], T],
    message: str,
    timeout: float = TIMEOUT,
    interval: float = 0.05,
) -> T:
    """`wait_until`, failing at once (with the log) if `fleet up` exits meanwhile."""

    def check() -> T:
        if not up.alive:
            pytest.fail(
                f"fleet up exited {up.returncode} while waiting for {message}:\n{up.tail()}"
            )
        return predicate()

    return wait_until(check, timeout=timeout, interval=interval, message=message)


def wait_ready(up: Proc, tmp_path: Path, workers: int) -> tuple[str, list[dict[str, Any]]]:
    """(etcd endpoint, ps rows) once every slot is READY and etcd shows the fleet converged."""

    def info() -> dict[str, Any] | None:
        data = run_dir(tmp_path).read_info()
        return data if data and data.get("etcd") else None

    found = wait_alive(up, info, ".fleet/fleet.json")
    endpoint = str(found["etcd"][0])

    def all_ready() -> list[dict[str, Any]] | None:
        rows = ps(tmp_path)
        ok = len(rows) == workers and all(r["state"] == "READY" for r in rows)
        return rows if ok else None

    wait_alive(up, all_ready, f"{workers} READY slots")
    members = [r["member"] for r in ps(tmp_path)]
    wait_converged(endpoint, members, timeout=TIMEOUT)
    rows = wait_alive(up, all_ready, f"{workers} READY slots")
    return endpoint, rows


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def wait_calls(up: Proc, ledger_dir: Path, count: int = 20) -> None:
    """Until the ledger holds `count` calls: a fleet is READY after its first calls (a
    cold start acquires each segment once), and a test that checks the history of a
    run wants more of it than that."""
    from tests.support.checker import load_calls

    wait_alive(up, lambda: len(load_calls(ledger_dir)) >= count or None, f"{count} calls")


def sleep_alive(up: Proc, seconds: float) -> None:
    """Sleep, failing at once if `fleet up` exits meanwhile."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not up.alive:
            pytest.fail(f"fleet up exited {up.returncode}:\n{up.tail()}")
        time.sleep(0.05)
