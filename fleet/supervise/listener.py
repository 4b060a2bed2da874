"""`fleet supervisord-listener`: fast failover for workers run by supervisord.

supervisord restarts a dead worker but knows nothing of its lease, so without help its
segments stay owned by a dead member until the lease expires (a TTL). This event
listener does for supervisord what `fleet up` does itself: on the end of a worker
(PROCESS_STATE_EXITED, _STOPPED, _BACKOFF, _FATAL) it SIGKILLs what is left of the
worker's process group, then revokes the worker's lease, found through
`members/<host_id>-<slot>`. It does not wait for supervisord to report the exit, which
can take a second: it watches each worker's pid itself (`ExitWatch`, a pidfd), and
supervisord's events are the backstop (and the only source for BACKOFF/FATAL).

Rules, and why:
- stdout is supervisord's event protocol and nothing else (the `supervisor` package's
  `childutils` speaks it); fd 1 is moved aside at start and fd 1 then points at stderr,
  so a stray print or a C library cannot corrupt the protocol. Logs go to stderr.
- Every event is answered at once. The etcd side runs on one helper thread: while etcd
  is unreachable the listener keeps answering supervisord (a listener that stops
  answering makes supervisord buffer, then drop, events) and retries each revoke with
  backoff until etcd answers; the record then says whether anything is left to do.
- A revoke never hits a newer incarnation: the slot may have been restarted before the
  revoke runs. Only the lease of a record whose pid is the exited pid (EXITED/STOPPED
  carry it), or, when the event has no pid (BACKOFF/FATAL), whose pid no longer runs,
  is revoked; and never while a process with that pid runs, nor a record of another
  host. A revoke names a lease id, so the record changing after the read cannot
  redirect it: a new incarnation always has a lease of its own.
- Only a group whose id supervisord gave as a worker's pid is killed, and only while no
  process has that pid (a member record names a pid too, but etcd data is no licence
  to kill processes on this host). A group that still has members keeps that pid from
  being reused (Linux frees a pid only once no process uses it as pid, group or
  session id), so the SIGKILL reaches exactly the dead worker's leftovers. What remains
  is an empty group whose pid is reused between the check and the kill, which needs a
  pid wrap-around in those microseconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import psutil
from supervisor import childutils  # type: ignore[import-untyped]

from fleet.coord.etcd import Etcd, EtcdError
from fleet.coord.keys import Keys
from fleet.supervise.supervisord import WORKER_PROGRAM

log = logging.getLogger("fleet.supervise.listener")

# Learning a worker's pid: RUNNING carries it; for STARTING it is asked over supervisord's
# RPC interface (the process exists by the time the event is delivered).
LIFE_EVENTS = frozenset({"PROCESS_STATE_STARTING", "PROCESS_STATE_RUNNING"})
DEAD_EVENTS = frozenset(
    {
        "PROCESS_STATE_EXITED",
        "PROCESS_STATE_STOPPED",
        "PROCESS_STATE_BACKOFF",
        "PROCESS_STATE_FATAL",
    }
)
_PROGRAM = re.compile(re.escape(WORKER_PROGRAM) + r"([0-9]{1,6})")
RETRY_MIN, RETRY_MAX = 0.2, 5.0


def pid_alive(pid: int) -> bool:
    """A process with this pid runs (a zombie does not count: it runs nothing)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell: assume it runs, which only ever skips a kill or revoke


def kill_dead_group(pgid: int) -> bool:
    """SIGKILL the process group of a worker that has exited (module docstring: only
    while no process has that pid). True if a signal was sent."""
    if pgid <= 1 or pgid == os.getpid() or pid_alive(pgid):
        return False
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@dataclass
class Job:
    """One ended worker whose lease may still have to be revoked."""

    member_id: str
    pid: int | None  # the exited pid, when the event carries it
    event: str
    since: float  # time.monotonic() when the event arrived
    # Pids supervisord reported for this slot: the only groups killed on the word of a
    # member record (a record is etcd data, and etcd access is no licence to kill here).
    known_pids: frozenset[int] = frozenset()
    failures: int = 0


def slot_of(headers: dict[str, str]) -> int | None:
    """The slot of a fleet worker program (`fleet-worker-<i>`, its own group), else None."""
    m = _PROGRAM.fullmatch(headers.get("processname", ""))
    if m is None or headers.get("groupname") != headers.get("processname"):
        return None
    return int(m.group(1))


