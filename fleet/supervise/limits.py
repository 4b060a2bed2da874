"""How many workers this process can supervise: its open-file limit, and memory.

Each live child costs the supervisor two descriptors (the read ends of its status and
output pipes) and four more for a moment while it is spawned (the write ends and
Popen's error pipe). Past the limit `os.pipe` fails with EMFILE in the middle of the
arbiter loop, so `workers` is checked against the limit up front instead: the soft
limit is raised towards the hard one when that helps (an unprivileged process may do
so), and a count beyond what remains is refused with a message naming the limit.

Memory is the other wall: every worker is a Python process with the etcd client loaded
(about 46 MiB resident when idle, measured), so 600 workers on a 24 GiB host would end in
the OOM killer rather than in a fleet. A count whose estimated footprint exceeds the
memory available is refused the same way, up front.
"""

from __future__ import annotations

import contextlib
import resource

import psutil

FDS_PER_WORKER = 2
# The etcd client's sockets and threads, the selector, the control socket and its
# clients (capped in control.py), log files, a spawn's transient pipes, stdio.
RESERVED_FDS = 96
MAX_WORKERS = 1024  # what the configuration accepts
WORKER_MIB = 60  # an idle worker's resident size (46 MiB measured) plus room to work
MIB = 1024 * 1024


def fds_for(workers: int) -> int:
    return RESERVED_FDS + FDS_PER_WORKER * workers


def capacity(soft: int) -> int:
    """The most workers `soft` open files allow."""
    if soft == resource.RLIM_INFINITY:
        return MAX_WORKERS
    return max(0, min(MAX_WORKERS, (soft - RESERVED_FDS) // FDS_PER_WORKER))


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to what `MAX_WORKERS` need (or the hard limit, if
    lower), once at start-up; the number of workers the limit then allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = fds_for(MAX_WORKERS)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # else `check` names the limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return capacity(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def check(workers: int, running: int = 0) -> str | None:
    """None if `workers` fit the current limits, else the one-line reason they do not
    (`running`: workers already started, whose memory is already spoken for)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    allowed = capacity(soft)
    if workers > allowed:
        return (
            f"workers = {workers}: the open-file limit (RLIMIT_NOFILE soft {soft}, hard "
            f"{hard}) allows at most {allowed} workers here; raise it (ulimit -n) or ask "
            "for fewer"
        )
    available = psutil.virtual_memory().available
    more = max(0, workers - running)
    if more * WORKER_MIB * MIB > available:
        fit = running + available // (WORKER_MIB * MIB)
        return (
            f"workers = {workers}: {more} more workers need about "
            f"{more * WORKER_MIB / 1024:.1f} GiB (~{WORKER_MIB} MiB each) but "
            f"{available / 1024**3:.1f} GiB of memory is available, enough for about {fit} "
            "workers in all; ask for fewer, or run the rest on another host"
        )
    return None
