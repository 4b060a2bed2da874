"""One worker process: session, membership, election, watch, leader duty, reconcile.

The main thread runs one loop over a queue fed by the watch, the session, the
segment runners and the signal handlers, so all decisions are made in one place, in
order, against a view that is never behind what was already acted on. Each session
(lease) is one `_Incarnation`; when the lease is lost everything it held is dropped
and a new incarnation starts from registration.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from fleet import __version__
from fleet.config import Config
from fleet.coord import election, membership, ownership
from fleet.coord.assignment import assign, moved
from fleet.coord.etcd import (
    Changes,
    Etcd,
    EtcdError,
    EtcdUnavailable,
    PrefixWatch,
    Put,
    Resync,
    connect,
    retry,
)
from fleet.coord.keys import Keys
from fleet.coord.session import Session, SessionEvent
from fleet.coord.view import FleetView
from fleet.handler import Handler
from fleet.supervise.childlink import ParentLink
from fleet.work.runner import RunnerExited, SegmentRunner, Watchdog

log = logging.getLogger("fleet.work.worker")

# Segments acquired per round trip (nested transactions; etcd allows 128 ops a level).
ACQUIRE_BATCH = 64


@dataclass(frozen=True)
class _Signal:
    signum: int


@dataclass(frozen=True)
class _SessionNews:
    event: SessionEvent


class Restart(Exception):
    """The current incarnation cannot continue (lease lost); start a new one."""


class Worker:
    """Composes the parts; `run()` returns the process exit code."""

    def __init__(
        self, config: Config, handler: Handler, member_id: str, *, segments_explicit: bool
    ) -> None:
        self.config = config
        self.handler = handler
        self.member_id = member_id
        self.segments_explicit = segments_explicit
        self.keys = Keys(config.etcd.prefix, config.name)
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.stopping = False
        self.etcd: Etcd | None = None
        self.session: Session | None = None
        self.runners: dict[int, SegmentRunner] = {}
        # Runners we stopped waiting for whose call may still be running: the watchdog
        # keeps watching them until their thread ends.
        self.zombies: list[SegmentRunner] = []
        self.segments = config.segments
        self.link = ParentLink.from_env()

    # -- entry ----------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        etcd = self.etcd = connect(self.config.etcd)
        watchdog = Watchdog(self._watched)
        watchdog.start()
        try:
            self.segments = retry(
                lambda: membership.ensure_spec(
                    etcd, self.keys, self.config.segments, self.segments_explicit
                ),
                until=time.monotonic() + max(3.0, etcd.timeout),
                what="reading the fleet spec",
            )
            delay = 0.2
            while not self.stopping:
                try:
                    _Incarnation(self, etcd).run()
                    delay = 0.2
                except Restart as why:
                    log.warning("starting over with a new lease: %s", why)
                except EtcdUnavailable as exc:
                    # Once a member of the fleet, an etcd outage is something to outlast,
                    # not a reason to exit: keep trying until etcd is back or we are told
                    # to stop.
                    log.warning("cannot rejoin yet: %s", exc)
                    delay = min(delay * 2, 5.0)
                if not self.stopping:
                    self._pause(delay)
            return 0
        finally:
            watchdog.stop()
            etcd.close()

    def _pause(self, seconds: float) -> None:
        """Wait between incarnations; drop what the old one left queued, keep signals."""
        until = time.monotonic() + seconds
        while True:
            try:
                item = self.queue.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                return
            if isinstance(item, _Signal):
                log.info("%s: stopping", signal.Signals(item.signum).name)
                self.stopping = True
                return

    def _watched(self) -> list[SegmentRunner]:
        self.zombies = [r for r in self.zombies if r.thread.is_alive()]
        return [*self.runners.values(), *self.zombies]

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # SimpleQueue.put is reentrant, so it is safe in a signal handler.
        self.queue.put(_Signal(signum))

    def member_info(self, lease_id: int) -> dict[str, Any]:
        slot = os.environ.get("FLEET_WORKER_INDEX")
        return {
            "id": self.member_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slot": int(slot) if slot and slot.isdigit() else None,
            "lease": lease_id,
            "started": time.time(),
            "version": __version__,
            "weight": self.config.weight,
        }


class _Incarnation:
    """Everything that lives as long as one lease."""

    def __init__(self, worker: Worker, etcd: Etcd) -> None:
        self.w = worker
        self.etcd = etcd
        self.keys = worker.keys
        self.member_id = worker.member_id
        self.session = Session(etcd, worker.config.lease_ttl, self._session_event)
        self.view: FleetView | None = None
        self.watch: PrefixWatch | None = None
        self.candidate_rev = 0
        self.leading = False
        self.leader_id: str | None = None
        self.pending_since: float | None = None
        self.retry_at: float | None = None
        self.releasing: set[int] = set()
        self.draining = False
        self.drain_deadline = 0.0
        self.etcd_gone = False

    def _session_event(self, event: SessionEvent) -> None:
        self.w.queue.put(_SessionNews(event))

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.w.config
        self.session.start(until=time.monotonic() + max(3.0, cfg.lease_ttl))
        self.w.session = self.session
        lease = self.session.lease_id
        try:
            membership.register(
                self.etcd,
                self.keys,
                self.member_id,
                self.w.member_info(lease),
                lease,
                wait=self.session.ttl + 2.0,
            )
            self.candidate_rev = election.campaign(self.etcd, self.keys, lease, self.member_id)
            snapshot = self.etcd.get_prefix(self.keys.root)
        except EtcdUnavailable as exc:
            self._drop(revoke=True)
            raise Restart(f"etcd unavailable while joining: {exc}") from None
        self.view = FleetView.from_snapshot(self.keys, snapshot, track_checkpoints=False)
        self.watch = PrefixWatch(self.etcd, self.keys.root, snapshot.revision + 1, self.w.queue.put)
        self.watch.start()
        log.info(
            "joined fleet %r as %s (lease %x, ttl %ds)",
            cfg.name,
            self.member_id,
            lease,
            self.session.ttl,
        )
        if self.w.link is not None:
            self.w.link.ready(lease)
        try:
            self._loop()
        finally:
            self.watch.stop()

    def _report(self) -> None:
        """Heartbeat to the supervisor from this loop; stop if the supervisor is gone."""
        link = self.w.link
        if link is None:
            return
        if not link.parent_alive() and not self.draining:
            log.warning("supervisor %d is gone: stopping", link.parent_pid)
            self._on_signal(signal.SIGTERM)
            return
        current = self.view.assignment() if self.view else None
        link.heartbeat(
            owned=sum(1 for r in self.w.runners.values() if not r.stopping),
            assigned=len(current.members.get(self.member_id, [])) if current else 0,
            leader=self.leader_id,
            segments=self.w.segments,
        )

    def _loop(self) -> None:
        decide = True
        while True:
            if decide:
                self._step()
            self._report()
            if self.draining and not self.w.runners:
                self._finish_graceful()
                return
            item = self._next_item()
            if item is None:
                decide = True  # a timer: settle window, retry, deadline, periodic check
                continue
            decide = self._handle(item)
            # Drain what is already queued before deciding: one decision per burst.
            while True:
                try:
                    decide = self._handle(self.w.queue.get_nowait()) or decide
                except queue.Empty:
                    break

    def _next_item(self) -> object | None:
        now = time.monotonic()
        wake = [now + 1.0, self.session.deadline]
        if self.pending_since is not None:
            wake.append(self.pending_since + self.w.config.settle)
        if self.retry_at is not None:
            wake.append(self.retry_at)
        try:
            return self.w.queue.get(timeout=max(0.0, min(wake) - now))
        except queue.Empty:
            return None

    def _handle(self, item: object) -> bool:
        """Apply one queued item; whether it can change a decision.

        Checkpoint commits are most of the watch traffic and never change what this
        member should do, so a burst of only those does not re-run the decision step.
        """
        assert self.view is not None
        if isinstance(item, Changes):
            self.view.apply(item.changes, item.revision)
            checkpoints = self.keys.checkpoints
            return any(not c.kv.key.startswith(checkpoints) for c in item.changes)
        elif isinstance(item, Resync):
            log.info(
                "watch history compacted: re-read the fleet at revision %d", item.snapshot.revision
            )
            self.view.reset(item.snapshot)
        elif isinstance(item, RunnerExited):
            runner = self.w.runners.get(item.segment)
            if runner is not None and runner.token == item.token:
                del self.w.runners[item.segment]
            self.releasing.discard(item.segment)
            log.info(
                "segment %d %s (token %d)",
                item.segment,
                "released" if item.released else "dropped",
                item.token,
            )
        elif isinstance(item, _SessionNews):
            if item.event == "recovered" and self.watch is not None:
                self.watch.restart()
        elif isinstance(item, _Signal):
            self._on_signal(item.signum)
        return True

    def _on_signal(self, signum: int) -> None:
        if self.draining:
            if signum == signal.SIGINT:
                log.warning("second interrupt: stopping now")
                self._drop(revoke=True)
                os._exit(0)
            return
        log.info("%s: stopping gracefully", signal.Signals(signum).name)
        self.w.stopping = True
        self.draining = True
        self.drain_deadline = time.monotonic() + self.w.config.graceful_timeout
        try:
            # Leave first: the next leader reassigns while our calls finish, and the new
            # owners acquire the moment each of our releases lands.
            lease = self.session.lease_id
            membership.leave(self.etcd, self.keys, self.member_id, lease)
            election.resign(self.etcd, self.keys, lease, self.candidate_rev)
        except EtcdError as exc:
            # etcd is gone (perhaps with a dead supervisor): stop without waiting on it;
            # our keys go when the lease expires, if anyone is left to care.
            log.warning("could not leave cleanly: %s", exc)
            self.etcd_gone = True
        for runner in self.w.runners.values():
            runner.stop(release=not self.etcd_gone)

    def _finish_graceful(self) -> None:
        self._drop(revoke=not self.etcd_gone)
        log.info("stopped")

    def _drop(self, revoke: bool) -> None:
        """Stop every runner without releasing, wait for them, then end the session.

        The lease is revoked only when no call can still be running: revoking it while
        a call runs would let a new owner start before this one stops.
        """
        for runner in self.w.runners.values():
            runner.stop(release=False)
        for runner in list(self.w.runners.values()):
            runner.thread.join(timeout=max(0.0, self.session.deadline - time.monotonic()) + 1.0)
        self.w.zombies.extend(r for r in self.w.runners.values() if r.thread.is_alive())
        self.w.runners.clear()
        if revoke and self.w.zombies:
            log.warning(
                "%d handler calls still running: leaving the lease to expire", len(self.w.zombies)
            )
            revoke = False
        self.session.close(revoke=revoke)

    # -- decisions ------------------------------------------------------------------------

    def _step(self) -> None:
        if self.session.lost:
            self._drop(revoke=not self.etcd_gone)
            if self.draining:
                self.w.stopping = True
                return
            raise Restart("lease lost")
        if self.draining:
            if time.monotonic() >= self.drain_deadline:
                log.warning("graceful timeout: abandoning %d running calls", len(self.w.runners))
                self.w.zombies.extend(self.w.runners.values())
                self.w.runners.clear()
            return
        assert self.view is not None
        if self.keys.candidate(self.session.lease_id) not in self.view.kvs:
            raise Restart("our election key disappeared")
        self._lead()
        self._reconcile()

    def _lead(self) -> None:
        assert self.view is not None
        leader = self.view.leader()
        leading = leader is not None and leader.create_revision == self.candidate_rev
        leader_id = leader.value.decode() if leader else None
        if leader_id != self.leader_id:
            self.leader_id = leader_id
            log.info("leader is %s%s", leader_id or "nobody", " (me)" if leading else "")
        if leading != self.leading:
            self.leading = leading
            self.pending_since = time.monotonic() if leading else None
        if not leading:
            return
        current = self.view.assignment()
        members = {m.id: m.weight for m in self.view.members().values()}
        desired = assign(self.w.segments, members, current.members if current else {})
        if current is not None and desired == current.members:
            self.pending_since = None
            return
        now = time.monotonic()
        if self.pending_since is None:
            self.pending_since = now
        if current is not None and now < self.pending_since + self.w.config.settle:
            return
        generation = (current.generation if current else 0) + 1
        value = json.dumps(
            {"generation": generation, "leader": self.member_id, "members": desired},
            sort_keys=True,
        ).encode()
        guard = election.leader_guard(self.keys, self.session.lease_id, self.candidate_rev)
        try:
            res = self.etcd.txn([guard], [Put(self.keys.assignment, value)])
        except EtcdUnavailable as exc:
            log.warning("assignment write failed: %s", exc)
            self.retry_at = now + 0.5
            return
        self.pending_since = None
        if res.succeeded:
            count = moved(current.members, desired) if current else 0
            log.info(
                "assignment generation %d: %d members, %d segments moved",
                generation,
                len(desired),
                count,
            )
        else:
            log.warning("assignment write rejected: no longer the leader")

    def _reconcile(self) -> None:
        assert self.view is not None
        current = self.view.assignment()
        mine = set(current.members.get(self.member_id, [])) if current else set()
        owners = self.view.owners()
        runners = self.w.runners
        for seg, runner in list(runners.items()):
            owner = owners.get(seg)
            caught_up = self.view.revision >= runner.token
            if caught_up and (owner is None or owner.token != runner.token):
                if not runner.stopping:
                    log.warning(
                        "segment %d: ownership (token %d) gone in etcd; stopping", seg, runner.token
                    )
                    runner.stop(release=False)
            elif seg not in mine and not runner.stopping:
                runner.stop(release=True)
                self.releasing.add(seg)
        if current is None:
            return
        self.retry_at = None
        lease = self.session.lease_id
        # A free segment, or one whose owner key is already ours without a runner (an
        # acquire that landed although its answer was lost): acquire returns its token.
        free = [
            s
            for s in sorted(mine - runners.keys() - self.releasing)
            if s not in owners or owners[s].lease == lease
        ]
        if not free or not self.session.alive():
            return
        for i in range(0, len(free), ACQUIRE_BATCH):
            batch = free[i : i + ACQUIRE_BATCH]
            try:
                got = ownership.acquire_many(
                    self.etcd, self.keys, batch, self.member_id, lease, current.mod_revision
                )
            except EtcdUnavailable as exc:
                log.warning("acquire of segments %s failed: %s", batch, exc)
                self.retry_at = time.monotonic() + 0.5
                return
            for seg, acquired in sorted(got.items()):
                if acquired is not None:
                    self._start_runner(seg, acquired)

    def _start_runner(self, seg: int, acquired: ownership.Acquired) -> None:
        log.info("segment %d acquired (token %d)", seg, acquired.token)
        runner = SegmentRunner(
            segment=seg,
            token=acquired.token,
            checkpoint=acquired.checkpoint,
            member_id=self.member_id,
            handler=self.w.handler,
            interval=self.w.config.interval,
            session=self.session,
            etcd=self.etcd,
            keys=self.keys,
            post=self.w.queue.put,
        )
        self.w.runners[seg] = runner
        runner.start()
