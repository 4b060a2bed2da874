"""A class handler for the core-hardening tests: every hook and call is logged, and each
can be told (through the environment) to be slow, to hang, or to raise.

Workers run it as ``handler = "tests.support.hooks:Handler"``. Each event is one JSON
line in ``$FLEET_TEST_HOOK_LOG/<member>-<pid>.jsonl``: ``{"ev": hook, "phase": "start" |
"end", "segment", "token", "lost", "reason", "t"}`` (``t`` is ``time.monotonic()``).

Environment (all optional):
    FLEET_TEST_HOOK_LOG: directory for the logs (required).
    FLEET_TEST_SLEEP_<HOOK>: seconds a hook sleeps (plain sleep, deaf to ctx.stopping);
        <HOOK> is ON_ACQUIRE, ON_RELEASE or HANDLE.
    FLEET_TEST_SLEEP_ONCE: if set, a sleep happens once per process (the first call only).
    FLEET_TEST_RAISE_<HOOK>: an exception name (SystemExit, KeyboardInterrupt, ValueError,
        LostOwnership) the hook raises on its first N calls per segment, N given as
        ``Name:N`` (default 1).
    FLEET_TEST_STDERR_FLOOD: bytes on_acquire writes to stderr (to fill a pipe nobody reads).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_raised: Counter[tuple[str, int]] = Counter()
_slept: set[str] = set()


def _log(ctx: Any, ev: str, phase: str) -> None:
    directory = Path(os.environ["FLEET_TEST_HOOK_LOG"])
    line = json.dumps(
        {
            "ev": ev,
            "phase": phase,
            "segment": ctx.segment,
            "token": ctx.token,
            "member": ctx.member_id,
            "pid": os.getpid(),
            "lost": bool(getattr(ctx, "lost", False)),
            "reason": getattr(ctx, "stop_reason", None),
            "t": time.monotonic(),
        }
    )
    with _lock, (directory / f"{ctx.member_id}-{os.getpid()}.jsonl").open("a") as fh:
        fh.write(line + "\n")


def _behave(ctx: Any, ev: str) -> None:
    key = ev.upper()
    raise_spec = os.environ.get(f"FLEET_TEST_RAISE_{key}")
    if raise_spec:
        name, _, count = raise_spec.partition(":")
        with _lock:
            _raised[(ev, ctx.segment)] += 1
            due = _raised[(ev, ctx.segment)] <= int(count or 1)
        if due:
            _log(ctx, ev, "raise")
            if name == "LostOwnership":
                from fleet import LostOwnership

                raise LostOwnership("the handler says so")
            raise {"SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt}.get(
                name, ValueError
            )(f"raised by the test handler in {ev}")
    seconds = float(os.environ.get(f"FLEET_TEST_SLEEP_{key}") or 0)
    if seconds:
        with _lock:
            once = bool(os.environ.get("FLEET_TEST_SLEEP_ONCE"))
            skip = once and ev in _slept
            _slept.add(ev)
        if not skip:
            time.sleep(seconds)


class Handler:
    def on_acquire(self, ctx: Any) -> None:
        _log(ctx, "on_acquire", "start")
        flood = int(os.environ.get("FLEET_TEST_STDERR_FLOOD") or 0)
        if flood:
            sys.stderr.write("x" * flood)
            sys.stderr.flush()
        _behave(ctx, "on_acquire")
        _log(ctx, "on_acquire", "end")

    def handle(self, ctx: Any) -> None:
        _log(ctx, "handle", "start")
        _behave(ctx, "handle")
        ctx.commit({"at": time.time()})
        _log(ctx, "handle", "end")

    def on_release(self, ctx: Any) -> None:
        _log(ctx, "on_release", "start")
        _behave(ctx, "on_release")
        _log(ctx, "on_release", "end")


def read(directory: Path) -> list[dict[str, Any]]:
    """Every event logged under `directory`, in time order."""
    events = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
    return sorted(events, key=lambda e: e["t"])
