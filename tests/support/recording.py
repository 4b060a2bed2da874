"""A fleet handler for tests that records every call to a ledger.

Workers run it as ``handler = "tests.support.recording:handle"``. Each call appends
a ``start`` line when it begins and an ``end`` line when it finishes to
``$FLEET_TEST_LEDGER/<member_id>-<pid>.jsonl``; `tests.support.checker` then
verifies from all ledgers that no segment was ever worked on under two tokens at
once and that tokens only grow. Times are ``time.monotonic()`` (CLOCK_MONOTONIC),
one clock shared by every process on a Linux host, so intervals recorded by
different workers can be compared directly.

Environment:
    FLEET_TEST_LEDGER: directory for the ledgers (required).
    FLEET_TEST_CALL_SECONDS: how long a call works before committing (default 0.05).
    FLEET_TEST_EXIT_ON_CALL: if set, the process records the start of its first
        call and then ``os._exit(int(value))``, a crash in the middle of work.
    FLEET_TEST_EXIT_SLOT: if set (to a slot number ``i``), FLEET_TEST_EXIT_ON_CALL applies
        only in the worker whose FLEET_WORKER_INDEX (set by ``fleet up`` for slot ``i``)
        equals it; every other worker of the same ``fleet up`` works normally.
    FLEET_TEST_COOPERATIVE: if ``1``, a call works with ``ctx.stopping.wait(seconds)``
        instead of ``time.sleep(seconds)``: a well-behaved long handler that returns as
        soon as the worker tells it to stop (handoff, shutdown, or the watchdog past the
        lease deadline), then commits as before (so a fenced-out call records ``"lost"``).
    FLEET_TEST_HANG_DIR: if set and the file ``$FLEET_TEST_HANG_DIR/<member_id>`` exists when
        a call starts, the call hangs (plain ``time.sleep``, ignoring ``ctx.stopping``) for
        the number of seconds written in the file, after writing its start line (which then
        carries ``"hang": seconds``), and only then works and commits as usual: a handler
        stuck past the lease deadline, which the worker's watchdog must kill (exit 1).
    FLEET_TEST_GIL_DIR: if set and the file ``$FLEET_TEST_GIL_DIR/<member_id>`` holds the
        calling process's pid when a call starts, the call holds the GIL for good after its start line (a regular
        expression that backtracks for hours, as a C extension that never releases it
        would): the whole interpreter hangs, heartbeat and watchdog threads included, yet
        the process is running (state R), not frozen. Only a kill from outside ends it.
    FLEET_TEST_CHILD_SECONDS / FLEET_TEST_CHILD_DIR: child-process work. If the first is
        set, or the file ``$FLEET_TEST_CHILD_DIR/<member_id>`` exists (holding seconds),
        a call does its work in a subprocess (`tests/support/child_work.py`) that it
        starts and waits for; the child writes its own ledger lines (``"ev": "child"``,
        naming the call's ``"call"`` id) every 0.05 s while it works. A child outlives
        its worker if the worker dies mid-call (kill -9, the watchdog) and nobody kills
        its process group; the checker counts the child's writes as work of the call.

The class form ``tests.support.recording:Recorder`` records the same calls and also its
``on_acquire`` and ``on_release`` hooks: start and end lines with ``"kind"`` set to the
hook's name, so the checker treats a hook's run as work under its token like a call.
Hook environment:
    FLEET_TEST_HOOK_SECONDS: every hook works (plain ``time.sleep``) this long (default 0).
    FLEET_TEST_SLOW_HOOK_DIR: if the file ``$FLEET_TEST_SLOW_HOOK_DIR/<member_id>`` exists
        when a hook starts, the hook works for the seconds written in it instead (its start
        line then carries ``"slow": seconds``), deaf to ``ctx.stopping``: a slow flush or
        warm-up that a fault (kill, SIGTERM, SIGSTOP, a partition) can land in the middle of.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from fleet import SegmentContext

LEDGER_ENV = "FLEET_TEST_LEDGER"
CALL_SECONDS_ENV = "FLEET_TEST_CALL_SECONDS"
EXIT_ON_CALL_ENV = "FLEET_TEST_EXIT_ON_CALL"
COOPERATIVE_ENV = "FLEET_TEST_COOPERATIVE"
EXIT_SLOT_ENV = "FLEET_TEST_EXIT_SLOT"
HANG_DIR_ENV = "FLEET_TEST_HANG_DIR"
GIL_DIR_ENV = "FLEET_TEST_GIL_DIR"
CHILD_SECONDS_ENV = "FLEET_TEST_CHILD_SECONDS"
CHILD_DIR_ENV = "FLEET_TEST_CHILD_DIR"
HOOK_SECONDS_ENV = "FLEET_TEST_HOOK_SECONDS"
SLOW_HOOK_DIR_ENV = "FLEET_TEST_SLOW_HOOK_DIR"
CHILD_SCRIPT = Path(__file__).with_name("child_work.py")

# Segments run in parallel threads of one process: one file per (process, member),
# written line by line under one lock so lines never interleave.
_lock = threading.Lock()
_files: dict[Path, TextIO] = {}


def ledger_path(member_id: str) -> Path:
    """This process's ledger file for `member_id`."""
    directory = os.environ.get(LEDGER_ENV)
    if not directory:
        raise RuntimeError(f"{LEDGER_ENV} is not set: the recording handler needs a directory")
    safe_member = member_id.replace(os.sep, "_")
    return Path(directory) / f"{safe_member}-{os.getpid()}.jsonl"


