"""The supervisor's health checks of its children, and the kills they end in.

gunicorn's arbiter calls this `murder`: a child whose heartbeat is overdue (hung, or
never READY) gets SIGABRT for a stack dump, or SIGKILL if it is frozen (SIGSTOP), and
SIGKILL of its process group if it still lives `KILL_AFTER` later; a child above
`max_rss_mb` is recycled with a SIGTERM. A child asked to stop (`term`) has until
`graceful_timeout` plus `KILL_AFTER` before the same escalation. A dying child's group
is killed as soon as its main thread is gone (`kill_group_of_dying`), before it can be
reaped. The supervisor keeps the verbs (supervisor.py); this is what `murder` checks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable

from fleet.config import SupervisorSettings
from fleet.proc import pid_is_dead, pid_is_stopped
from fleet.supervise import slots
from fleet.supervise.children import Child, rss_mb
from fleet.supervise.slots import State

KILL_AFTER = 5.0  # SIGABRT of a hung child is followed by SIGKILL after this
RSS_EVERY = 5.0


def term(
    child: Child, graceful_timeout: float, expected: bool = True, recycle: str | None = None
) -> None:
    """Ask a child to stop (SIGTERM); it is killed if it has not within the bound."""
    if expected:
        slots.stopping(child.slot, recycle=recycle)
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.popen.pid, signal.SIGTERM)
    child.kill_at = time.monotonic() + graceful_timeout + KILL_AFTER


def kill_group_of_dying(child: Child) -> None:
    """A killed worker is reapable only once every thread has left the kernel, which
    under CPU starvation took seconds (chaos, cluster mode: 5 s, longer than a 3 s
    lease); its main thread is a zombie within milliseconds. Kill what it started
    as soon as that shows, so its helpers do not run on past an expiring lease."""
    if not child.group_killed and pid_is_dead(child.popen.pid):
        child.group_killed = True
        child.kill_group(signal.SIGKILL)


class HealthCheck:
    """Heartbeats, resident size and kill deadlines of the children, once a loop turn."""

    def __init__(
        self,
        settings: SupervisorSettings,
        graceful_timeout: float,
        say: Callable[[str, str], None],
    ) -> None:
        self.settings = settings
        self.graceful_timeout = graceful_timeout
        self.say = say
        self.last_rss_check = 0.0  # resident sizes are read every RSS_EVERY seconds

    def check(self, children: Iterable[Child], now: float) -> None:
        sup = self.settings
        check_rss = sup.max_rss_mb and now - self.last_rss_check >= RSS_EVERY
        if check_rss:
            self.last_rss_check = now
        for child in children:
            if child.kill_at is not None:
                if now >= child.kill_at:
                    child.kill_group(signal.SIGKILL)
                    child.kill_at = now + KILL_AFTER
                continue
            reason = slots.heartbeat_overdue(
                child.slot, now, sup.heartbeat_timeout, sup.startup_timeout
            )
            if reason is not None:
                self._kill_hung(child, reason, now)
            elif check_rss and child.slot.state is not State.STOPPING:
                rss = rss_mb(child.popen.pid)
                if rss is not None and rss > sup.max_rss_mb:
                    self.say(
                        f"w{child.slot.index} uses {rss:.0f} MiB > {sup.max_rss_mb}: recycling it",
                        "warning",
                    )
                    child.reason = f"rss {rss:.0f} MiB > {sup.max_rss_mb} MiB"
                    term(child, self.graceful_timeout, expected=True, recycle=child.reason)

    def _kill_hung(self, child: Child, reason: str, now: float) -> None:
        self.say(f"w{child.slot.index} (pid {child.popen.pid}) {reason}: killing it", "error")
        child.reason = reason
        if pid_is_stopped(child.popen.pid):
            # Frozen: SIGCONT for a stack dump would let its threads run on.
            child.kill_group(signal.SIGKILL)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.popen.pid, signal.SIGABRT)
                os.kill(child.popen.pid, signal.SIGCONT)
        child.kill_at = now + KILL_AFTER
