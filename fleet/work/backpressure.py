"""Backpressure from etcd latency: a slow etcd stretches the call interval (issue 11).

Every checkpoint commit and every keepalive is a round trip to etcd. When etcd falls
behind (a disk stall, a compaction, a burst of commits from a fleet that asks for more
than it can apply), those round trips grow from milliseconds to seconds; a fleet that
keeps writing at the same rate only deepens the queue, until keepalives miss their
deadline and every lease is lost at once: a restart storm that brings the load straight
back. So each worker sheds load instead: it measures the round trips, and while their
p99 over a short window is above `slow_after(ttl)` it stretches the interval between
calls, which cuts its commits by the same factor (each call commits at most once).

The stretch is AIMD, as TCP's window is: additive increase while etcd is slow
(+`STEP` per window, up to `MAX_STRETCH`), multiplicative decrease back (halved per
healthy window, to 1). A brief stall costs a little throughput; a sustained one backs
the fleet off within seconds; recovery is quick but not a stampede.

Commits are not deferred or coalesced behind the handler's back: `ctx.commit()`
returning True promises the checkpoint is in etcd, and handlers ack upstream on it.
Stretching the interval is what lowers the write rate.

`next_stretch` is the pure rule; `Backpressure` is the thread-safe state one worker's
runners and its session feed, with one log line when shedding starts and one when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from fleet import clock

log = logging.getLogger("fleet.work.backpressure")

WINDOW = 2.0  # seconds of round trips judged together
MIN_SAMPLES = 3  # fewer round trips than this in a window: judge on the next one
STEP = 0.5  # additive increase of the stretch per slow window
MAX_STRETCH = 8.0  # at most this many times the configured interval
SLOW_AFTER_MAX = 0.5  # seconds of p99 round trip that count as "etcd is slow"


def slow_after(ttl: float) -> float:
    """The p99 round trip above which a worker sheds load: 0.5 s, less for a short TTL.

    A keepalive is due every TTL/3 and the lease is at risk once a round trip nears
    TTL - TTL/3 - margin; shedding starts well before that, at TTL/6."""
    return min(SLOW_AFTER_MAX, ttl / 6)


def next_stretch(stretch: float, p99: float, threshold: float) -> float:
    """The stretch after a window whose p99 round trip was `p99` (pure AIMD)."""
    if p99 > threshold:
        return min(MAX_STRETCH, stretch + STEP)
    halved = stretch / 2
    return 1.0 if halved < 1.0 + STEP / 2 else halved


def p99_of(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@dataclass(frozen=True)
class Shedding:
    """What a worker reports while it sheds load (heartbeat, `fleet status`)."""

    stretch: float  # the interval is multiplied by this
    p99: float  # seconds: the round trip of the last window judged
    since: float  # time.time() when shedding started


class Backpressure:
    """One worker's stretch factor, fed with etcd round trips from many threads."""

    def __init__(
        self, threshold: float, *, window: float = WINDOW, now: float | None = None
    ) -> None:
        self.threshold = threshold
        self.window = window
        self._lock = threading.Lock()
        self._samples: list[float] = []
        self._window_start = clock.now() if now is None else now
        self._stretch = 1.0
        self._last_p99 = 0.0
        self._since_mono = 0.0
        self._since_wall = 0.0
        self._peak = 1.0

    def observe(self, seconds: float, now: float | None = None) -> None:
        """One round trip to etcd (a commit attempt, a keepalive), successful or not."""
        now = clock.now() if now is None else now
        with self._lock:
            self._samples.append(seconds)
            self._judge(now)

    def stretch(self, now: float | None = None) -> float:
        """The factor to multiply the interval by (1.0 while etcd keeps up)."""
        now = clock.now() if now is None else now
        with self._lock:
            self._judge(now)
            return self._stretch

    def shedding(self) -> Shedding | None:
        with self._lock:
            if self._stretch <= 1.0:
                return None
            return Shedding(self._stretch, self._last_p99, self._since_wall)

    def _judge(self, now: float) -> None:
        if now < self._window_start + self.window:
            return
        if len(self._samples) < MIN_SAMPLES and self._stretch <= 1.0:
            return  # too little to start shedding on: judge once there are more
        samples, self._samples = self._samples, []
        self._window_start = now
        if not samples:
            return  # while shedding, silence (calls stuck in etcd) is no sign of health
        p99 = p99_of(samples)
        before = self._stretch
        self._stretch = next_stretch(before, p99, self.threshold)
        self._last_p99 = p99
        if before <= 1.0 < self._stretch:
            self._since_mono = now
            self._since_wall = time.time()
            self._peak = self._stretch
            log.warning(
                "etcd is slow (round trip p99 %d ms over %.1fs, above %d ms): shedding load, "
                "calls spaced %.1fx the interval until it recovers",
                p99 * 1000,
                self.window,
                self.threshold * 1000,
                self._stretch,
            )
        elif self._stretch > 1.0:
            self._peak = max(self._peak, self._stretch)
        elif before > 1.0:
            log.info(
                "etcd keeps up again (round trip p99 %d ms): back to the configured interval "
                "after %.0fs of shedding load (at most %.1fx)",
                p99 * 1000,
                now - self._since_mono,
                self._peak,
            )
