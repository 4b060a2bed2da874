"""Process helpers shared by the worker, the supervisor and the embedded etcd server."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> None:
    """Ask Linux to send `sig` when our parent dies (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def oom_kill_count() -> int | None:
    """How many processes the kernel's OOM killer has killed in our memory cgroup, or
    None where that cannot be read. A rise across a child's SIGKILL is what makes it an
    OOM kill rather than someone's `kill -9`."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as fh:
            lines = [ln.rstrip("\n").split(":", 2) for ln in fh]
    except OSError:
        return None
    candidates = []
    for _, controllers, path in (ln for ln in lines if len(ln) == 3):
        if controllers == "memory":  # cgroup v1
            candidates.append(f"/sys/fs/cgroup/memory{path}/memory.oom_control")
        elif controllers == "":  # cgroup v2
            candidates.append(f"/sys/fs/cgroup{path.rstrip('/')}/memory.events")
    for candidate in candidates:
        try:
            with open(candidate, encoding="ascii") as fh:
                for line in fh:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (its main thread's), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rpartition(")")[2].split()[:1]
    except OSError:
        return None
    return fields[0] if fields else None


def pid_is_dead(pid: int) -> bool:
    """True only when no process `pid` runs here (gone, or a zombie nobody reaped yet).

    A pid we may not signal is alive; so is one /proc cannot tell about."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    state = _state(pid)
    return state is None or state == "Z"  # None: it exited between the two looks


def pid_is_stopped(pid: int) -> bool:
    """True when `pid` is frozen by SIGSTOP/SIGTSTP (state T).

    Such a process runs no code until something continues it; a supervisor killing it
    must not continue it first (say, to let it dump its stacks): every thread would run
    on for a moment, a handler thread included, under a lease that may be gone."""
    return pid > 0 and _state(pid) == "T"
