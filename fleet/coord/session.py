"""A lease kept alive by one thread, and the local deadline that fences this process.

The deadline is measured from the *send* time of the last acknowledged keepalive: etcd
cannot expire the lease earlier than TTL after it received that keepalive, which is
after we sent it. So past `deadline` (TTL minus a safety margin after that send) the
process must assume it holds nothing, whatever etcd would say if asked.

Every lease call (grant, keepalive, revoke) goes over the client's liveness connection
(`Etcd.liveness()`): a flood of checkpoint commits or a batch of acquires on the data
connection must not delay the keepalive that keeps all of them legitimate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal

from fleet import clock
from fleet.coord.etcd import Etcd, EtcdError, EtcdUnavailable, retry

log = logging.getLogger("fleet.coord.session")

SessionEvent = Literal["failing", "recovered", "lost"]


def safety_margin(ttl: int) -> float:
    """Time kept in hand before the earliest server-side expiry: 20% of the TTL, 0.4..2 s."""
    return min(2.0, max(0.4, ttl * 0.2))


class Session:
    """One lease. `alive()` is the self-fencing check every action of the worker makes."""

    def __init__(
        self,
        etcd: Etcd,
        ttl: int,
        on_event: Callable[[SessionEvent], None] = lambda _e: None,
        now: Callable[[], float] = clock.now,
        on_round_trip: Callable[[float], None] = lambda _s: None,
    ) -> None:
        # The lease's own connection; no round trip here (see `Etcd.liveness`).
        self.client = etcd.liveness()
        # Injectable for tests (a suspend is a jump of this clock); `fleet.clock.now`
        # otherwise, which keeps counting while the host is suspended.
        self.now = now
        self.requested_ttl = ttl
        self.ttl = ttl
        self.lease_id = 0
        self.margin = safety_margin(ttl)
        self._deadline = 0.0
        self._on_event = on_event
        self._on_round_trip = on_round_trip  # each keepalive's, for backpressure
        self._lost = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_ack = 0.0

    @property
    def deadline(self) -> float:
        return self._deadline

    def alive(self) -> bool:
        return not self._lost.is_set() and self.now() < self._deadline

    @property
    def lost(self) -> bool:
        if not self._lost.is_set() and self.now() >= self._deadline:
            self._mark_lost("local deadline passed before a keepalive was acknowledged")
        return self._lost.is_set()

    def start(self, until: float) -> None:
        """Grant the lease (retrying until `until`) and start keeping it alive."""

        def grant() -> tuple[int, int, float]:
            sent = self.now()
            lease_id, ttl = self.client.grant(self.requested_ttl)
            return lease_id, ttl, sent

        self.lease_id, self.ttl, sent = retry(grant, until=until, what="lease grant")
        self.margin = safety_margin(self.ttl)
        self._extend(sent, self.ttl)
        self._thread = threading.Thread(target=self._keepalive, name="fleet-keepalive", daemon=True)
        self._thread.start()

    def _extend(self, sent: float, ttl: int) -> None:
        self.last_ack = self.now()
        self._deadline = max(self._deadline, sent + ttl - self.margin)

    def lose(self, why: str) -> None:
        """Declare the lease gone now (say, one of our keys was deleted on the server):
        from this call on `alive()` is False for every thread, so no new call starts."""
        self._mark_lost(why)

    def _mark_lost(self, why: str) -> None:
        if not self._lost.is_set():
            self._lost.set()
            log.warning("lease %x lost: %s", self.lease_id, why)
            self._on_event("lost")

    def _keepalive(self) -> None:
        """Refresh TTL/3 after the previous *send*; while failing, retry every 0.5 s until
        the deadline.

        From the send, not the answer: the deadline counts from the send, so waiting
        TTL/3 after a slow answer spent two round trips of the budget per cycle and gave
        up a lease on a link etcd would still have kept it over (a 0.36 s one-way delay
        lost a TTL-3 lease; tests/chaos slow_network). Now a round trip may take up to
        about TTL - TTL/3 - margin before the lease is at risk."""
        failing = False
        sent = self.now()
        while not self._closed.is_set():
            period = 0.5 if failing else self.ttl / 3
            wait = period if failing else max(0.0, sent + period - self.now())
            if self._closed.wait(wait):
                return
            if self.now() >= self._deadline:
                self._mark_lost("local deadline passed before a keepalive was acknowledged")
                return
            sent = self.now()
            try:
                ttl = self.client.keepalive(
                    self.lease_id, timeout=max(0.2, min(self.client.timeout, self._deadline - sent))
                )
            except (EtcdUnavailable, EtcdError) as exc:
                self._on_round_trip(self.now() - sent)
                if not failing:
                    failing = True
                    log.warning("keepalive failing: %s", exc)
                    self._on_event("failing")
                continue
            self._on_round_trip(self.now() - sent)
            if self._closed.is_set():
                return
            if ttl <= 0:
                self._mark_lost("etcd says the lease no longer exists")
                return
            if self.now() >= self._deadline:
                # Acknowledged, but too late: our deadline passed in between, so what we
                # held may already be gone. Start over rather than pretend continuity.
                self._mark_lost("keepalive acknowledged after the local deadline")
                return
            self._extend(sent, ttl)
            if failing:
                failing = False
                log.info("keepalive recovered")
                self._on_event("recovered")

    def close(self, revoke: bool) -> None:
        """Stop the keepalive; revoke the lease if asked (deletes every key bound to it)."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.client.timeout + 1)
        if revoke and self.lease_id:
            try:
                retry(
                    lambda: self.client.revoke(self.lease_id),
                    until=self.now() + min(2.0, self.ttl),
                    what="lease revoke",
                )
            except EtcdError as exc:
                log.warning(
                    "could not revoke lease %x: %s (it expires by itself)", self.lease_id, exc
                )
