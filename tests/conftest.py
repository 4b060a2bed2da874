"""Fixtures shared by every test: a real etcd, spawned fleet processes, failure logs.

Tests run against real etcd processes and real child processes; what keeps that
reliable is that teardown always kills everything (even after a failed or
timed-out test) and that a failing test's report carries the tail of every log
involved, since the interesting output is in the children, not in pytest.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pluggy import Result

# `tests.support.*` must import the same way here and in spawned workers (which get
# the root on PYTHONPATH); tests/ itself is not a package, so put the root on sys.path.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.etcd import PausableEtcd  # noqa: E402
from tests.support.procs import TAIL_LINES, Proc, Spawner, tail  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a `timeout`, a CI runner cancelling the job) ends pytest like Ctrl-C, so
    every fixture's teardown still runs: by default Python dies on SIGTERM at once and
    leaves the etcd servers and fleets the tests started running as orphans."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


# (title, path) of every log a test's fixtures produced, shown when the test fails.
LOGS_KEY = pytest.StashKey[list[tuple[str, Path]]]()


def register_log(node: pytest.Item, title: str, path: Path) -> None:
    """Have `path`'s tail printed in `node`'s report if the test fails."""
    node.stash.setdefault(LOGS_KEY, []).append((title, path))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Result[pytest.TestReport], None]:
    """Store each phase's report on the item (``item.rep_setup/rep_call/rep_teardown``)
    and add a section per registered log to a failed report.

    Sections are added to the report itself (not printed from a fixture teardown)
    because pytest only displays the failing phase's report; at this point the
    processes are still running, so their logs are complete up to the failure.
    """
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    if not report.failed:
        return
    call_report = getattr(item, "rep_call", None)
    if report.when == "teardown" and call_report is not None and call_report.failed:
        return  # already shown with the call's failure
    for title, path in item.stash.get(LOGS_KEY, []):
        report.sections.append((f"{title}: last {TAIL_LINES} lines of {path}", tail(path)))


@pytest.fixture
def etcd_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PausableEtcd]:
    """A started single-member etcd in ``tmp_path/etcd``, log in ``tmp_path/etcd.log``.

    Always SIGKILLed at teardown (a test may have paused, killed or restarted it).
    Use ``etcd_server.endpoint`` to connect.
    """
    etcd = PausableEtcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    register_log(request.node, "etcd log", tmp_path / "etcd.log")
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.kill()


@pytest.fixture
def spawn(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Spawner]:
    """Factory: ``spawn(args, env=None, name="proc") -> Proc`` runs ``python -m fleet *args``.

    The child runs in ``tmp_path`` in its own session, logs to ``tmp_path/<name>.log``,
    and gets PYTHONUNBUFFERED=1 and the repo root on PYTHONPATH (an ``env`` value of
    None unsets a variable). At teardown every spawned process group, descendant
    and tagged process is SIGCONT+SIGKILLed and reaped.
    """

    def _register(proc: Proc) -> None:
        register_log(request.node, f"process {proc.name} (pid {proc.pid})", proc.log_path)

    spawner = Spawner(log_dir=tmp_path, cwd=tmp_path, on_spawn=_register)
    try:
        yield spawner
    finally:
        spawner.kill_all()


@pytest.fixture
def ledger_dir(tmp_path: Path) -> Path:
    """An empty directory for `tests.support.recording` ledgers.

    Pass it to workers as ``env={"FLEET_TEST_LEDGER": str(ledger_dir)}`` and check
    it with `tests.support.checker.assert_history_ok(ledger_dir)`.
    """
    path = tmp_path / "ledger"
    path.mkdir()
    return path
