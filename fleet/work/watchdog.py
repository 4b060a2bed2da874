"""The watchdog: the process exits when user code runs where it may no longer run.

A Python thread cannot be killed, so when a call (`handle`, `on_acquire` or
`on_release`) is still running past the lease deadline, the only way to make sure it
does no more work on a segment someone else may own by now is to end the process.
Only time the watchdog was awake to see counts toward the grace (half the safety
margin), so a process that was frozen (SIGSTOP, VM pause) gives a call that already
finished its work the chance to return, fenced, instead of being killed mid-return; a
call that hangs while the process runs is killed before the lease can expire on the
server.

With `handler_timeout` set, a call running longer than that is a hang even while the
lease is healthy (gunicorn's worker timeout, for the same reason): every thread's stack
goes to stderr (faulthandler) and the process exits, so its supervisor replaces it.

Leaving must never block: stderr may be a full pipe and a logging handler's lock may be
held by the very thread that hung, so the last words are one non-blocking `os.write`
and then `os._exit`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from fleet import clock

EXIT_OVERDUE = 1  # a call ran past handler_timeout: the handler's fault, a crash
# The lease is gone with a call still running (etcd was slow, or the process was paused):
# the exit keeps user code from running without ownership, but says nothing bad about the
# worker, so its supervisor respawns it without counting a crash (DESIGN.md, exit codes).
EXIT_LEASE_LOST = 4


class Watched(Protocol):
    """What the watchdog reads of a segment runner (set and cleared by its thread)."""

    segment: int
    call_started: float | None
    call_name: str

    @property
    def session(self) -> _Session: ...

    def stop(self, release: bool, lost: bool = False) -> None: ...


class _Session(Protocol):
    @property
    def deadline(self) -> float: ...

    margin: float


def die(message: str, *, stacks: bool = False, code: int = EXIT_OVERDUE) -> None:
    """Write one line (and, with `stacks`, every thread's stack) without ever blocking,
    then exit the process at once."""
    with contextlib.suppress(OSError):
        os.set_blocking(2, False)
    with contextlib.suppress(OSError):
        os.write(2, (message.rstrip("\n") + "\n").encode(errors="replace"))
    if stacks:
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=2, all_threads=True)
    os._exit(code)


class Watchdog:
    TICK = 0.05

    def __init__(
        self,
        runners: Callable[[], Sequence[Watched]],
        *,
        handler_timeout: float = 0.0,
        now: Callable[[], float] = clock.now,
        exit: Callable[..., None] = die,
    ) -> None:
        self._runners = runners
        self._handler_timeout = handler_timeout
        self._now = now
        self._exit = exit
        self._overdue: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last = self._now()
        while not self._stop.wait(self.TICK):
            try:
                now = self._now()
                awake = min(now - last, 2 * self.TICK)
                last = now
                self.check(now, awake)
            except Exception as exc:  # noqa: BLE001 - a watchdog that dies guards nothing
                self._exit(f"fleet: watchdog failed ({type(exc).__name__}: {exc}): exiting")
                return

    def check(self, now: float, awake: float) -> None:
        """One look at every running call (the watchdog thread's tick)."""
        seen = set()
        for runner in self._runners():
            started = runner.call_started
            if started is None:
                continue
            timeout = self._handler_timeout
            if timeout and now - started > timeout:
                self._exit(
                    f"fleet: segment {runner.segment}: {runner.call_name} has run "
                    f"{now - started:.1f}s > handler_timeout {timeout:g}s: exiting so that "
                    "the supervisor replaces this worker (stacks follow)",
                    stacks=True,
                )
                return
            session = runner.session
            if now < session.deadline:
                continue
            key = (runner.segment, started)
            seen.add(key)
            runner.stop(release=False, lost=True)
            overdue = self._overdue.get(key, 0.0) + awake
            self._overdue[key] = overdue
            if overdue >= session.margin / 2:
                self._exit(
                    f"fleet: segment {runner.segment}: {runner.call_name} still running "
                    f"{now - session.deadline:.1f}s past the lease deadline; exiting so "
                    "that no call runs without ownership",
                    code=EXIT_LEASE_LOST,
                )
                return
        self._overdue = {k: v for k, v in self._overdue.items() if k in seen}
