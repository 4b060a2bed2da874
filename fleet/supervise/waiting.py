"""`fleet scale` and `fleet restart` wait until the fleet has done what they asked.

The control socket answers at once (the arbiter must never wait on a client), so the
command itself polls `ps` and tells the user how far it got: one line each time
another slot is done, then a summary. A slot that goes FATAL ends the wait with exit 1:
what was asked cannot finish until someone fixes it. Ctrl-C stops the waiting, not the
fleet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from fleet.supervise.control import request
from fleet.supervise.rundir import RunDir

POLL = 0.2
Rows = list[dict[str, Any]]


def ps_rows(run_dir: RunDir) -> Rows:
    rows: Rows = request(run_dir, {"cmd": "ps"})["slots"]
    return rows


def _wait(
    run_dir: RunDir,
    out: TextIO,
    done: Callable[[Rows], set[int]],
    total: int,
    what: str,
    timeout: float,
    slots: set[int],
    settled: Callable[[Rows], bool] = lambda rows: True,
) -> int:
    started = time.monotonic()
    seen: set[int] = set()
    while True:
        rows = ps_rows(run_dir)
        fatal = sorted(r["slot"] for r in rows if r["state"] == "FATAL" and r["slot"] in slots)
        now_done = done(rows)
        for slot in sorted(now_done - seen):
            print(f"{what}: w{slot} ready ({len(now_done)}/{total})", file=out, flush=True)
        seen |= now_done
        if len(now_done) >= total and settled(rows):
            print(f"{what}: done in {time.monotonic() - started:.1f} s", file=out, flush=True)
            return 0
        if fatal:
            print(
                f"{what}: slots {fatal} are FATAL (see fleet ps); {len(now_done)}/{total} done",
                file=out,
                flush=True,
            )
            return 1
        if time.monotonic() - started > timeout:
            print(f"{what}: still not done after {timeout:g} s (see fleet ps)", file=out)
            return 1
        time.sleep(POLL)


def wait_scaled(run_dir: RunDir, workers: int, out: TextIO, timeout: float) -> int:
    """Until exactly `workers` slots exist and every one is READY."""

    def done(rows: Rows) -> set[int]:
        return {r["slot"] for r in rows if r["state"] == "READY" and r["slot"] < workers}

    def only_those(rows: Rows) -> bool:  # the slots scaled away have exited
        return len(rows) == workers

    return _wait(
        run_dir, out, done, workers, f"scale to {workers}", timeout, set(range(workers)), only_those
    )


def wait_restarted(run_dir: RunDir, before: Rows, out: TextIO, timeout: float) -> int:
    """Until every slot in `before` that had a process runs a new one (more restarts) and
    is READY. A slot FATAL or waiting to respawn when asked has nothing to restart: the
    rolling restart passes it by, and so does the wait."""
    wanted = {r["slot"]: r["restarts"] for r in before if r["state"] in ("READY", "STARTING")}

    def done(rows: Rows) -> set[int]:
        return {
            r["slot"]
            for r in rows
            if r["slot"] in wanted and r["restarts"] > wanted[r["slot"]] and r["state"] == "READY"
        }

    return _wait(run_dir, out, done, len(wanted), "restart", timeout, set(wanted))
