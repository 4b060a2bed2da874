"""`fleet up`: one host's supervisor, in the manner of gunicorn's arbiter.

One loop, a few verbs: `spawn` children, `reap` the exited ones (revoking a dead
child's lease at once, so its segments move in milliseconds instead of a TTL),
`murder` the hung ones, `manage` the slot count. Signals are queued by their handlers
and woken through a self-pipe; the loop dispatches each to `handle_<name>`. No etcd
logic lives here beyond revoking leases: the workers coordinate among themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

import psutil

from fleet.config import Config
from fleet.coord.etcd import Etcd, EtcdError
from fleet.server.embedded import (
    DEFAULT_CLIENT_PORT,
    DEFAULT_PEER_PORT,
    EmbeddedEtcd,
    crash_unsafe_version,
    find_etcd_binary,
)
from fleet.supervise import slots
from fleet.supervise.control import ControlServer, RunDir
from fleet.supervise.slots import Slot, State

log = logging.getLogger("fleet.supervise.supervisor")

EXIT_CONFIG = 2
KILL_AFTER = 5.0  # SIGABRT of a hung child is followed by SIGKILL after this
RSS_EVERY = 5.0
SIGNALS = ("TERM", "INT", "QUIT", "TTIN", "TTOU", "HUP", "CHLD")


class AlreadyRunning(Exception):
    """Another `fleet up` owns this directory."""


@dataclass
class Child:
    """The supervisor's handles on one running child process."""

    slot: Slot
    popen: subprocess.Popen[bytes]
    status_fd: int
    output_fd: int
    status_buf: bytes = b""
    output_buf: bytes = b""
    kill_at: float | None = None
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # the last heartbeat's contents


@dataclass
class RollingRestart:
    pending: list[int] = field(default_factory=list)
    current: int | None = None


