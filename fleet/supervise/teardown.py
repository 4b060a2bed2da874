"""How `fleet up` ends: the bounded graceful stop after a bug, and the final teardown.

A bug that escapes the arbiter loop must not cost the fleet a lease TTL of stalled
segments (which a SIGKILL of every worker would): the workers get the same graceful
stop as on SIGTERM, within the same bound, with only the verbs a stop needs (pass
output on, reap, revoke, escalate) so the failing one is not run again. The traceback
goes to `.fleet/crash.log` and the debug log; the terminal gets one line.

The final teardown kills whatever is left with its process group, reaps it and
revokes its lease, then stops the control socket and the embedded etcd, and removes
the run directory's files while the lock is still held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.supervise.supervisor import Supervisor

log = logging.getLogger("fleet.supervise.teardown")

EXIT_FAILURE = 1
KILL_AFTER = 5.0


def crash_stop(sup: Supervisor, exc: Exception) -> int:
    text = traceback.format_exc()
    log.debug("arbiter loop failed", exc_info=True)
    where = "traceback in .fleet/crash.log"
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        sup.run_dir.append_crash(f"=== {stamp} pid {os.getpid()}\n{text}")
    except (OSError, RuntimeError):
        where = "no crash log could be written"
    sup._say(
        f"internal error: {type(exc).__name__}: {exc} ({where}); stopping the fleet", "error"
    )
    with contextlib.suppress(Exception):
        sup.stop("graceful")
    end = sup.stop_deadline + KILL_AFTER
    while sup.children and time.monotonic() < end:
        try:
            sup.selector.select(0.1)
            sup.signals.drain()
            if {"int", "quit"} & set(sup.signals.take()):
                sup.stop("quick")
            for child in list(sup.children.values()):
                if child.pipes is not None:
                    child.pipes.read_status()
                    child.pipes.read_output()
            sup.reap()
            sup.murder()
        except Exception:
            log.debug("graceful stop after an internal error failed", exc_info=True)
            break
    return EXIT_FAILURE


def shutdown(sup: Supervisor) -> None:
    for child in list(sup.children.values()):
        child.kill_group(signal.SIGKILL)
    for pid, child in list(sup.children.items()):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=KILL_AFTER)
        sup.children.pop(pid, None)
        if child.pipes is not None:
            with contextlib.suppress(Exception):
                child.pipes.close()
        if child.slot.lease:
            sup._revoke(child.slot.lease)
    if sup.control is not None:
        sup.control.close()
    if sup.revoker is not None:
        sup.revoker.close()
    if sup.etcd is not None:
        sup.etcd.close()
    if sup.keeper is not None:
        sup.keeper.close()
    if sup.etcd_server is not None:
        sup.etcd_server.stop()
    sup.run_dir.clear()
    sup.run_dir.release()
    sup.selector.close()
    sup.signals.close()
