"""How a worker tracks and reports its failing segments.

`CallHealth` is one segment's record: written by its runner thread after every call,
read by the worker's main loop (heartbeat, etcd), hence the lock. `due` is the pure
rate limit of the etcd write, `HealthPublisher` carries it out from the main loop.

The rate limit exists because failures are per call: a fleet of 1,024 segments failing
every second must not become 1,024 etcd writes a second. A worker writes its key
(fleet/coord/health.py) when the *set* of failing segments changed, or every `REFRESH`
seconds while something fails (fresh counts), and never twice within `MIN_GAP`; after a
failed write it waits `REFRESH`. A worker with nothing failing, that never had, never
writes at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from fleet import clock
from fleet.coord import health as coord_health
from fleet.coord.etcd import Etcd, EtcdError
from fleet.coord.health import Failing
from fleet.coord.keys import Keys
from fleet.work.backpressure import Shedding

log = logging.getLogger("fleet.work.health")

MIN_GAP = 1.0  # seconds between two writes of one worker's key, whatever changed
REFRESH = 5.0  # rewrite this often while something fails; retry this long after a failure
HEARTBEAT_LISTED = 20  # failing segments listed in one heartbeat to the supervisor


class CallHealth:
    """The outcome of one segment's calls in this ownership; thread-safe."""

    def __init__(self, segment: int) -> None:
        self.segment = segment
        self._lock = threading.Lock()
        self._errors = 0
        self._total = 0
        self._last_error = ""
        self._last_success: float | None = None
        self._since: float | None = None

    def succeeded(self, now: float | None = None) -> None:
        with self._lock:
            self._errors = 0
            self._since = None
            self._last_success = time.time() if now is None else now

    def failed(self, error: str, now: float | None = None) -> None:
        with self._lock:
            if self._errors == 0:
                self._since = time.time() if now is None else now
            self._errors += 1
            self._total += 1
            self._last_error = error

    @property
    def failing_now(self) -> bool:
        with self._lock:
            return self._errors > 0

    def failing(self) -> Failing | None:
        """The record if the last call failed, else None."""
        with self._lock:
            if not self._errors:
                return None
            return Failing(
                segment=self.segment,
                errors=self._errors,
                total_errors=self._total,
                last_error=self._last_error,
                last_success=self._last_success,
                since=self._since,
            )


def failing_of(records: Iterable[CallHealth]) -> list[Failing]:
    """The failing segments among `records`, by segment."""
    found = [f for f in (r.failing() for r in records) if f is not None]
    return sorted(found, key=lambda f: f.segment)


def heartbeat_rows(failing: list[Failing]) -> list[dict[str, object]]:
    """What a heartbeat lists (the count travels separately): the first few segments."""
    return [f.to_json() for f in failing[:HEARTBEAT_LISTED]]


# -- the etcd write ----------------------------------------------------------------------


@dataclass
class Published:
    """What this incarnation last wrote, and when it last tried."""

    segments: frozenset[int] = frozenset()  # failing in etcd after our last good write
    at: float = float("-inf")  # clock.now() of the last attempt
    ok: bool = True  # whether that attempt succeeded
    stretch: float = 1.0  # the shedding stretch written (1.0: not shedding)


def due(state: Published, failing: frozenset[int], now: float, stretch: float = 1.0) -> bool:
    """Whether to write the key now (pure: the rate limit in the module docstring). A
    worker shedding load (backpressure.py) is written like one with failing segments."""
    if now < state.at + (MIN_GAP if state.ok else REFRESH):
        return False
    if failing != state.segments or stretch != state.stretch:
        return True  # started or stopped failing (an empty set written once: recovered)
    return (bool(failing) or stretch > 1.0) and now >= state.at + REFRESH


class HealthPublisher:
    """Carries out `due` against etcd, from the worker's main loop, for one lease.

    A failing write never stops the worker: it is logged once (until a write succeeds
    again) and retried after `REFRESH`.
    """

    def __init__(self, etcd: Etcd, keys: Keys, member_id: str, lease: int) -> None:
        self.etcd = etcd
        self.keys = keys
        self.member_id = member_id
        self.lease = lease
        self.state = Published()
        self._complained = False

    def tick(self, failing: list[Failing], shedding: Shedding | None = None) -> None:
        """Write `failing` (see `failing_of`) and `shedding` if due; never raises."""
        segments = frozenset(f.segment for f in failing)
        stretch = shedding.stretch if shedding else 1.0
        now = clock.now()
        if not due(self.state, segments, now, stretch):
            return
        shed = (
            {"stretch": stretch, "p99_ms": round(shedding.p99 * 1000), "since": shedding.since}
            if shedding
            else None
        )
        value = coord_health.encode(failing, updated=time.time(), shedding=shed)
        try:
            written = coord_health.publish(self.etcd, self.keys, self.member_id, self.lease, value)
        except EtcdError as exc:
            self.state = Published(self.state.segments, now, ok=False, stretch=self.state.stretch)
            if not self._complained:
                self._complained = True
                log.warning("could not publish %d failing segments: %s", len(failing), exc)
            return
        if not written:
            # Our member record is not ours (any more): the session notices that itself.
            self.state = Published(self.state.segments, now, ok=False, stretch=self.state.stretch)
            log.debug("health key not written: member record %s not ours", self.member_id)
            return
        if self._complained:
            self._complained = False
            log.info("failing segments published again")
        self.state = Published(segments, now, ok=True, stretch=stretch)