def decide(record: dict[str, Any], job: Job, host: str, alive: Callable[[int], bool]) -> str:
    """"revoke", or why the record's lease is left alone."""
    pid = record.get("pid")
    if record.get("host") != host:
        return f"it belongs to host {record.get('host')!r}, not this one ({host!r})"
    if not isinstance(pid, int) or isinstance(pid, bool):
        return "it names no pid"
    if job.pid is not None and pid != job.pid:
        return f"it belongs to pid {pid} (a newer incarnation), not the exited pid {job.pid}"
    if alive(pid):
        return f"pid {pid} is running"
    return "revoke"


class Revocations:
    """The helper thread: reads each ended worker's record and revokes its lease,
    retrying while etcd is unreachable."""

    def __init__(self, connect: Callable[[], Etcd], keys: Keys, host: str | None = None) -> None:
        self._connect = connect
        self._etcd: Etcd | None = None
        self.keys = keys
        self.host = host or socket.gethostname()
        self._jobs: dict[tuple[str, int | None], Job] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="revocations", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, unless the same exit is queued already (the pid watch and
        supervisord's event both report it)."""
        with self._cond:
            self._jobs.setdefault((job.member_id, job.pid), job)
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._jobs)

    def close(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._etcd is not None:
            self._etcd.close()

    def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                jobs = list(self._jobs.items())
            failed = False
            for key, job in jobs:
                try:
                    self._attempt(job)
                except EtcdError as exc:
                    failed = True
                    job.failures += 1
                    if job.failures == 1 or job.failures % 20 == 0:
                        log.warning("%s %s: cannot reach etcd to revoke its lease (%s); "
                                    "retrying", job.member_id, job.event, exc)
                    continue
                except Exception:  # a bug must not end the thread with jobs queued
                    log.exception("%s %s: revoke failed; retrying", job.member_id, job.event)
                    failed = True
                    continue
                with self._cond:
                    if self._jobs.get(key) is job:
                        del self._jobs[key]
            if failed:
                with self._cond:
                    self._cond.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
            else:
                delay = RETRY_MIN

    def _attempt(self, job: Job) -> None:
        if self._etcd is None:  # made here, not at start: etcd may be down then
            self._etcd = self._connect()
        etcd = self._etcd
        kv, _ = etcd.get(self.keys.member(job.member_id))
        if kv is None:
            log.info("%s %s: no member record, nothing to revoke", job.member_id, job.event)
            return
        try:
            record = json.loads(kv.value)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            log.warning("%s: member record is not a JSON object; left alone", job.member_id)
            return
        verdict = decide(record, job, self.host, pid_alive)
        if verdict != "revoke":
            log.info("%s %s: lease %x left alone: %s", job.member_id, job.event, kv.lease, verdict)
            return
        pid = int(record["pid"])
        if pid == job.pid or pid in job.known_pids:
            kill_dead_group(pid)  # again: for BACKOFF/FATAL this is the first chance
        etcd.revoke(kv.lease)
        took = (time.monotonic() - job.since) * 1000
        log.info("%s %s (pid %d): revoked lease %x, %.0f ms after the event",
                 job.member_id, job.event, pid, kv.lease, took)


def ended(slot: int, pid: int | None, event: str, host_id: str,
          revocations: Revocations, known: frozenset[int] = frozenset()) -> Job:
    """A worker ended: kill its leftovers now (local, instant), revoke on the thread."""
    job = Job(f"{host_id}-{slot}", pid, event, time.monotonic(), known)
    if pid is not None and kill_dead_group(pid):
        log.debug("%s: killed what was left of process group %d", job.member_id, pid)
    revocations.submit(job)
    return job


class ExitWatch:
    """Notices a worker's exit the moment it happens, through a pidfd.

    supervisord notifies the exit of a child it reaped only at its next poll wake-up,
    up to a second later (measured: 1.0 s with quiet workers), which alone would cost
    most of a failover. So the listener also watches the pid of every worker it learns
    of (RUNNING events, STARTING events plus an RPC, and every worker at start) and
    acts on the exit itself; supervisord's event, when it comes, finds nothing left to
    do. A pid learnt late or wrongly is harmless: what is revoked is decided from the
    member record and the pid's liveness alone (`decide`).
    """

    def __init__(self, on_exit: Callable[[int, int], None], rpc: Any = None) -> None:
        self._on_exit = on_exit
        self._rpc = rpc
        self._lock = threading.Lock()
        self._fds: dict[int, tuple[int, int]] = {}  # pidfd -> (slot, pid)
        self._seen: dict[int, list[int]] = {}  # slot -> its last pids, newest last
        self._names: list[tuple[int, str]] = []  # (slot, program) whose pid to ask for
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="exit-watch", daemon=True)
        self._thread.start()

    def seen(self, slot: int) -> frozenset[int]:
        """The last pids supervisord reported for `slot`."""
        with self._lock:
            return frozenset(self._seen.get(slot, ()))

    def track(self, slot: int, pid: int) -> None:
        with self._lock:
            pids = self._seen.setdefault(slot, [])
            if pid not in pids:
                pids[:] = [*pids[-7:], pid]
            if (slot, pid) in self._fds.values():
                return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._on_exit(slot, pid)  # gone already
            return
        except OSError as exc:  # no pidfd here: supervisord's events still come
            log.debug("pidfd_open(%d): %s", pid, exc)
            return
        with self._lock:
            self._fds[fd] = (slot, pid)  # an earlier pid of the slot stays until it fires
        self._wake()

    def track_program(self, slot: int, name: str) -> None:
        """Ask supervisord for the pid of `name` (off the protocol thread)."""
        if self._rpc is None:
            return
        with self._lock:
            self._names.append((slot, name))
        self._wake()

    def track_all(self) -> None:
        if self._rpc is None:
            return
        try:
            infos = self._rpc.supervisor.getAllProcessInfo()
        except Exception as exc:  # noqa: BLE001 - events still come
            log.warning("cannot ask supervisord for its processes: %s", exc)
            return
        for info in infos:
            slot = slot_of({"processname": info.get("name", ""), "groupname": info.get("group")})
            if slot is not None and info.get("pid", 0) > 1:
                self.track(slot, int(info["pid"]))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _resolve(self) -> None:
        with self._lock:
            names, self._names = self._names, []
        for slot, name in names:
            try:
                info = self._rpc.supervisor.getProcessInfo(name)
            except Exception as exc:  # noqa: BLE001
                log.debug("getProcessInfo(%s): %s", name, exc)
                continue
            if info.get("pid", 0) > 1:
                self.track(slot, int(info["pid"]))

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        registered: set[int] = set()
        while True:
            with self._lock:
                current = set(self._fds)
            for fd in registered - current:
                with contextlib.suppress(KeyError, ValueError):
                    poller.unregister(fd)
            for fd in current - registered:
                poller.register(fd, select.POLLIN)
            registered = current
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._resolve()
                    continue
                with self._lock:
                    entry = self._fds.pop(fd, None)
                if entry is None:
                    continue
                poller.unregister(fd)
                registered.discard(fd)
                os.close(fd)
                try:
                    self._on_exit(*entry)
                except Exception:  # the watch must outlive any one exit
                    log.exception("handling the exit of pid %d failed", entry[1])


