"""The one clock every lease deadline in fleet is measured on.

`time.monotonic()` (CLOCK_MONOTONIC) stops while the host is suspended, but etcd's
lease timers, on another machine, keep running: after a resume a monotonic deadline
would still lie in the future while the server has already expired the lease.
CLOCK_BOOTTIME counts suspended time too, so a deadline on it passes when it should.
Elsewhere (no CLOCK_BOOTTIME) we fall back to the monotonic clock.

Every comparison against a session deadline (session, runners, watchdog, retries,
`SegmentContext.deadline`) must use `now()`, never `time.monotonic()`.
"""

from __future__ import annotations

import time

CLOCK_ID: int | None = getattr(time, "CLOCK_BOOTTIME", None)
NAME = "CLOCK_BOOTTIME" if CLOCK_ID is not None else "CLOCK_MONOTONIC"


def _boottime() -> float:
    assert CLOCK_ID is not None
    return time.clock_gettime(CLOCK_ID)


now = _boottime if CLOCK_ID is not None else time.monotonic
