"""Unit tests of the history checker on hand-made ledgers.

The checker is the oracle for every safety test, so it must itself be proven to
catch what it claims to catch (and to stay quiet on a correct history).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import recording
from tests.support.checker import Call, assert_history_ok, check_history, load_calls
from tests.support.procs import REPO_ROOT, Spawner, tagged_processes
from tests.support.wait import wait_until


def _start(seg: int, token: int, pid: int, t: float, member: str = "m") -> dict[str, Any]:
    return {"ev": "start", "segment": seg, "token": token, "member": member, "pid": pid,
            "t": t, "wall": 1000.0 + t}  # fmt: skip


def _end(
    seg: int, token: int, pid: int, t: float, commit: str = "ok", member: str = "m"
) -> dict[str, Any]:
    return {"ev": "end", "segment": seg, "token": token, "member": member, "pid": pid,
            "t": t, "wall": 1000.0 + t, "commit": commit, "checkpoint_read": None}  # fmt: skip


def _write(ledger: Path, name: str, records: list[dict[str, Any]], torn: str = "") -> None:
    ledger.mkdir(exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + torn
    (ledger / f"{name}.jsonl").write_text(text)


def _call(seg: int, token: int, start: float, end: float | None, commit: str | None = "ok",
          pid: int = 1) -> Call:  # fmt: skip
    return Call(segment=seg, token=token, member="m", pid=pid, start=start, end=end,
                commit=commit)  # fmt: skip


def test_clean_history_passes(tmp_path: Path) -> None:
    # Two workers hand segment 0 back and forth; segment 1 runs in parallel threads.
    _write(tmp_path, "a-1", [
        _start(0, 10, 1, 1.0), _start(1, 11, 1, 1.05), _end(0, 10, 1, 1.1),
        _end(1, 11, 1, 1.2), _start(0, 10, 1, 1.2), _end(0, 10, 1, 1.3),
    ])  # fmt: skip
    _write(tmp_path, "b-2", [
        _start(0, 20, 2, 1.4), _end(0, 20, 2, 1.5), _start(1, 21, 2, 1.6), _end(1, 21, 2, 1.7),
    ])  # fmt: skip
    calls = assert_history_ok(tmp_path, min_calls=5)
    assert len(calls) == 5
    assert [c.start for c in calls] == sorted(c.start for c in calls)
    assert all(c.end is not None and c.commit == "ok" for c in calls)


def test_pairing_within_a_process(tmp_path: Path) -> None:
    # Interleaved lines of parallel segments pair by (pid, segment, token), in order.
    _write(tmp_path, "a-1", [
        _start(0, 5, 1, 1.0), _start(1, 6, 1, 1.01), _end(1, 6, 1, 1.02, commit="lost"),
        _end(0, 5, 1, 1.03), _start(0, 5, 1, 1.04), _end(0, 5, 1, 1.05),
    ])  # fmt: skip
    calls = load_calls(tmp_path)
    assert [(c.segment, c.start, c.end, c.commit) for c in calls] == [
        (0, 1.0, 1.03, "ok"),
        (1, 1.01, 1.02, "lost"),
        (0, 1.04, 1.05, "ok"),
    ]


def test_overlap_under_different_tokens_is_found(tmp_path: Path) -> None:
    _write(tmp_path, "a-1", [_start(3, 7, 1, 1.0), _end(3, 7, 1, 2.0)])
    _write(tmp_path, "b-2", [_start(3, 9, 2, 1.5, member="b"), _end(3, 9, 2, 2.5, member="b")])
    violations = check_history(load_calls(tmp_path))
    assert len(violations) == 1
    assert "segment 3" in violations[0] and "overlapping" in violations[0]
    with pytest.raises(AssertionError, match="1 safety violation"):
        assert_history_ok(tmp_path)


def test_overlap_under_same_token_or_other_segment_is_fine() -> None:
    calls = [
        _call(0, 7, 1.0, 2.0, pid=1), _call(0, 7, 1.5, 2.5, pid=1),  # same ownership
        _call(1, 8, 1.2, 2.2, pid=2),  # another segment
    ]  # fmt: skip
    assert check_history(calls) == []


def test_token_decrease_is_found() -> None:
    calls = [_call(2, 30, 1.0, 1.1), _call(2, 40, 1.2, 1.3, pid=2), _call(2, 35, 1.4, 1.5)]
    violations = check_history(calls)
    assert len(violations) == 1
    assert "token went down from 40 to 35" in violations[0]


def test_unterminated_call_ends_at_its_start(tmp_path: Path) -> None:
    # pid 1 died mid-call at t=1.0 (no end line, plus a torn last line).
    _write(tmp_path, "a-1", [_start(0, 5, 1, 1.0)], torn='{"ev":"end","seg')
    _write(tmp_path, "b-2", [_start(0, 6, 2, 1.2), _end(0, 6, 2, 1.3)])
    calls = load_calls(tmp_path)
    dead = next(c for c in calls if c.pid == 1)
    assert dead.end is None and dead.commit is None and dead.effective_end == 1.0
    assert check_history(calls) == []  # the new owner started after the death

    # A call that was running when the dead one started is an overlap...
    assert len(check_history([_call(0, 4, 0.5, 1.5, pid=3), dead])) == 1
    # ...and so is a dead call that started while another token's call was running.
    assert len(check_history([dead, _call(0, 4, 0.9, 1.1, pid=2)])) == 1


def test_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a-1.jsonl").write_text('{"ev":"start"\n' + json.dumps(_end(0, 1, 1, 1.0)) + "\n")
    with pytest.raises(ValueError, match="corrupt ledger line"):
        load_calls(tmp_path)


def test_allow_fenced_excludes_lost_commits() -> None:
    # A paused ex-owner (token 5) wakes up during the new owner's call: its commit
    # was rejected, so with allow_fenced the history is acceptable.
    calls = [
        _call(0, 5, 1.0, 3.0, commit="lost", pid=1),
        _call(0, 9, 2.0, 2.5, pid=2),
        _call(0, 5, 2.6, 2.7, commit="lost", pid=1),  # started after token 9: decrease
    ]
    strict = check_history(calls)
    assert any("overlapping" in v for v in strict)
    assert any("token went down" in v for v in strict)
    assert check_history(calls, allow_fenced=True) == []
    # A successful commit is never excused, nor is an unterminated call.
    assert check_history([*calls, _call(0, 9, 2.8, 3.5, pid=2)], allow_fenced=True) == []
    bad = [_call(0, 5, 1.0, 3.0, commit="ok", pid=1), _call(0, 9, 2.0, 2.5, pid=2)]
    assert len(check_history(bad, allow_fenced=True)) == 1
    dead = [_call(0, 9, 2.0, 2.5, pid=2), _call(0, 5, 2.2, None, commit=None, pid=1)]
    assert len(check_history(dead, allow_fenced=True)) == 2  # overlap + decrease


def test_min_calls(tmp_path: Path) -> None:
    tmp_path.joinpath("empty.jsonl").write_text("")
    with pytest.raises(AssertionError, match="at least 1 handler calls"):
        assert_history_ok(tmp_path)
    assert assert_history_ok(tmp_path, min_calls=0) == []


# --- the other helpers in tests/support -------------------------------------------
# Every integration test stands on these, so they get tested as well.


def test_wait_until_returns_the_truthy_value() -> None:
    values: Iterator[Any] = iter([0, None, [], "found"])
    assert wait_until(lambda: next(values), timeout=5, interval=0.001) == "found"


def test_wait_until_times_out_with_message_and_last_value() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"leader elected.*last value: \[\]"):
        wait_until(list, timeout=0.2, interval=0.01, message="leader elected")
    assert 0.2 <= time.monotonic() - started < 2


def test_wait_until_retries_exceptions_then_reraises_the_last() -> None:
    attempts: list[int] = []

    def flaky() -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("not yet")
        return 42

    assert wait_until(flaky, timeout=5, interval=0.001) == 42

    def broken() -> int:
        raise ConnectionError("etcd down")

    with pytest.raises(ConnectionError, match="etcd down") as info:
        wait_until(broken, timeout=0.1, interval=0.01, message="etcd up")
    assert any("etcd up" in note for note in info.value.__notes__)


@dataclass
class _Ctx:
    """The handler-visible part of fleet.SegmentContext, for in-process handler tests."""

    segment: int
    token: int
    member_id: str
    checkpoint: Any
    accept: bool = True
    committed: list[Any] = field(default_factory=list)

    def commit(self, value: Any) -> None:
        from fleet import LostOwnership

        if not self.accept:
            raise LostOwnership("fenced")
        self.committed.append(value)
        self.checkpoint = value


def test_recording_handler_writes_a_pairable_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(recording.LEDGER_ENV, str(tmp_path))
    monkeypatch.setenv(recording.CALL_SECONDS_ENV, "0.01")
    ok = _Ctx(segment=1, token=10, member_id="m1", checkpoint=4)
    fenced = _Ctx(segment=2, token=11, member_id="m1", checkpoint=None, accept=False)
    try:
        threads = [
            threading.Thread(target=recording.handle, args=(ctx,)) for ctx in [ok, fenced] * 4
        ]  # segments run in parallel threads in a worker
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        recording.close_ledgers()
    assert [p.name for p in tmp_path.iterdir()] == [f"m1-{os.getpid()}.jsonl"]
    calls = load_calls(tmp_path)
    assert len(calls) == 8
    assert {(c.segment, c.token, c.commit) for c in calls} == {(1, 10, "ok"), (2, 11, "lost")}
    assert all(c.end is not None and c.end >= c.start + 0.01 for c in calls)
    assert ok.committed[0] == 5  # checkpoint + 1
    lines = [json.loads(line) for line in (tmp_path / f"m1-{os.getpid()}.jsonl").open()]
    end = next(r for r in lines if r["ev"] == "end" and r["segment"] == 2)
    assert end["checkpoint_read"] is None and end["member"] == "m1" and "wall" in end


def test_recording_handler_exit_on_call_leaves_an_unterminated_call(tmp_path: Path) -> None:
    script = (
        "from types import SimpleNamespace as NS\n"
        "from tests.support import recording\n"
        "recording.handle(NS(segment=7, token=70, member_id='w', checkpoint=None))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        recording.LEDGER_ENV: str(tmp_path),
        recording.EXIT_ON_CALL_ENV: "7",
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, timeout=60)
    assert result.returncode == 7
    [call] = load_calls(tmp_path)
    assert (call.segment, call.token, call.member, call.end) == (7, 70, "w", None)


_TREE = """
import os, subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
same_group = subprocess.Popen(sleep)
own_session = subprocess.Popen(sleep, start_new_session=True)
# An orphan: its parent exits at once, so it is re-parented away from our tree.
middle = subprocess.Popen([sys.executable, "-c",
    "import subprocess as s; p = s.Popen(%r, start_new_session=True, stdout=s.DEVNULL); "
    "print(p.pid)" % (sleep,)], stdout=subprocess.PIPE, text=True)
