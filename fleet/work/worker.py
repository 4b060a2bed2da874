"""One worker process: the incarnations of its membership, and the watchdog over them.

The main thread runs one loop over a queue fed by the watch, the session, the segment
runners and the signal handlers, so all decisions are made in one place, in order,
against a view that is never behind what was already acted on (incarnation.py). Each
session (lease) is one `Incarnation`; when the lease is lost everything it held is
dropped and a new incarnation starts from registration. The runners of every
incarnation are stepped by one `Scheduler` (at most `concurrency` call threads, however
many segments the worker owns). The watchdog watches every runner of every incarnation,
including those abandoned with a call still running, for as long as any of them is
active.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

from fleet import __version__, clock
from fleet.config import Config
from fleet.coord import membership
from fleet.coord.etcd import Etcd, EtcdUnavailable, connect, retry
from fleet.coord.keys import Keys
from fleet.coord.session import Session
from fleet.handler import Handler
from fleet.supervise.childlink import ParentLink
from fleet.work import pacing
from fleet.work.backpressure import Backpressure, slow_after
from fleet.work.callstats import CallStats
from fleet.work.incarnation import Incarnation, Restart, Signal
from fleet.work.runner import SegmentRunner
from fleet.work.scheduler import Scheduler
from fleet.work.watchdog import Watchdog

log = logging.getLogger("fleet.work.worker")

__all__ = ["Restart", "Worker"]


class Worker:
    """Composes the parts; `run()` returns the process exit code."""

    def __init__(
        self, config: Config, handler: Handler, member_id: str, *, segments_explicit: bool
    ) -> None:
        self.config = config
        self.handler = handler
        self.member_id = member_id
        self.segments_explicit = segments_explicit
        self.keys = Keys(config.etcd.prefix, config.name)
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.stopping = False
        self.etcd: Etcd | None = None
        self.session: Session | None = None
        # Written by the main thread, read by the watchdog thread: both under _lock.
        self._lock = threading.Lock()
        self.runners: dict[int, SegmentRunner] = {}
        # Runners we stopped waiting for whose call may still be running: the watchdog
        # keeps watching them until they finish.
        self._zombies: list[SegmentRunner] = []
        # Every lease this process held: a member key still bound to one of them is ours.
        self.past_leases: set[int] = set()
        self.joined_once = False
        self.segments = config.segments
        self.link = ParentLink.from_env()
        # Every `handle` call of every runner, for the periodic summary line.
        self.call_stats = CallStats()
        # The call threads of every incarnation's runners (started lazily, so a Worker
        # that never runs has none); stopped when run() returns.
        self.scheduler = Scheduler(config.concurrency)
        # etcd round trips (commits, keepalives) of every incarnation: a slow etcd
        # stretches the call interval of every runner (backpressure.py).
        self.pressure = Backpressure(slow_after(config.lease_ttl))

    # -- entry ----------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        etcd = self.etcd = connect(self.config.etcd)
        watchdog = Watchdog(self.watched, handler_timeout=self.config.handler_timeout)
        watchdog.start()
        try:
            adopted = retry(
                lambda: membership.ensure_spec(
                    etcd, self.keys, self.config.segments, self.segments_explicit
                ),
                until=clock.now() + max(3.0, etcd.timeout),
                what="reading the fleet spec",
            )
            self.segments = adopted.segments
            if adopted.warning:
                log.warning("%s", adopted.warning)
            delay = 0.2
            while not self.stopping:
                try:
                    Incarnation(self, etcd).run()
                    delay = 0.2
                except Restart as why:
                    log.warning("starting over with a new lease: %s", why)
                except EtcdUnavailable as exc:
                    # Once a member of the fleet, an etcd outage is something to outlast,
                    # not a reason to exit: keep trying until etcd is back or we are told
                    # to stop.
                    log.warning("cannot rejoin yet: %s", exc)
                    delay = min(delay * 2, 5.0)
                if not self.stopping:
                    # Jittered: members that lost their leases together (etcd was slow)
                    # must not rejoin together and bring the load straight back.
                    self._pause(pacing.jittered(delay))
            return 0
        finally:
            # The watchdog must outlive every runner thread: with a call still running
            # (an exception escaped, or a call ignored its stop) it keeps watching until
            # the process exits, which `fleet worker` always does through os._exit.
            zombies = bool(self.watched())
            if not zombies:
                watchdog.stop()
            # A call still running keeps its pool thread: do not wait for it.
            self.scheduler.stop(timeout=0.0 if zombies else 1.0)
            etcd.close()

    def _pause(self, seconds: float) -> None:
        """Wait between incarnations; drop what the old one left queued, keep signals.

        Heartbeats go on meanwhile: a worker outlasting an etcd outage is alive, and a
        supervisor that heard nothing from it would kill it."""
        until = clock.now() + seconds
        while True:
            self.beat_rejoining()
            try:
                item = self.queue.get(timeout=max(0.0, min(1.0, until - clock.now())))
            except queue.Empty:
                if clock.now() >= until:
                    return
                continue
            if isinstance(item, Signal):
                log.info("%s: stopping", signal.Signals(item.signum).name)
                self.stopping = True
                return

    def adopt_segments(self, segments: int | None) -> None:
        """Take the count the fleet spec now has (`fleet resize`), read from the view in
        the main loop: from the next decision on, segments at or above it are released
        and never acquired, and a leader assigns exactly `0..segments-1`. None (no
        readable spec in the view) keeps what we have."""
        if segments is None or segments == self.segments:
            return
        log.info("fleet %r resized: %d -> %d segments", self.config.name, self.segments, segments)
        self.segments = segments

    def beat_rejoining(self) -> None:
        if self.link is not None:
            self.link.heartbeat(
                owned=0,
                assigned=0,
                in_assignment=False,
                leader=None,
                segments=self.segments,
                rejoining=True,
            )

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # SimpleQueue.put is reentrant, so it is safe in a signal handler.
        self.queue.put(Signal(signum))

    # -- runners (shared with the watchdog thread) -------------------------------------

    def watched(self) -> list[SegmentRunner]:
        with self._lock:
            self._zombies = [r for r in self._zombies if r.active]
            return [*self.runners.values(), *self._zombies]

    def adopt_runner(self, segment: int, runner: SegmentRunner) -> None:
        with self._lock:
            self.runners[segment] = runner

    def forget_runner(self, segment: int) -> None:
        with self._lock:
            self.runners.pop(segment, None)

    def abandon_runners(self) -> int:
        """Stop tracking every runner; those not finished yet stay watched.
        Returns how many are not finished."""
        with self._lock:
            alive = [r for r in self.runners.values() if r.active]
            self._zombies.extend(alive)
            self.runners.clear()
            return len(alive)

    def exit_now(self, code: int) -> None:
        """Leave at once (a second Ctrl-C): no interpreter teardown to hang on."""
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)

    def member_info(self, lease_id: int) -> dict[str, Any]:
        slot = os.environ.get("FLEET_WORKER_INDEX")
        return {
            "id": self.member_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slot": int(slot) if slot and slot.isdigit() else None,
            "lease": lease_id,
            "started": time.time(),
            "version": __version__,
            "weight": self.config.weight,
        }
