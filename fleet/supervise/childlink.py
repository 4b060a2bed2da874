"""The worker's side of the pipe to its `fleet up` supervisor.

The supervisor hands each child the write end of a pipe (FLEET_SUPERVISOR_FD) and its
own pid (FLEET_SUPERVISOR_PID). The child reports its lease and READY once it has
registered and is campaigning, and heartbeats from its main loop: a heartbeat proves
the loop that makes every decision is alive, which a helper thread could not.
Messages are JSON lines; a write that would block is dropped (heartbeats are periodic).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

from fleet.proc import set_parent_death_signal

log = logging.getLogger("fleet.supervise.childlink")

FD_ENV = "FLEET_SUPERVISOR_FD"
PID_ENV = "FLEET_SUPERVISOR_PID"
HEARTBEAT_EVERY = 1.0


class ParentLink:
    def __init__(self, fd: int, parent_pid: int) -> None:
        self.fd = fd
        self.parent_pid = parent_pid
        self._last_beat = 0.0
        self._last_state: dict[str, Any] = {}
        os.set_blocking(fd, False)

    @classmethod
    def from_env(cls) -> ParentLink | None:
        fd, pid = os.environ.get(FD_ENV), os.environ.get(PID_ENV)
        if not fd or not pid or not fd.isdigit() or not pid.isdigit():
            return None
        set_parent_death_signal(signal.SIGTERM)
        return cls(int(fd), int(pid))

    def parent_alive(self) -> bool:
        """False once we were re-parented: the supervisor died without stopping us."""
        return os.getppid() == self.parent_pid

    def _send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            pass
        except OSError as exc:  # the supervisor is gone; parent_alive() will say so
            log.debug("supervisor pipe: %s", exc)

    def ready(self, lease: int) -> None:
        self._send({"ready": True, "lease": lease, "pid": os.getpid()})

    def heartbeat(self, details: dict[str, Any] | None = None, **state: Any) -> None:
        """Send at once when the reported state changed, else once per HEARTBEAT_EVERY.

        `details` ride along but do not count as a change: the failing segments' error
        counts grow with every failed call, and a heartbeat per call is what the
        supervisor must not get (the number of failing segments is in `state`)."""
        now = time.monotonic()
        if state != self._last_state or now - self._last_beat >= HEARTBEAT_EVERY:
            self._last_beat = now
            self._last_state = state
            self._send({"hb": True, **state, **(details or {})})
