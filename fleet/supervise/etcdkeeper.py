"""`fleet up` keeps its embedded etcd alive: the workers' only shared component.

If the embedded etcd exits (OOM killer, a crash, a stray kill), every worker waits for
it forever; the supervisor is the only one who can bring it back. It restarts it on
the same data dir and ports (`EmbeddedEtcd` keeps both for the object's life), so the
workers reconnect to the endpoint they know and, if the restart is quicker than their
lease TTL, carry on with their leases and segments. Restarts back off exponentially
(a data dir etcd refuses would otherwise be retried in a tight loop), and each event
is one line.

A restart waits for etcd's health for up to `START_TIMEOUT`, which the arbiter loop
must not: it runs on a helper thread that lives as long as the keeper. The thread
must outlive the etcd it started because Linux sends the parent-death signal that
`die_with_parent` asks for when the *thread* that forked the child exits, not the
process; so the thread is not a one-shot.

A `fleet etcd` already serving the run directory's data dir (started by the user in
another terminal) is used instead (issue 10, item 4): a second etcd cannot open a data
dir one holds, and the user plainly meant this one. It is not ours to keep alive, so
there is no keeper for it: `fleet up` neither restarts nor stops it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fleet.coord.etcd import EtcdUnavailable
from fleet.server.diagnose import EtcdOwner, describe_etcd, etcd_processes_using
from fleet.server.embedded import (
    EmbeddedEtcd,
    crash_unsafe_version,
    find_etcd_binary,
    healthy_at,
)
from fleet.server.ports import preferred_ports
from fleet.supervise import slots
from fleet.supervise.output import Say

BASE, FACTOR, CAP = 0.5, 2.0, 30.0
STABLE_AFTER = 60.0  # a restart that lived this long resets the backoff
START_TIMEOUT = 20.0


def embedded_etcd(root: Path, say: Say) -> EmbeddedEtcd:
    """The (not yet started) embedded etcd of the run directory `root`."""
    server = EmbeddedEtcd(
        (root / "etcd").resolve(), log_path=root / "etcd.log", die_with_parent=True
    )
    # FLEET_EMBEDDED_PORT=0 asks for any free port (tests, several fleets on one host);
    # =n prefers n and n+1 instead of 2379/2380 (tests of a busy preferred port).
    preferred = preferred_ports(os.environ)
    if preferred is not None:
        server.prefer_ports(*preferred)
    unsafe = crash_unsafe_version(find_etcd_binary())
    if unsafe:
        say(
            f"warning: embedded etcd {unsafe} can lose acknowledged writes if it is killed "
            "(etcd issue 13766); install etcd >= 3.5.3 or 3.4.x (e.g. Debian's etcd-server)",
            "warning",
        )
    return server


@dataclass(frozen=True)
class ExternalEtcd:
    """The `fleet etcd` whose etcd serves our data dir, used and left alone."""

    owner: EtcdOwner
    endpoint: str
    fleet_etcd_pid: int

    def row(self, now: float) -> dict[str, Any]:
        """Its line of `fleet ps`: the same keys as the embedded etcd's, state EXTERNAL
        (EXITED once its process is gone: `fleet up` does not restart it)."""
        try:
            alive = psutil.Process(self.owner.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        return {
            "pid": self.owner.pid if alive else None,
            "state": "EXTERNAL" if alive else "EXITED",
            "endpoint": self.endpoint,
            "restarts": None,
            "last_exit": None,
            "next_start_in": None,
            "fleet_etcd_pid": self.fleet_etcd_pid,
        }


def running_fleet_etcd(root: Path, timeout: float) -> ExternalEtcd | None:
    """The `fleet etcd` already serving `root`'s data dir, once it answers; None when no
    `fleet etcd` holds it (nothing does: start ours; some other etcd: `start()` refuses).

    Raises:
        EtcdUnavailable: it holds the data dir but does not answer within `timeout`
            (stopped, hung): one line saying what to do (exit 3), instead of a second
            etcd waiting on the data dir's lock.
    """
    users = etcd_processes_using((root / "etcd").resolve())
    if len(users) != 1:
        return None
    owner = describe_etcd(users[0])
    if owner.kind != "fleet etcd" or owner.endpoint is None or owner.kind_pid is None:
        return None
    deadline = time.monotonic() + timeout
    while not healthy_at(owner.endpoint, timeout=min(1.0, timeout)):
        if time.monotonic() >= deadline:
            raise EtcdUnavailable(_not_answering(owner, timeout))
        time.sleep(0.1)
    return ExternalEtcd(owner, owner.endpoint, owner.kind_pid)


def _not_answering(owner: EtcdOwner, timeout: float) -> str:
    try:
        stopped = psutil.Process(owner.pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        stopped = False
    held = f"the fleet etcd (pid {owner.kind_pid}) at {owner.endpoint} holds {owner.data_dir}"
    if stopped:
        return (
            f"{held} but its etcd (pid {owner.pid}) is stopped: resume it (kill -CONT "
            f"{owner.pid}) or stop the fleet etcd (Ctrl-C it), then run fleet up again"
        )
    return (
        f"{held} but did not answer within {timeout:g} s: wait for its `etcd ready at` "
        "line, or stop it (Ctrl-C it), then run fleet up again"
    )


class EtcdKeeper:
    """Watches one started `EmbeddedEtcd`; `check` is called from every loop iteration."""

    def __init__(self, server: EmbeddedEtcd, say: Say) -> None:
        self.server = server
        self.say = say
        self.state = "RUNNING"  # RUNNING, BACKOFF, STARTING, STOPPED
        self.restarts = 0
        self.failures = 0
        self.last_exit: str | None = None
        self.started_at = time.monotonic()
        self.next_start: float | None = None
        self._lock = threading.Condition()
        self._want_start = False
        self._closing = False
        self._result: str | None = None  # "" for success, else the error
        self._thread: threading.Thread | None = None

    # -- the arbiter's side ---------------------------------------------------------------

    def check(self, now: float) -> None:
        if self.state == "RUNNING" and not self.server.running:
            code = self.server.returncode
            self.last_exit = (
                "unknown" if code is None else slots.describe_exit(code, slots.RespawnPolicy())
            )
            if now - self.started_at >= STABLE_AFTER:
                self.failures = 0
            delay = self._backoff()
            self.say(
                f"etcd (pid {self.server.pid}) exited: {self.last_exit}; "
                f"restarting it in {delay:.1f}s",
                "warning",
            )
        elif self.state == "BACKOFF" and self.next_start is not None and now >= self.next_start:
            self.state, self.next_start = "STARTING", None
            self._request_start()
        elif self.state == "STARTING":
            with self._lock:
                result, self._result = self._result, None
            if result is None:
                return
            if result == "":
                self.state, self.started_at = "RUNNING", time.monotonic()
                self.restarts += 1
                self.say(f"etcd restarted (pid {self.server.pid}) at {self.server.endpoint}")
            else:
                delay = self._backoff()
                self.say(f"etcd restart failed: {result}; retrying in {delay:.1f}s", "error")

    def _backoff(self) -> float:
        delay = min(CAP, BASE * FACTOR ** min(self.failures, 32))
        self.failures += 1
        self.state, self.next_start = "BACKOFF", time.monotonic() + delay
        return delay

    def row(self, now: float) -> dict[str, Any]:
        """The embedded etcd's line of `fleet ps`."""
        wait = self.next_start if self.state == "BACKOFF" else None
        return {
            "pid": self.server.pid if self.server.running else None,
            "state": self.state,
            "endpoint": self.server.endpoint,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "next_start_in": None if wait is None else round(max(0.0, wait - now), 1),
        }

    def close(self) -> None:
        """End the helper thread (after a start in progress finished); the caller then
        stops the server."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=START_TIMEOUT + 10.0)
        self.state = "STOPPED"

    # -- the helper thread ----------------------------------------------------------------

    def _request_start(self) -> None:
        with self._lock:
            self._want_start = True
            self._lock.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="etcd-keeper", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._want_start and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                self._want_start = False
            try:
                self.server.start(timeout=START_TIMEOUT)
                result = ""
            except Exception as exc:  # reported by the arbiter, retried with backoff
                result = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            with self._lock:
                self._result = result