class Supervisor:
    def __init__(
        self, config: Config, worker_flags: list[str], run_dir: RunDir, out: TextIO = sys.stdout
    ) -> None:
        self.config = config
        self.worker_flags = worker_flags
        self.run_dir = run_dir
        self.out = out
        self.workers = config.supervisor.workers
        self.policy = slots.RespawnPolicy()
        self.rng = random.Random()
        self.slots: dict[int, Slot] = {}
        self.children: dict[int, Child] = {}  # pid -> child
        self.sig_queue: list[int] = []
        self.stopping: str | None = None  # None, "graceful" or "quick"
        self.exit_code = 0
        self.stop_deadline = 0.0
        self.rolling = RollingRestart()
        self.converged = False
        self.unsettled_since = time.monotonic()  # start of the current disturbance
        self.last_rss_check = 0.0
        self.etcd_server: EmbeddedEtcd | None = None
        self.etcd: Etcd | None = None
        self.endpoints: tuple[str, ...] = config.etcd.endpoints
        self.id_prefix = config.member_id or socket.gethostname()
        self.control: ControlServer | None = None
        self.wake_r, self.wake_w = os.pipe()

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        other = self.run_dir.running_pid()
        if other is not None:
            raise AlreadyRunning(
                f"fleet up is already running here (pid {other}); use fleet status, "
                f"fleet scale or fleet down"
            )
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        self._install_signals()
        try:
            self._start_etcd()
            self.etcd = Etcd(self.endpoints, timeout=2.0)
            self.run_dir.write(
                {
                    "pid": os.getpid(),
                    "etcd": list(self.endpoints),
                    "name": self.config.name,
                    "prefix": self.config.etcd.prefix,
                }
            )
            self.control = ControlServer(self.run_dir.sock)
            self._say(f"etcd at {','.join(self.endpoints)}; starting {self.workers} workers")
            while True:
                self._loop_once()
                if self.stopping and not self.children:
                    break
            return self.exit_code
        finally:
            self._shutdown()

    def _start_etcd(self) -> None:
        if self.endpoints:
            return
        server = EmbeddedEtcd(
            self.run_dir.etcd_data.resolve(),
            log_path=self.run_dir.root / "etcd.log",
            die_with_parent=True,
        )
        # FLEET_EMBEDDED_PORT=0 asks for any free port (tests, several fleets on one host).
        if os.environ.get("FLEET_EMBEDDED_PORT") != "0":
            server.prefer_ports(DEFAULT_CLIENT_PORT, DEFAULT_PEER_PORT)
        unsafe = crash_unsafe_version(find_etcd_binary())
        if unsafe:
            self._say(
                f"warning: embedded etcd {unsafe} can lose acknowledged writes if it is killed "
                "(etcd issue 13766); install etcd >= 3.5.3 or 3.4.x (e.g. Debian's etcd-server)"
            )
        server.start()
        self.etcd_server = server
        self.endpoints = (server.endpoint,)

    def _shutdown(self) -> None:
        for child in list(self.children.values()):
            self._kill_group(child, signal.SIGKILL)
        if self.control is not None:
            self.control.close()
        if self.etcd is not None:
            self.etcd.close()
        if self.etcd_server is not None:
            self.etcd_server.stop()
        self.run_dir.clear()
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _say(self, text: str) -> None:
        print(f"fleet | {text}", file=self.out, flush=True)

    # -- the loop -------------------------------------------------------------------------

    def _loop_once(self) -> None:
        fds: list[int] = [self.wake_r]
        if self.control is not None:
            fds.append(self.control.fileno())
        for child in self.children.values():
            fds += [child.status_fd, child.output_fd]
        try:
            readable, _, _ = select.select(fds, [], [], 0.2)
        except InterruptedError:
            readable = []
        if self.wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 4096)
        while self.sig_queue:
            name = signal.Signals(self.sig_queue.pop(0)).name[3:].lower()
            getattr(self, f"handle_{name}")()
        for child in list(self.children.values()):
            if child.status_fd in readable:
                self._read_status(child)
            if child.output_fd in readable:
                self._read_output(child)
        if self.control is not None and self.control.fileno() in readable:
            self.control.serve_one(self.dispatch)
        self.reap()
        self.murder()
        self.manage()
        self._report_convergence()

    def _install_signals(self) -> None:
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._queue_signal)

    def _queue_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.sig_queue.append(signum)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b".")

    # -- signal handlers ------------------------------------------------------------------

    def handle_term(self) -> None:
        self.stop("graceful")

    def handle_int(self) -> None:
        self.stop("quick" if self.stopping else "graceful")

    def handle_quit(self) -> None:
        self.stop("quick")

    def handle_ttin(self) -> None:
        self.scale(self.workers + 1)

    def handle_ttou(self) -> None:
        self.scale(max(1, self.workers - 1))

    def handle_hup(self) -> None:
        self.restart(None)

    def handle_chld(self) -> None:
        pass  # reap() runs every iteration

    # -- verbs ----------------------------------------------------------------------------

    def stop(self, how: str) -> None:
        if self.stopping == "quick" or (self.stopping == how):
            return
        self.stopping = how
        self._say(f"stopping ({how})")
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout + 2.0
        for child in self.children.values():
            if how == "quick":
                self._kill_group(child, signal.SIGKILL)
            else:
                self._term(child)

    def scale(self, workers: int) -> None:
        if workers != self.workers:
            self._say(f"scaling {self.workers} -> {workers} workers")
        self.workers = workers
        self._unsettle()

    def restart(self, slot: int | None) -> None:
        indexes = [slot] if slot is not None else sorted(i for i in self.slots if i < self.workers)
        self.rolling.pending += [i for i in indexes if i not in self.rolling.pending]
        self._say(f"rolling restart of slots {indexes}")

    def spawn(self, slot: Slot) -> None:
        status_r, status_w = os.pipe()
        out_r, out_w = os.pipe()
        env = dict(os.environ)
        env.update(
            {
                "FLEET_WORKER_INDEX": str(slot.index),
                "FLEET_SUPERVISOR_FD": str(status_w),
                "FLEET_SUPERVISOR_PID": str(os.getpid()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        argv = [
            sys.executable,
            "-m",
            "fleet",
            "worker",
            "--id",
            f"{self.id_prefix}-{slot.index}",
            "--etcd",
            ",".join(self.endpoints),
            *self.worker_flags,
        ]
        try:
            popen = subprocess.Popen(
                argv,
                env=env,
                pass_fds=(status_w,),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                start_new_session=True,
            )
        finally:
            os.close(status_w)
            os.close(out_w)
        for fd in (status_r, out_r):
            os.set_blocking(fd, False)
        slots.spawned(slot, popen.pid, time.monotonic())
        self.children[popen.pid] = Child(slot, popen, status_r, out_r)
        log.debug("spawned slot %d pid %d", slot.index, popen.pid)

    def reap(self) -> None:
        for pid, child in list(self.children.items()):
            code = child.popen.poll()
            if code is None:
                continue
            self._read_status(child)
            self._read_output(child, final=True)
            os.close(child.status_fd)
            os.close(child.output_fd)
            del self.children[pid]
            slot = child.slot
            lease = slot.lease
            if lease and code != 0:
                self._revoke(lease)
            state = slots.exited(slot, code, time.monotonic(), self.policy, self.rng)
            detail = f" ({child.reason})" if child.reason else ""
            if state is State.FATAL:
                self._say(
                    f"w{slot.index} exited: {slot.last_exit}{detail}; FATAL: {slot.fatal_reason}"
                )
                self._give_up_on_bad_config()
            elif state is State.BACKOFF:
                delay = (slot.next_start or 0) - time.monotonic()
                self._say(
                    f"w{slot.index} exited: {slot.last_exit}{detail}; respawn in {delay:.1f}s"
                )
            elif not self.stopping:
                self._say(f"w{slot.index} stopped: {slot.last_exit}")
            self._unsettle()

    def _give_up_on_bad_config(self) -> None:
        """Every slot refusing its configuration is not something a respawn will fix."""
        live = [s for i, s in self.slots.items() if i < self.workers]
        code = self.policy.config_error_code
        if live and all(
            s.state is State.FATAL and s.last_exit and s.last_exit.startswith(f"exit {code}")
            for s in live
        ):
            self._say("every worker refused its configuration (see above): giving up")
            self.exit_code = EXIT_CONFIG
            self.stop("quick")

    def murder(self) -> None:
        now = time.monotonic()
        sup = self.config.supervisor
        check_rss = sup.max_rss_mb and now - self.last_rss_check >= RSS_EVERY
        if check_rss:
            self.last_rss_check = now
        for child in self.children.values():
            if child.kill_at is not None:
                if now >= child.kill_at:
                    self._kill_group(child, signal.SIGKILL)
                    child.kill_at = now + KILL_AFTER
                continue
            reason = slots.heartbeat_overdue(
                child.slot, now, sup.heartbeat_timeout, sup.startup_timeout
            )
            if reason is not None:
                self._say(f"w{child.slot.index} (pid {child.popen.pid}) {reason}: killing it")
                child.reason = reason
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.popen.pid, signal.SIGABRT)
                    os.kill(child.popen.pid, signal.SIGCONT)
                child.kill_at = now + KILL_AFTER
            elif check_rss and child.slot.state is not State.STOPPING:
                rss = _rss_mb(child.popen.pid)
                if rss is not None and rss > sup.max_rss_mb:
                    self._say(
                        f"w{child.slot.index} uses {rss:.0f} MiB > {sup.max_rss_mb}: recycling it"
                    )
                    child.reason = f"rss {rss:.0f} MiB"
                    self._term(child, expected=True)
        if self.stopping and now >= self.stop_deadline:
            for child in self.children.values():
                self._kill_group(child, signal.SIGKILL)

    def manage(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for index in range(self.workers):
            slot = self.slots.setdefault(index, Slot(index))
            if slot.state is State.STOPPED or (
                slot.state in (State.BACKOFF, State.FATAL) and slots.due(slot, now)
            ):
                if slot.state is State.FATAL:
                    self._say(f"w{index}: retrying after FATAL cool-down")
                self.spawn(slot)
        for index, slot in sorted(self.slots.items(), reverse=True):
            if index < self.workers:
                continue
            child = self._child_of(slot)
            if child is None:
                del self.slots[index]
            elif slot.state is not State.STOPPING:
                self._term(child, expected=True)
        self._advance_rolling_restart()

    def _advance_rolling_restart(self) -> None:
        rr = self.rolling
        if rr.current is not None:
            slot = self.slots.get(rr.current)
            if slot is not None and not self._settled(slot):
                return
            rr.current = None
        if not rr.pending or not self._all_settled():
            return
        index = rr.pending.pop(0)
        slot = self.slots.get(index)
        child = self._child_of(slot) if slot else None
        if child is None or slot is None:
            return
        rr.current = index
        self._say(f"restarting w{index}")
        self._term(child, expected=True)

    # -- helpers --------------------------------------------------------------------------

    def _child_of(self, slot: Slot) -> Child | None:
        return self.children.get(slot.pid) if slot.pid is not None else None

    def _settled(self, slot: Slot) -> bool:
        """READY and holding its whole share (what a rolling restart waits for)."""
        child = self._child_of(slot)
        if child is None or slot.state is not State.READY or "segments" not in child.info:
            return False
        has_share = slot.assigned > 0 or int(child.info["segments"]) < self.workers
        return has_share and slot.owned == slot.assigned

    def _all_settled(self) -> bool:
        """Every slot that can run is READY with its share (a FATAL slot waits out its
        cool-down and must not hold up a rolling restart of the others)."""
        live = [s for i, s in self.slots.items() if i < self.workers and s.state is not State.FATAL]
        return bool(live) and all(self._settled(s) for s in live)

    def _term(self, child: Child, expected: bool = True) -> None:
        if expected:
            slots.stopping(child.slot)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.popen.pid, signal.SIGTERM)
        child.kill_at = time.monotonic() + self.config.graceful_timeout + KILL_AFTER

    def _kill_group(self, child: Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.popen.pid, sig)

    def _revoke(self, lease: int) -> None:
        """Delete a dead child's keys now rather than after its TTL."""
        if self.etcd is None:
            return
        try:
            self.etcd.revoke(lease)
            log.debug("revoked lease %x", lease)
        except EtcdError as exc:
            self._say(f"could not revoke lease {lease:x}: {exc} (it expires by itself)")

    def _read_status(self, child: Child) -> None:
        data = _read_all(child.status_fd)
        if not data:
            return
        child.status_buf += data
        *lines, child.status_buf = child.status_buf.split(b"\n")
        now = time.monotonic()
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            slot = child.slot
            if msg.get("ready"):
                slots.ready(slot, int(msg.get("lease", 0)), now)
            elif msg.get("hb"):
                slots.heartbeat(slot, now, owned=msg.get("owned"), assigned=msg.get("assigned"))
                child.info.update(msg)

    def _read_output(self, child: Child, final: bool = False) -> None:
        data = _read_all(child.output_fd)
        child.output_buf += data
        *lines, child.output_buf = child.output_buf.split(b"\n")
        if final and child.output_buf:
            lines.append(child.output_buf)
            child.output_buf = b""
        prefix = f"w{child.slot.index} | "
        for line in lines:
            self.out.write(prefix + line.decode(errors="replace") + "\n")
        if lines:
            self.out.flush()

    def _unsettle(self) -> None:
        if self.converged:
            self.converged = False
            self.unsettled_since = time.monotonic()

    def _report_convergence(self) -> None:
        """One summary line each time the fleet becomes whole again."""
        if self.stopping or self.converged or not self._all_settled():
            return
        if len(self.children) != self.workers:
            return  # children being scaled away still hold (or release) segments
        infos = [c.info for c in self.children.values()]
        segments = max((int(i.get("segments") or 0) for i in infos), default=0)
        owned = sum(int(i.get("owned") or 0) for i in infos)
        leaders = {i.get("leader") for i in infos}
        if not segments or owned != segments or len(leaders) != 1 or None in leaders:
            return
        self.converged = True
        took = time.monotonic() - self.unsettled_since
        self._say(
            f"{self.workers}/{self.workers} workers ready, {owned}/{segments} segments owned, "
            f"leader {leaders.pop()}, {took:.1f} s"
        )

    # -- control socket -------------------------------------------------------------------

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "ps":
            now = time.monotonic()
            rows = []
            for index in sorted(self.slots):
                row = slots.as_row(self.slots[index], now)
                pid = self.slots[index].pid
                row["rss_mb"] = _rss_mb(pid) if pid else None
                row["member"] = f"{self.id_prefix}-{index}"
                rows.append(row)
            return {
                "ok": True,
                "pid": os.getpid(),
                "workers": self.workers,
                "etcd": list(self.endpoints),
                "slots": rows,
            }
        if cmd == "scale":
            workers = request.get("workers")
            if not isinstance(workers, int) or not 1 <= workers <= 1024:
                return {
                    "ok": False,
                    "error": f"workers = {workers!r}: expected an integer from 1 to 1024",
                }
            self.scale(workers)
            return {"ok": True, "workers": workers}
        if cmd == "restart":
            slot = request.get("slot")
            if slot is not None and slot not in self.slots:
                return {
                    "ok": False,
                    "error": f"slot {slot!r}: expected one of {sorted(self.slots)}",
                }
            self.restart(slot)
            return {"ok": True}
        if cmd == "down":
            self.stop("graceful")
            return {"ok": True, "pid": os.getpid()}
        return {
            "ok": False,
            "error": f"unknown command {cmd!r}: expected ps, scale, restart or down",
        }


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _rss_mb(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)
    except psutil.Error:
        return None
