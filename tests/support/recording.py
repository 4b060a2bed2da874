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
"""

from __future__ import annotations

import json
import os
import threading
import time
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


def hang_seconds(member_id: str) -> float:
    """Seconds a call of `member_id` starting now must hang (0: none), per FLEET_TEST_HANG_DIR.

    An unreadable or malformed file (e.g. caught half-written) means no hang.
    """
    directory = os.environ.get(HANG_DIR_ENV)
    if not directory:
        return 0.0
    try:
        text = (Path(directory) / member_id.replace(os.sep, "_")).read_text(encoding="utf-8")
        return max(0.0, float(text.strip()))
    except (OSError, ValueError):
        return 0.0


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
    start: dict[str, Any] = {"ev": "start", **ids, "t": time.monotonic(), "wall": time.time()}
    if hang:
        start["hang"] = hang
    _record(ctx.member_id, start)
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
    if os.environ.get(COOPERATIVE_ENV) == "1":
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
    _record(
        ctx.member_id,
        {
            "ev": "end",
            **ids,
            "t": time.monotonic(),
            "work_end": work_end,
            "wall": time.time(),
            "commit": outcome,
            "checkpoint_read": checkpoint_read,
        },
    )
    if error is not None:
        raise error
