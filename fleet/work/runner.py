"""Running one owned segment: its user code, always inside the fence.

A `SegmentRunner` is one owned segment, run in steps by the worker's `Scheduler`
(scheduler.py): a bounded pool of threads, so a worker's thread count does not grow with
what it owns (issue 9). Calls are serial within a segment (the scheduler never runs one
runner in two threads) and parallel across segments, up to `concurrency` at once. A step
is one phase: acquire (one `on_acquire`; backoff on failure), handle (one `handle`, then
due again after the interval or the backoff), finish (`ctx.stopping`, `on_release`, give
the segment back, post `RunnerExited`). `stop()` wakes a runner that waits for its
interval, so a handoff never waits one out.

Every piece of user code it runs (`on_acquire`, each `handle`, `on_release`) goes
through `_call`, which marks the call as started *before* its final `session.alive()`
check: from that instant the watchdog (watchdog.py) sees the call, so no user code can
start after the deadline unseen, however long the thread was paused between the check
and the call.

Semantics a handler can rely on:
- `on_acquire` succeeds before the first `handle`; if it raises it is retried with the
  same backoff as a failing `handle`, and no `handle` runs until it succeeds.
- `on_release` runs once after the last `handle` of an ownership whose `on_acquire`
  succeeded, and only while the ownership is still provable (a handoff or a graceful
  stop). When the ownership is already gone (lease lost, fenced out, owner key deleted)
  it is not called: no user code runs without ownership. `ctx.lost` and
  `ctx.stop_reason == "lost"` tell a call that is still running.
- A handler that raises (anything, `SystemExit` and `KeyboardInterrupt` included) has
  failed that call: it is logged and retried with backoff. `LostOwnership` raised while
  etcd still lists us as owner is the handler's verdict, not etcd's: it backs off like
  any failure; the worker stops the segment when etcd says the ownership is gone.
- The runner always reports its exit (`RunnerExited`), whatever the handler did.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet import clock
from fleet.coord import ownership
from fleet.coord.etcd import Etcd, EtcdError, EtcdNoSpace, retry
from fleet.coord.health import error_text
from fleet.coord.keys import Keys
from fleet.coord.session import Session
from fleet.handler import Handler, LostOwnership, SegmentContext
from fleet.work.backpressure import Backpressure
from fleet.work.callstats import CallStats
from fleet.work.health import CallHealth
from fleet.work.scheduler import Scheduler

log = logging.getLogger("fleet.work.runner")

MAX_BACKOFF = 30.0
RELEASE_PATIENCE = 2.0


@dataclass(frozen=True)
class RunnerExited:
    """Posted to the worker's queue when a runner is done with its segment."""

    segment: int
    token: int
    released: bool


class Outcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    NOT_RUN = "not run"  # the session was no longer alive at the final check


