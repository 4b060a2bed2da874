"""`fleet up`: one host's supervisor, in the manner of gunicorn's arbiter.

One loop, a few verbs: `spawn` children, `reap` the exited ones (killing what is left
of a dead child's process group, then revoking its lease, so its segments move in
milliseconds instead of a TTL and nothing it started works beside the new owner),
`murder` the hung ones (murder.py: heartbeat, rss, kill deadlines), `manage` the slot
count. Signals are queued by their handlers and woken through a self-pipe; the loop
dispatches each to `handle_<name>`. No etcd logic lives here beyond revoking leases (and
finding the etcd, startup.py): the workers coordinate among themselves.

The loop is the fleet's lifeline, so nothing a child, a control client or the system
does may end it: bad input is answered or dropped (control.py, plumbing.py), a failed
spawn is a BACKOFF, and a bug that still escapes ends in a bounded graceful stop that
reaps and revokes (exit 1), never in a SIGKILL of every worker.
"""

from __future__ import annotations

import logging
import os
import random
import selectors
import signal
import sys
import time
from typing import Any, TextIO

from fleet.config import Config, ConfigError, supervised_id_prefix
from fleet.coord.etcd import Etcd, connect
from fleet.proc import oom_kill_count
from fleet.server.embedded import EmbeddedEtcd
from fleet.supervise import commands, convergence, limits, murder, settle, slots, startup, teardown
from fleet.supervise.children import Child, has_exited, spawn_worker
from fleet.supervise.control import ControlServer
from fleet.supervise.etcdkeeper import EtcdKeeper, ExternalEtcd
from fleet.supervise.output import Output
from fleet.supervise.plumbing import ChildPipes, Status
from fleet.supervise.revoker import Revoker
from fleet.supervise.rundir import AlreadyRunning, RunDir
from fleet.supervise.signals import SignalQueue, StartupInterrupted
from fleet.supervise.slots import Slot, State

__all__ = ["AlreadyRunning", "Supervisor"]

log = logging.getLogger("fleet.supervise.supervisor")

EXIT_CONFIG = 2


