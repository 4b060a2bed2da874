"""Spawning a local etcd as a child process, and killing any still alive at exit.

The child runs in its own session, so terminal Ctrl-C and process-group signals aimed
at us do not hit it behind our back; the flip side is that nothing stops it when we
exit, so every live one is registered here and killed by an atexit hook.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Protocol

from fleet.proc import set_parent_death_signal
from fleet.server.diagnose import START_MARKER


class Killable(Protocol):
    """What the exit hook needs of a registered server: a kill that waits."""

    def kill(self) -> None: ...


def _term_with_parent() -> None:
    set_parent_death_signal(signal.SIGTERM)


def spawn(cmd: list[str], log_path: Path | None, die_with_parent: bool) -> subprocess.Popen[bytes]:
    """Start `cmd` in a new session, its output appended to `log_path` (None: discarded).

    Each start writes a START_MARKER line first, so diagnosis reads only the last
    attempt's log. With `die_with_parent` (Linux) the child gets SIGTERM when the
    process that started it dies, even by SIGKILL; that needs a preexec function, so
    it is only safe before the parent starts threads.
    """
    log: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"=== {stamp} {START_MARKER}{' '.join(cmd)}\n".encode())
        log.flush()
    try:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log if log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_term_with_parent if die_with_parent else None,
        )
    finally:
        if log is not None:
            log.close()  # the child holds its own descriptor


# Every server with a live child, so an interpreter exit cannot leak an etcd
# (it runs in its own session, so nothing else would stop it).
_live: set[Killable] = set()
_live_lock = threading.Lock()


def register(server: Killable) -> None:
    """Have `server` killed at interpreter exit unless `unregister`ed first."""
    with _live_lock:
        _live.add(server)


def unregister(server: Killable) -> None:
    """Its child has exited: nothing left to kill at exit."""
    with _live_lock:
        _live.discard(server)


def _kill_live_at_exit() -> None:
    """atexit hook: kill any embedded etcd still running when Python exits."""
    with _live_lock:
        instances = list(_live)
    for server in instances:
        with contextlib.suppress(Exception):
            server.kill()


atexit.register(_kill_live_at_exit)