orphan = int(middle.communicate()[0])
pids = [os.getpid(), same_group.pid, own_session.pid, orphan]
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(" ".join(map(str, pids)))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
print("tree ready", flush=True)
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_spawner_kills_groups_descendants_and_orphans(tmp_path: Path) -> None:
    spawner = Spawner(log_dir=tmp_path)
    pid_file = tmp_path / "pids"
    try:
        proc = spawner.command([sys.executable, "-c", _TREE, str(pid_file)], name="tree")
        wait_until(pid_file.exists, timeout=30, message="process tree started")
        pids = [int(p) for p in pid_file.read_text().split()]
        assert wait_until(lambda: "tree ready" in proc.log(), timeout=10)
        assert all(not _gone(pid) for pid in pids)
        proc.signal(signal.SIGSTOP, group=True)  # stopped processes must die too
    finally:
        spawner.kill_all()
    assert all(_gone(pid) for pid in pids), [p for p in pids if not _gone(p)]
    assert not proc.alive and proc.returncode == -signal.SIGKILL
    assert tagged_processes(spawner.tag) == []


def test_proc_api_and_unique_log_names(tmp_path: Path) -> None:
    spawner = Spawner(log_dir=tmp_path)
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n"
        "print('hello', os.environ['FLEET_X'], os.environ.get('HOME') is None, flush=True)\n"
        "time.sleep(300)\n"
    )
    try:
        env = {"FLEET_X": "y", "HOME": None}
        first = spawner.command([sys.executable, "-c", script], env=env, name="w")
        second = spawner.command([sys.executable, "-c", "pass"], name="w")
        assert (first.log_path.name, second.log_path.name) == ("w.log", "w-2.log")
        assert second.wait(timeout=30) == 0 and not second.alive
        wait_until(lambda: "hello y True" in first.log(), timeout=30, message=first.tail())
        assert first.alive
        with pytest.raises(subprocess.TimeoutExpired):
            first.wait(timeout=0.1)
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 3
        first.signal(signal.SIGTERM)  # after exit: a no-op, never a stray signal
    finally:
        spawner.kill_all()


_FAILING_TEST = """
import sys
from tests.support.wait import wait_until

def test_fails(spawn, etcd_server):
    proc = spawn.command([sys.executable, "-c", "print('child-says-%s', flush=True); "
                          "import time; time.sleep(300)"], name="chatty")
    wait_until(lambda: "child-says" in proc.log(), timeout=30)
    assert etcd_server.healthy()
    assert False, "deliberate"
"""


def test_failed_test_report_shows_log_tails(tmp_path: Path) -> None:
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(_FAILING_TEST % marker)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-p", "tests.conftest",
         "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), "-c", os.devnull],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "deliberate" in out
    assert "process chatty" in out and f"child-says-{marker}" in out, out
    assert "etcd log: last 60 lines of" in out and "fleet: starting" in out, out
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if f"child-says-{marker}" in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