class Supervisor:
    def __init__(
        self, config: Config, worker_flags: list[str], run_dir: RunDir, out: TextIO = sys.stdout
    ) -> None:
        self.config = config
        self.worker_flags = worker_flags
        self.run_dir = run_dir
        self.workers = config.supervisor.workers
        self.policy = slots.RespawnPolicy()
        self.rng = random.Random()
        self.oom_kills = oom_kill_count()  # the OOM killer's count at our start
        self.slots: dict[int, Slot] = {}
        self.children: dict[int, Child] = {}  # pid -> child
        self.stopping: str | None = None  # None, "graceful" or "quick"
        self.exit_code = 0
        self.stop_deadline = 0.0
        self.rolling = settle.RollingRestart()
        self.news = convergence.Convergence()  # whether the fleet is whole, lines saying so
        self.ever_ready = False  # bad config is given up on only before this
        self.health = murder.HealthCheck(config.supervisor, config.graceful_timeout, self._say)
        self.etcd_server: EmbeddedEtcd | None = None
        self.keeper: EtcdKeeper | None = None
        # A `fleet etcd` already serving our data dir, used and left alone (issue 10, item 4).
        self.external_etcd: ExternalEtcd | None = None
        self.etcd_note = ""  # why the embedded etcd is not on 2379/2380, for the start line
        self.etcd: Etcd | None = None
        self.revoker: Revoker | None = None
        self.endpoints: tuple[str, ...] = config.etcd.endpoints
        # <hostname>-<hash of the run directory> unless set: unique per directory and host.
        self.id_prefix = supervised_id_prefix(config, str(run_dir.root.resolve().parent))
        # Every line we print goes through this, ours and the children's, in one format.
        self.output = Output(out, config.log_format, self.id_prefix, level=config.log_level)
        self.control: ControlServer | None = None
        self.selector = selectors.DefaultSelector()
        self.signals = SignalQueue(self.selector)

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        limits.raise_soft_limit()
        problem = limits.check(self.workers)
        if problem is not None:
            raise ConfigError(problem)
        self.run_dir.prepare()
        self.run_dir.lock()  # before anything is written: a loser touches nothing
        try:
            self.signals.install()
            warning = self.run_dir.exposure()
            if warning is not None:
                self._say(warning, "warning")
            self.signals.interrupt_startup = True
            try:
                startup.start_etcd(self)
            except StartupInterrupted:
                self._say("stopped while the embedded etcd was starting")
                return 0
            finally:
                self.signals.interrupt_startup = False
            # The same credentials and TLS settings as the workers' clients.
            self.etcd = connect(self.config.etcd, self.endpoints)
            if self.keeper is None:
                # An external etcd that cannot be reached now would only send every
                # worker into a crash loop: say so and exit 3, as `fleet worker` does.
                startup.check_etcd(self, self.etcd)
            self.revoker = Revoker(self.etcd, self._say)
            self.run_dir.write(
                {
                    "pid": os.getpid(),
                    "etcd": list(self.endpoints),
                    "name": self.config.name,
                    "prefix": self.config.etcd.prefix,
                }
            )
            self.control = ControlServer(
                self.run_dir.sock,
                self.selector,
                self.dispatch,
                self.run_dir.bind_path("fleet.sock"),
            )
            self._say(
                f"etcd at {','.join(self.endpoints)}{self.etcd_note}; "
                f"starting {_workers(self.workers)}"
            )
            return self._arbiter()
        finally:
            self._shutdown()

    def _arbiter(self) -> int:
        while True:
            try:
                self._loop_once()
            except Exception as exc:
                return self._crash(exc)
            if self.stopping and not self.children:
                return self.exit_code

    def _crash(self, exc: Exception) -> int:
        return teardown.crash_stop(self, exc)

    def _shutdown(self) -> None:
        teardown.shutdown(self)

    def _say(self, text: str, level: str = "info") -> None:
        # A closed terminal or pipe (EIO, EPIPE) must not end the loop: Output drops it.
        self.output.supervisor_line(text, level)

    # -- the loop -------------------------------------------------------------------------

    def _loop_once(self) -> None:
        for key, mask in self.selector.select(0.2):
            key.data(mask)
        for name in self.signals.take():
            getattr(self, f"handle_{name}")()
        now = time.monotonic()
        if self.control is not None:
            self.control.expire(now)
        if self.keeper is not None and not self.stopping:
            self.keeper.check(now)
        self.reap()
        self.murder()
        self.manage()
        self._report_convergence()

    # -- signal handlers ------------------------------------------------------------------

    def handle_term(self) -> None:
        self.stop("graceful")

    def handle_int(self) -> None:
        self.stop("quick" if self.stopping else "graceful")

    def handle_quit(self) -> None:
        self.stop("quick")

    def handle_ttin(self) -> None:
        problem = limits.check(self.workers + 1, running=len(self.children))
        if problem is not None:
            self._say(f"SIGTTIN ignored: {problem}", "warning")
            return
        self.scale(min(limits.MAX_WORKERS, self.workers + 1))

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
            self._say(f"scaling {self.workers} -> {_workers(workers)}")
        self.workers = workers
        self.news.unsettle()

    def restart(self, slot: int | None) -> None:
        indexes = [slot] if slot is not None else sorted(i for i in self.slots if i < self.workers)
        self.rolling.pending += [i for i in indexes if i not in self.rolling.pending]
        self._say(f"rolling restart of slots {indexes}")

    def spawn(self, slot: Slot) -> None:
        flags = [
            "--id", f"{self.id_prefix}-{slot.index}", "--etcd", ",".join(self.endpoints),
            *self.worker_flags,
        ]  # fmt: skip
        try:
            # `expected`: a later `fleet scale` changes it for the workers spawned after.
            popen, status_r, out_r = spawn_worker(
                slot.index, flags, os.getpid(), expected=self.workers
            )
        except OSError as exc:  # EAGAIN, ENOMEM, EMFILE: try again later, not crash
            state = slots.spawn_failed(slot, str(exc), time.monotonic(), self.policy, self.rng)
            self._say(f"w{slot.index} {slot.last_exit}; {self._next_step(slot, state)}", "error")
            return
        slots.spawned(slot, popen.pid, time.monotonic())
        child = Child(slot, popen)
        self.children[popen.pid] = child
        child.pipes = ChildPipes(
            self.selector, status_r, out_r, slot.index, self.output,
            lambda status: self._on_status(child, status),
        )  # fmt: skip
        log.debug("spawned slot %d pid %d", slot.index, popen.pid)

    def _next_step(self, slot: Slot, state: State) -> str:
        return slots.next_step(slot, state, time.monotonic())

    def _oom_kills_rose(self) -> bool:
        """Whether the kernel's OOM killer struck in our cgroup since we last looked."""
        count = oom_kill_count()
        rose = count is not None and self.oom_kills is not None and count > self.oom_kills
        self.oom_kills = count
        return rose

    def reap(self) -> None:
        for pid, child in list(self.children.items()):
            if not has_exited(pid):
                murder.kill_group_of_dying(child)
                continue
            # The leader is a zombie until we reap it, so its pid (the group id) cannot
            # be reused: kill what it started first, so none of it runs beside the
            # new owner that the revoke below lets in.
            self._kill_group(child, signal.SIGKILL)
            code = child.popen.poll()
            if code is None:  # cannot happen after waitid said so; be safe
                continue
            del self.children[pid]
            if child.pipes is not None:
                child.pipes.close()
            slot = child.slot
            if slot.lease:
                self._revoke(slot.lease)
            oom = self._oom_kills_rose() if code == -signal.SIGKILL else False
            state = slots.exited(slot, code, time.monotonic(), self.policy, self.rng, oom=oom)
            recycled = "recycled" in (slot.last_exit or "")
            detail = f" ({child.reason})" if child.reason and not recycled else ""
            if state in (State.FATAL, State.BACKOFF):
                step = self._next_step(slot, state)
                level = "error" if state is State.FATAL else "warning"
                self._say(f"w{slot.index} exited: {slot.last_exit}{detail}; {step}", level)
                if state is State.FATAL:
                    self._give_up_on_bad_config()
            elif not self.stopping:
                self._say(f"w{slot.index} stopped: {slot.last_exit}")
            self.news.unsettle()

    def _give_up_on_bad_config(self) -> None:
        """Every slot refusing its configuration before the fleet ever ran is not
        something a respawn will fix; after that, it is a bad deploy to wait out."""
        if self.ever_ready:
            return
        live = [s for i, s in self.slots.items() if i < self.workers]
        if slots.all_refused_config(live, self.policy):
            self._say("every worker refused its configuration (see above): giving up", "error")
            self.exit_code = EXIT_CONFIG
            self.stop("quick")

    def murder(self) -> None:
        now = time.monotonic()
        self.health.check(self.children.values(), now)  # hung, frozen, too big (murder.py)
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
        def is_settled(index: int) -> bool:
            slot = self.slots.get(index)
            return slot is None or self._settled(slot)

        index = self.rolling.next_slot(is_settled, self._all_settled())
        if index is None:
            return
        slot = self.slots.get(index)
        child = self._child_of(slot) if slot is not None else None
        if child is None:  # nothing to restart in that slot now
            self.rolling.current = None
            return
        self._say(f"restarting w{index}")
        self._term(child, expected=True)

    # -- helpers --------------------------------------------------------------------------

    def _child_of(self, slot: Slot) -> Child | None:
        return self.children.get(slot.pid) if slot.pid is not None else None

    def _settled(self, slot: Slot) -> bool:
        child = self._child_of(slot)
        return settle.settled(slot, child.info if child else None, self.workers)

    def _all_settled(self) -> bool:
        """Every slot that can run is settled (a FATAL slot waits out its cool-down and
        must not hold up a rolling restart of the others)."""
        live = [s for i, s in self.slots.items() if i < self.workers and s.state is not State.FATAL]
        return bool(live) and all(self._settled(s) for s in live)

    def _term(self, child: Child, expected: bool = True, recycle: str | None = None) -> None:
        murder.term(child, self.config.graceful_timeout, expected, recycle)

    def _kill_group(self, child: Child, sig: int) -> None:
        child.kill_group(sig)

    def _revoke(self, lease: int) -> None:
        """Delete a dead child's keys now rather than after its TTL (off this thread)."""
        if self.revoker is not None:
            self.revoker.submit(lease)

    def _on_status(self, child: Child, status: Status) -> None:
        slot, now = child.slot, time.monotonic()
        if status.ready:
            slots.ready(slot, status.lease, now)
            self.ever_ready = True
        else:
            slots.heartbeat(slot, now, owned=status.owned, assigned=status.assigned)
            child.info.update(convergence.info_of(status))
            if self.news.converged and not self.stopping:
                infos = [c.info for c in self.children.values()]
                line = self.news.failing_line(infos, self.workers, now)
                if line is not None:
                    self._say(line)

    def _report_convergence(self) -> None:
        """One summary line each time the fleet becomes whole again."""
        if self.stopping or self.news.converged or not self._all_settled():
            return
        if len(self.children) != self.workers:
            return  # children being scaled away still hold (or release) segments
        line = self.news.whole_line([c.info for c in self.children.values()], self.workers)
        if line is not None:
            self._say(line)

    # -- control socket -------------------------------------------------------------------

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        return commands.dispatch(self, request)


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"