def decode_checkpoint(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class SegmentRunner:
    """One ownership of one segment, stepped by the worker's scheduler (see above)."""

    def __init__(
        self,
        *,
        segment: int,
        acquired: ownership.Acquired,
        member_id: str,
        handler: Handler,
        interval: float,
        session: Session,
        etcd: Etcd,
        keys: Keys,
        post: Callable[[object], None],
        scheduler: Scheduler,
        call_stats: CallStats | None = None,
        pressure: Backpressure | None = None,
    ) -> None:
        self.segment = segment
        self.token = acquired.token
        self.handler = handler
        self.interval = interval
        self.session = session
        self.etcd = etcd
        self.keys = keys
        self.post = post
        self.scheduler = scheduler
        self.call_stats = call_stats  # every handle's duration and outcome (not NOT_RUN)
        self.pressure = pressure  # fed every commit's round trip; stretches the interval
        # Set before the final alive() check of every user call, cleared after it: what
        # the watchdog watches. (name, start) so it can say which hook hung. Written by
        # whichever pool thread steps the runner (one at a time).
        self.call_started: float | None = None
        self.call_name = ""
        self.release_on_exit = False
        self.failures = 0  # failed calls in a row, for the backoff (reset after on_acquire)
        self.last_error: str | None = None
        # Errors in a row, total errors, last error, last success, failing since: read by
        # the worker's main loop (heartbeat, the health key in etcd), so behind a lock.
        self.health = CallHealth(segment)
        self._checkpoint_revision = acquired.checkpoint_revision
        self._stop = threading.Event()
        self._finished = threading.Event()  # RunnerExited posted: no step will run again
        self._acquired = False  # on_acquire succeeded: handle may run, on_release is owed
        self._released = False
        self._told_lost_ownership = False
        self.ctx = SegmentContext(
            segment=segment,
            token=self.token,
            member_id=member_id,
            checkpoint=decode_checkpoint(acquired.checkpoint),
            stopping=threading.Event(),
            _commit=self._commit,
            _deadline=lambda: session.deadline,
        )

    @property
    def active(self) -> bool:
        """Not finished yet: a call may still run, or a step is still to come."""
        return not self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the runner has finished (RunnerExited posted); False on timeout."""
        return self._finished.wait(timeout)

    def _commit(self, value: bytes) -> bool:
        """A fenced commit that rides out etcd failovers until the lease deadline.

        Guarded by the token and by the checkpoint revision this ownership last saw, so
        a late-applied earlier attempt cannot roll the checkpoint back. Once the segment
        is being stopped, one failed attempt is final: a stop must not hang on an etcd
        that is gone.
        """
        guard = self._checkpoint_revision
        session = self.session

        def attempt() -> int | None:
            # Never wait on etcd past the deadline: the call must be able to return
            # (fenced out) before the watchdog has to kill the process for it.
            sent = clock.now()
            try:
                return ownership.commit(
                    self.etcd,
                    self.keys,
                    self.segment,
                    self.token,
                    value,
                    guard,
                    timeout=session.deadline - sent,
                )
            finally:
                if self.pressure is not None:
                    self.pressure.observe(clock.now() - sent)

        try:
            revision = retry(
                attempt,
                until=self.session.deadline,
                what=f"commit of segment {self.segment}",
                stop=self._stop,
            )
        except EtcdError as exc:
            # NOSPACE has its one clear line from the client already; per segment it
            # would only repeat it.
            level = logging.DEBUG if isinstance(exc, EtcdNoSpace) else logging.WARNING
            log.log(
                level, "segment %d: commit failed until the lease deadline: %s", self.segment, exc
            )
            return False
        if revision is None:
            self._mark_lost()
            return False
        self._checkpoint_revision = revision
        return True

    def stop(self, release: bool, lost: bool = False) -> None:
        """Ask the runner to finish; with `release`, give the segment back once idle;
        with `lost`, the ownership is already gone (on_release will not run)."""
        self.release_on_exit = self.release_on_exit or release
        if lost:
            self._mark_lost()
        elif self.ctx.stop_reason is None:
            self.ctx.stop_reason = "handoff" if release else "shutdown"
        self.ctx.stopping.set()
        self._stop.set()
        # Due now, not after its interval: a handoff must not wait one out.
        self.scheduler.wake(self)

    def _mark_lost(self) -> None:
        self.ctx.stop_reason = "lost"
        self.ctx._lost.set()
        self.ctx.stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- user code --------------------------------------------------------------------------

    def _call(self, name: str, hook: Callable[[SegmentContext], Any]) -> Outcome:
        """Run one piece of user code inside the fence, watched by the watchdog."""
        self.call_name = name
        self.call_started = clock.now()
        try:
            if not self.session.alive() or self.ctx.lost:
                return Outcome.NOT_RUN
            hook(self.ctx)
            self.last_error = None
            if name == "handle":  # a hook that works is no sign the segment does
                self.health.succeeded()
            return Outcome.OK
        except LostOwnership as exc:
            if not self._told_lost_ownership and not self.ctx.lost:
                self._told_lost_ownership = True
                log.warning(
                    "segment %d: %s raised LostOwnership while etcd still lists token %d as "
                    "the owner: treated as a failure (backing off); the segment is stopped "
                    "when etcd says the ownership is gone",
                    self.segment,
                    name,
                    self.token,
                )
            self.last_error = error_text(exc, name)
            self.health.failed(self.last_error)
            return Outcome.FAILED
        except BaseException as exc:  # noqa: BLE001 - user code: SystemExit is a failure too
            error = error_text(exc, name)
            self._log_failure(name, error, repeated=error == self.last_error)
            self.last_error = error
            self.health.failed(self.last_error)
            return Outcome.FAILED
        finally:
            self.call_started = None

    def _log_failure(self, name: str, error: str, *, repeated: bool) -> None:
        """The traceback of a failure that is news (the first in a row, or a new error);
        a repeat only at 2, 4, 8... in a row, as one line: a segment failing every call
        must not flood the terminal (its errors are counted in the summary line, and
        `fleet ps`/`fleet status` show the last one)."""
        in_a_row = self.failures + 1
        if not repeated or in_a_row == 1:
            log.exception("segment %d: %s raised", self.segment, name)
        elif in_a_row & (in_a_row - 1) == 0:
            log.warning(
                "segment %d: %s failed %d times in a row: %s", self.segment, name, in_a_row, error
            )
        else:
            log.debug("segment %d: %s raised (%d in a row)", self.segment, name, in_a_row)

    def _pause_after(self, outcome: Outcome) -> float:
        """The interval after a good call (stretched while etcd is slow, see
        backpressure.py); exponential backoff after failures."""
        self.failures = 0 if outcome is Outcome.OK else self.failures + 1
        pause = self.interval
        if self.pressure is not None:
            pause *= self.pressure.stretch()
        if self.failures:
            pause = min(MAX_BACKOFF, max(self.interval, 0.5) * 2 ** (self.failures - 1))
            log.debug(
                "segment %d: retrying in %.1fs (failure %d)", self.segment, pause, self.failures
            )
        return pause

    def _keep_going(self) -> bool:
        return not self._stop.is_set() and not self.ctx.lost and self.session.alive()

    # -- steps (one pool thread at a time) ------------------------------------------------

    def step(self) -> float | None:
        """One phase (see the module docstring); when the runner is next due, or None
        once finished. RunnerExited is posted whatever happens, exactly once."""
        if self._finished.is_set():
            return None
        finished = True
        try:
            pause = self._advance()
            if pause is not None:
                finished = False
                return clock.now() + pause
            self.ctx.stopping.set()
            if self._acquired:
                self._release_hook()
            self._released = self._give_back()
            return None
        finally:
            if finished:
                self._finished.set()
                self.post(RunnerExited(self.segment, self.token, self._released))

    def _advance(self) -> float | None:
        """One on_acquire or one handle; the pause before the next step, None to finish."""
        if not self._keep_going():
            return None
        if not self._acquired:
            outcome = self._call("on_acquire", self.handler.on_acquire)
            if outcome is Outcome.OK:
                self._acquired = True
                self.failures = 0
                return 0.0  # the first handle, right away
            if outcome is Outcome.NOT_RUN:
                return None
            return self._pause_after(outcome)
        started = clock.now()
        outcome = self._call("handle", self.handler.handle)
        if outcome is not Outcome.NOT_RUN and self.call_stats is not None:
            self.call_stats.record(clock.now() - started, ok=outcome is Outcome.OK)
        if outcome is Outcome.NOT_RUN or self._stop.is_set():
            return None
        return self._pause_after(outcome)

    def _release_hook(self) -> None:
        if self.ctx.lost or not self.session.alive():
            self._mark_lost()
            log.warning(
                "segment %d: ownership (token %d) already gone: on_release not called",
                self.segment,
                self.token,
            )
            return
        self._call("on_release", self.handler.on_release)

    def _give_back(self) -> bool:
        if not self.release_on_exit or self.ctx.lost or not self.session.alive():
            return False
        try:
            return retry(
                lambda: ownership.release(
                    self.etcd, self.keys, self.segment, self.ctx.member_id, self.token
                ),
                # Short: if etcd is gone (say, with a dead supervisor) the lease expiry
                # frees the segment anyway; a stop must not hang on it. A release that
                # fails while the lease lives is retried by the worker's reconcile.
                until=min(self.session.deadline, clock.now() + RELEASE_PATIENCE),
                what=f"release of segment {self.segment}",
            )
        except EtcdError as exc:
            log.warning("segment %d: release failed: %s (retried later)", self.segment, exc)
            return False