def _record(member_id: str, record: dict[str, Any]) -> None:
    """Append one JSON line; line buffering makes it one write() the moment it is complete,
    so a process killed right after still leaves the line on disk."""
    path = ledger_path(member_id)
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with _lock:
        fh = _files.get(path)
        if fh is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = path.open("a", buffering=1, encoding="utf-8")
            _files[path] = fh
        fh.write(line)


def _trigger_seconds(env: str, member_id: str) -> float:
    """Seconds in the per-member trigger file under directory `$env` (0: no file).

    An unreadable or malformed file (e.g. caught half-written) means none.
    """
    directory = os.environ.get(env)
    if not directory:
        return 0.0
    try:
        text = (Path(directory) / member_id.replace(os.sep, "_")).read_text(encoding="utf-8")
        return max(0.0, float(text.strip()))
    except (OSError, ValueError):
        return 0.0


def hang_seconds(member_id: str) -> float:
    """Seconds a call of `member_id` starting now must hang (0: none), per FLEET_TEST_HANG_DIR."""
    return _trigger_seconds(HANG_DIR_ENV, member_id)


def holds_gil(member_id: str) -> bool:
    """Whether a call of `member_id` starting now must hold the GIL, per FLEET_TEST_GIL_DIR."""
    directory = os.environ.get(GIL_DIR_ENV)
    if not directory:
        return False
    try:
        text = (Path(directory) / member_id.replace(os.sep, "_")).read_text(encoding="utf-8")
    except OSError:
        return False
    return text.strip() == str(os.getpid())


def child_seconds(member_id: str) -> float:
    """Seconds of child-process work for a call starting now (0: work in-process)."""
    return _trigger_seconds(CHILD_DIR_ENV, member_id) or float(
        os.environ.get(CHILD_SECONDS_ENV) or 0.0
    )


def hook_seconds(member_id: str) -> tuple[float, bool]:
    """How long a hook starting now works, and whether that is a slow-hook trigger."""
    slow = _trigger_seconds(SLOW_HOOK_DIR_ENV, member_id)
    if slow:
        return slow, True
    return float(os.environ.get(HOOK_SECONDS_ENV) or 0.0), False


def _work_in_child(ids: dict[str, Any], call_id: str, seconds: float) -> int:
    """Run `seconds` of work in a child process and wait for it; its exit code.

    The child stays in our process group (no new session): whoever kills the group
    kills it, nobody else does. It writes ``<member>-<our pid>-child-<its pid>.jsonl`` in
    the ledger directory (its own file: no lock shared with us).
    """
    directory = os.environ[LEDGER_ENV]
    proc = subprocess.Popen(
        [
            sys.executable, "-I", str(CHILD_SCRIPT), directory, str(ids["member"]),
            str(ids["pid"]), call_id, str(ids["segment"]), str(ids["token"]), str(seconds),
        ],
        stdin=subprocess.DEVNULL,
        close_fds=True,
    )  # fmt: skip
    return proc.wait()


def close_ledgers() -> None:
    """Close this process's ledger files (for tests that call `handle` in-process)."""
    with _lock:
        for fh in _files.values():
            fh.close()
        _files.clear()


