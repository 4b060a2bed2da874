"""One supervised child process: how it is started, and how its exit is noticed.

A worker is started with fork + exec of `fleet worker` (never a bare fork: the
supervisor holds a gRPC channel), in a new session so that its process group is
exactly what it and its handlers started, and with two pipes: the write end of the
status pipe is passed as FLEET_SUPERVISOR_FD, and stdout/stderr go to the output pipe.
Its exit is noticed with `waitid(WNOWAIT)`, which leaves it a zombie: until it is
reaped its pid (the id of its process group) cannot be reused, so the supervisor can
still kill that group safely before it revokes the lease.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from fleet.supervise.plumbing import ChildPipes
from fleet.supervise.slots import Slot
from fleet.work.pacing import EXPECT_ENV


@dataclass
class Child:
    """The supervisor's handles on one running child process."""

    slot: Slot
    popen: subprocess.Popen[bytes]
    pipes: ChildPipes | None = None
    kill_at: float | None = None
    reason: str | None = None
    group_killed: bool = False  # its main thread died: the group was SIGKILLed already
    info: dict[str, Any] = field(default_factory=dict)  # the last heartbeat's contents

    def kill_group(self, sig: int) -> None:
        """Only while the leader is unreaped: until then its pid, hence the group id,
        cannot belong to anybody else."""
        if self.popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


def spawn_worker(
    index: int, flags: Sequence[str], supervisor_pid: int, *, expected: int | None = None
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start `python -m fleet worker FLAGS` for slot `index`; (popen, status read end,
    output read end). On OSError (EAGAIN, ENOMEM, EMFILE) every pipe end is closed
    before it propagates, so a failed spawn leaks nothing.

    `expected` is how many workers this supervisor runs now (FLEET_EXPECTED_WORKERS): a
    leader holds a fleet's first assignment back until that many are registered, so a
    cold start acquires each segment once (fleet/work/pacing.py)."""
    fds: list[int] = []
    try:
        status_r, status_w = os.pipe()
        fds += [status_r, status_w]
        out_r, out_w = os.pipe()
        fds += [out_r, out_w]
        env = dict(os.environ)
        env.update(
            {
                "FLEET_WORKER_INDEX": str(index),
                "FLEET_SUPERVISOR_FD": str(status_w),
                "FLEET_SUPERVISOR_PID": str(supervisor_pid),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if expected is not None:
            env[EXPECT_ENV] = str(expected)
        popen = subprocess.Popen(
            [sys.executable, "-m", "fleet", "worker", *flags],
            env=env,
            pass_fds=(status_w,),
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=out_w,
            start_new_session=True,
        )
    except OSError:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    os.close(status_w)
    os.close(out_w)
    return popen, status_r, out_r


def has_exited(pid: int) -> bool:
    """Whether child `pid` has exited, without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # already reaped


def rss_mb(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)
    except psutil.Error:
        return None
