"""Test-only faults of a local etcd: freeze it (SIGSTOP) and thaw it.

The product never pauses its etcd, so this lives with the tests: `PausableEtcd` is an
`EmbeddedEtcd` with `pause()`/`resume()`, which the `etcd_server` fixture, the cluster
helper and the chaos suite use.
"""

from __future__ import annotations

import signal
import time

from fleet.server.embedded import EmbeddedEtcd


def _proc_state(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc/<pid>/stat ("T" = stopped), if known."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            # "pid (comm) S ...": comm may contain spaces or ")", so split at the last ")".
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class PausableEtcd(EmbeddedEtcd):
    def pause(self) -> None:
        """SIGSTOP: etcd stays alive but answers nothing (simulates a hung member).

        Returns once the kernel reports the process stopped (signal delivery is
        asynchronous), so a caller's next request really meets a frozen etcd.
        """
        if not self._signal(signal.SIGSTOP):
            raise RuntimeError("etcd is not running; cannot pause it")
        self._await_state(stopped=True)

    def resume(self) -> None:
        """SIGCONT: undo `pause()`; returns once the process is no longer stopped."""
        if not self._signal(signal.SIGCONT):
            raise RuntimeError("etcd is not running; cannot resume it")
        self._await_state(stopped=False)

    def _await_state(self, stopped: bool, timeout: float = 5.0) -> None:
        """Wait (briefly) until /proc shows the process stopped or not; no-op without /proc."""
        pid = self.pid
        deadline = time.monotonic() + timeout
        while pid is not None and time.monotonic() < deadline:
            state = _proc_state(pid)
            if state is None or (state in ("T", "t")) == stopped:
                return
            time.sleep(0.005)