def handle_event(headers: dict[str, str], payload: str, host_id: str,
                 revocations: Revocations, watch: ExitWatch | None = None) -> Job | None:
    """Act on one event; the job submitted, if any. Never blocks on etcd."""
    name = headers.get("eventname")
    if name not in DEAD_EVENTS and name not in LIFE_EVENTS:
        return None
    fields = childutils.get_headers(payload.split("\n", 1)[0])
    slot = slot_of(fields)
    if slot is None:
        return None
    pid_text = fields.get("pid", "")
    pid = int(pid_text) if pid_text.isdigit() and int(pid_text) > 1 else None
    if name in LIFE_EVENTS:
        if watch is not None and pid is not None:
            watch.track(slot, pid)
        elif watch is not None:
            watch.track_program(slot, fields["processname"])
        return None
    known = watch.seen(slot) if watch is not None else frozenset()
    return ended(slot, pid, str(name), host_id, revocations, known)


def protocol_stdout() -> TextIO:
    """The protocol's own handle on fd 1; fd 1 and sys.stdout then go to stderr."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def rpc_interface() -> Any:
    """supervisord's XML-RPC interface, when we run under it (it sets the URL)."""
    if "SUPERVISOR_SERVER_URL" not in os.environ:
        return None
    return childutils.getRPCInterface(os.environ)


def serve(host_id: str, revocations: Revocations, stdin: TextIO, stdout: TextIO,
          watch: ExitWatch | None = None) -> int:
    """Answer supervisord until it closes our stdin (it is gone): exit 0."""
    log.info("listening for the end of fleet workers (member ids %s-<slot>)", host_id)
    while True:
        childutils.listener.ready(stdout)
        line = stdin.readline()
        if not line:
            return 0
        try:
            headers = childutils.get_headers(line)
            payload = stdin.read(int(headers["len"]))
        except (ValueError, KeyError):
            log.error("not a supervisord event header: %r; stopping", line[:200])
            return 1
        try:
            handle_event(headers, payload, host_id, revocations, watch)
        except Exception:  # answer supervisord whatever happened
            log.exception("event %s failed", headers.get("eventname"))
        childutils.listener.ok(stdout)
