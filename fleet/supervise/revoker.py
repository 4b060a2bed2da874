"""Lease revocation off the arbiter's thread.

A revoke is one RPC with a 2 s timeout; against a frozen or partitioned etcd, ten
children dying together would otherwise hold the arbiter loop for 20 s, during which
nothing is reaped, respawned or heartbeat-checked. The arbiter queues the lease once
the child's process group is dead (so nothing of it can run when the keys go) and a
single thread revokes in order. At shutdown the queue is drained within a bound: a
revoke that cannot be made in time is left to the lease's TTL, which is always safe.
"""

from __future__ import annotations

import logging
import queue
import threading

from fleet.coord.etcd import Etcd, EtcdError
from fleet.supervise.output import Say

log = logging.getLogger("fleet.supervise.revoker")


class Revoker:
    def __init__(self, etcd: Etcd, say: Say) -> None:
        self.etcd = etcd
        self.say = say
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="revoker", daemon=True)
        self._thread.start()

    def submit(self, lease: int) -> None:
        self._queue.put(lease)

    def _run(self) -> None:
        while True:
            lease = self._queue.get()
            if lease is None:
                return
            try:
                self.etcd.revoke(lease)
                log.debug("revoked lease %x", lease)
            except EtcdError as exc:
                self.say(
                    f"could not revoke lease {lease:x}: {exc} (it expires by itself)", "warning"
                )
            except Exception:  # never let the thread die with leases still queued
                log.debug("revoking lease %x failed", lease, exc_info=True)

    def close(self, timeout: float = 10.0) -> None:
        """Revoke what is queued (within `timeout`), then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout=timeout)