def handle(ctx: SegmentContext) -> None:
    """Record start, work for FLEET_TEST_CALL_SECONDS, commit checkpoint+1, record end.

    A fenced commit (LostOwnership) is recorded as ``"lost"`` and swallowed: it is
    an expected outcome the checker accounts for. Any other commit failure is
    recorded as ``"error"`` and re-raised, so the worker logs and retries it, as it
    would for a real handler.
    """
    from fleet import LostOwnership  # lazily: the handler module must import without fleet

    ids = {"segment": ctx.segment, "token": ctx.token, "member": ctx.member_id, "pid": os.getpid()}
    checkpoint_read = ctx.checkpoint
    hang = hang_seconds(ctx.member_id)
    child = child_seconds(ctx.member_id)
    start: dict[str, Any] = {"ev": "start", **ids, "t": time.monotonic(), "wall": time.time()}
    if hang:
        start["hang"] = hang
    call_id = ""
    if child:
        call_id = uuid.uuid4().hex[:16]  # unique across processes, pid reuse included
        start["call"], start["child"] = call_id, child
    _record(ctx.member_id, start)
    if holds_gil(ctx.member_id):
        close_ledgers()  # the start line must reach the file: nothing runs after this
        re.fullmatch(r"(a|aa)+b", "a" * 64)  # exponential backtracking, GIL held
    if hang:
        until = time.monotonic() + hang
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))  # stuck: deaf to ctx.stopping, only the watchdog ends it
    exit_code = os.environ.get(EXIT_ON_CALL_ENV)
    exit_slot = os.environ.get(EXIT_SLOT_ENV)
    if exit_slot and os.environ.get("FLEET_WORKER_INDEX") != exit_slot.strip():
        exit_code = None  # FLEET_TEST_EXIT_ON_CALL is meant for another slot
    if exit_code:
        os._exit(int(exit_code))
    seconds = float(os.environ.get(CALL_SECONDS_ENV) or 0.05)
    child_exit: int | None = None
    if child:
        child_exit = _work_in_child(ids, call_id, child)  # deaf to ctx.stopping, as work is
    elif os.environ.get(COOPERATIVE_ENV) == "1":
        ctx.stopping.wait(seconds)  # real work that checks whether it should stop
    else:
        time.sleep(seconds)  # looks like real work
    # The work ends here. An accepted commit lands before any new owner can exist, so
    # for a call whose commit succeeded this is the honest end of its work even if the
    # process is frozen between the commit and the end line below.
    work_end = time.monotonic()
    outcome = "ok"
    error: BaseException | None = None
    try:
        ctx.commit((checkpoint_read or 0) + 1)
    except LostOwnership:
        outcome = "lost"
    except BaseException as exc:
        outcome, error = "error", exc
    end: dict[str, Any] = {
        "ev": "end",
        **ids,
        "t": time.monotonic(),
        "work_end": work_end,
        "wall": time.time(),
        "commit": outcome,
        "checkpoint_read": checkpoint_read,
    }
    if child:
        end["call"], end["child_exit"] = call_id, child_exit
    _record(ctx.member_id, end)
    if error is not None:
        raise error


def _told_lost(ctx: SegmentContext) -> bool:
    """Does the worker say this ownership is already gone (`ctx.lost`, where it exists)?"""
    lost = getattr(ctx, "lost", False)
    if isinstance(lost, threading.Event):
        return lost.is_set()
    return bool(lost() if callable(lost) else lost)


def record_hook(kind: str, ctx: SegmentContext) -> None:
    """One hook run: a start line, its (slow) work, an end line, all with ``"kind"``.

    The work is a plain sleep, deaf to ``ctx.stopping``: only the worker (its watchdog)
    or a signal ends it early. A hook told at its start that the ownership is already
    gone (``ctx.lost``) does no work and says so (``"lost": true``); the checker leaves
    such a run out, as it leaves out a call whose commit was fenced.
    """
    ids = {"segment": ctx.segment, "token": ctx.token, "member": ctx.member_id, "pid": os.getpid()}
    seconds, slow = hook_seconds(ctx.member_id)
    lost = _told_lost(ctx)
    start: dict[str, Any] = {
        "ev": "start", "kind": kind, **ids, "t": time.monotonic(), "wall": time.time()
    }  # fmt: skip
    if slow:
        start["slow"] = seconds
    if lost:
        start["lost"] = True
    reason = getattr(ctx, "stop_reason", None)
    if reason is not None:
        start["reason"] = str(reason)
    _record(ctx.member_id, start)
    if not lost:
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
    end: dict[str, Any] = {
        "ev": "end", "kind": kind, **ids, "t": time.monotonic(), "wall": time.time(),
        "commit": None, "lost": _told_lost(ctx),
    }  # fmt: skip
    _record(ctx.member_id, end)


class Recorder:
    """The recording handler with hooks: ``handler = "tests.support.recording:Recorder"``.

    `handle` is the function above; `on_acquire` and `on_release` are recorded runs of
    `record_hook`, slow when FLEET_TEST_HOOK_SECONDS or a slow-hook trigger file says so.
    """

    def handle(self, ctx: SegmentContext) -> None:
        handle(ctx)

    def on_acquire(self, ctx: SegmentContext) -> None:
        record_hook("on_acquire", ctx)

    def on_release(self, ctx: SegmentContext) -> None:
        record_hook("on_release", ctx)
