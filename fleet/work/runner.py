"""Running one owned segment, and the watchdog that kills calls nobody may still make.

A `SegmentRunner` is one thread per owned segment: calls are serial within a segment
and parallel across segments. It never starts a call past the session deadline. When
told to stop it lets the running call finish, runs `on_release`, gives the segment back
if asked (release-before-acquire is the handoff) and reports that it has exited.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet.coord import ownership
from fleet.coord.etcd import Etcd, EtcdError, retry
from fleet.coord.keys import Keys
from fleet.coord.session import Session
from fleet.handler import Handler, LostOwnership, SegmentContext

log = logging.getLogger("fleet.work.runner")

MAX_BACKOFF = 30.0
RELEASE_PATIENCE = 2.0


@dataclass(frozen=True)
class RunnerExited:
    """Posted to the worker's queue when a runner thread is done with its segment."""

    segment: int
    token: int
    released: bool


def decode_checkpoint(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class SegmentRunner:
    def __init__(
        self,
        *,
        segment: int,
        token: int,
        checkpoint: bytes | None,
        member_id: str,
        handler: Handler,
        interval: float,
        session: Session,
        etcd: Etcd,
        keys: Keys,
        post: Callable[[object], None],
    ) -> None:
        self.segment = segment
        self.token = token
        self.handler = handler
        self.interval = interval
        self.session = session
        self.etcd = etcd
        self.keys = keys
        self.post = post
        self.call_started: float | None = None
        self.release_on_exit = False
        self._stop = threading.Event()
        self.ctx = SegmentContext(
            segment=segment,
            token=token,
            member_id=member_id,
            checkpoint=decode_checkpoint(checkpoint),
            stopping=threading.Event(),
            _commit=self._commit,
            _deadline=lambda: session.deadline,
        )
        self.thread = threading.Thread(target=self._run, name=f"fleet-seg-{segment}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _commit(self, value: bytes) -> bool:
        """A fenced commit that rides out etcd failovers until the lease deadline.

        Once the segment is being stopped, one failed attempt is final: a stop must not
        hang on an etcd that is gone.
        """
        try:
            return retry(
                lambda: ownership.commit(self.etcd, self.keys, self.segment, self.token, value),
                until=self.session.deadline,
                what=f"commit of segment {self.segment}",
                stop=self._stop,
            )
        except EtcdError as exc:
            log.warning("segment %d: commit failed until the lease deadline: %s", self.segment, exc)
            return False

    def stop(self, release: bool) -> None:
        """Ask the runner to finish; with `release`, give the segment back once idle."""
        self.release_on_exit = self.release_on_exit or release
        self.ctx.stopping.set()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _hook(self, name: str, hook: Callable[[SegmentContext], Any]) -> bool:
        try:
            hook(self.ctx)
            return True
        except LostOwnership:
            log.warning("segment %d: %s: ownership lost (token %d)", self.segment, name, self.token)
            self._stop.set()
            return False
        except Exception:
            log.exception("segment %d: %s raised", self.segment, name)
            return False

    def _run(self) -> None:
        failures = 0
        self._hook("on_acquire", self.handler.on_acquire)
        while not self._stop.is_set() and self.session.alive():
            self.call_started = time.monotonic()
            ok = self._hook("handle", self.handler.handle)
            self.call_started = None
            if self._stop.is_set():
                break
            failures = 0 if ok else failures + 1
            pause = self.interval
            if failures:
                pause = min(MAX_BACKOFF, max(self.interval, 0.5) * 2 ** (failures - 1))
                log.info(
                    "segment %d: retrying in %.1fs (failure %d)", self.segment, pause, failures
                )
            self._stop.wait(pause)
        self.ctx.stopping.set()
        self._hook("on_release", self.handler.on_release)
        released = False
        if self.release_on_exit and self.session.alive():
            try:
                released = retry(
                    lambda: ownership.release(
                        self.etcd, self.keys, self.segment, self.ctx.member_id, self.token
                    ),
                    # Short: if etcd is gone (say, with a dead supervisor) the lease
                    # expiry frees the segment anyway; a stop must not hang on it.
                    until=min(self.session.deadline, time.monotonic() + RELEASE_PATIENCE),
                    what=f"release of segment {self.segment}",
                )
            except EtcdError as exc:
                log.warning(
                    "segment %d: release failed: %s (lease expiry frees it)", self.segment, exc
                )
        self.post(RunnerExited(self.segment, self.token, released))


class Watchdog:
    """Exits the process when a handler call is still running past the lease deadline.

    A Python thread cannot be killed, and a call that runs past the deadline may be
    working on a segment that someone else now owns: the process must stop. Only time
    the watchdog was awake to see counts toward the grace (half the safety margin), so a
    process that was frozen (SIGSTOP, VM pause) gives a call that already finished its
    work the chance to return, fenced, instead of being killed mid-return; a call that
    hangs while the process runs is killed before the lease can expire on the server.
    """

    TICK = 0.05

    def __init__(self, runners: Callable[[], list[SegmentRunner]]) -> None:
        self._runners = runners
        self._overdue: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.TICK):
            now = time.monotonic()
            awake = min(now - last, 2 * self.TICK)
            last = now
            seen = set()
            for runner in self._runners():
                session = runner.session
                started = runner.call_started
                if started is None or now < session.deadline:
                    continue
                key = (runner.segment, started)
                seen.add(key)
                runner.ctx.stopping.set()
                overdue = self._overdue.get(key, 0.0) + awake
                self._overdue[key] = overdue
                if overdue >= session.margin / 2:
                    log.critical(
                        "segment %d: handler still running %.1fs past the lease deadline; "
                        "exiting so that no call runs without ownership",
                        runner.segment,
                        now - session.deadline,
                    )
                    logging.shutdown()
                    os._exit(1)
            self._overdue = {k: v for k, v in self._overdue.items() if k in seen}
