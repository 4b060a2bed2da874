"""One incarnation of a worker: everything that lives as long as one lease.

Join (lease, member key, candidacy, snapshot, watch), then one loop over the worker's
queue: apply what the watch delivered, decide (plan.py), act, heartbeat. When the lease
is gone, or any key it holds is deleted behind our back, every runner is stopped at once
(the session is declared lost, so no new call starts), the runners are waited for, and
the incarnation ends with `Restart`; the worker then starts a new one.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
from typing import TYPE_CHECKING

from fleet import clock
from fleet.coord import election, membership, ownership
from fleet.coord.compaction import Compactor
from fleet.coord.etcd import Changes, Etcd, EtcdError, EtcdUnavailable, Put, Resync
from fleet.coord.session import Session, SessionEvent
from fleet.coord.view import FleetView
from fleet.coord.watch import PrefixWatch
from fleet.work import plan
from fleet.work.health import HealthPublisher, failing_of, heartbeat_rows
from fleet.work.runner import RunnerExited, SegmentRunner

if TYPE_CHECKING:
    from fleet.work.worker import Worker

log = logging.getLogger("fleet.work.worker")

# Segments acquired per round trip (nested transactions; etcd allows 128 ops a level).
ACQUIRE_BATCH = 64
ORPHAN_RETRY = 1.0


class Restart(Exception):
    """The current incarnation cannot continue (lease lost); start a new one."""


class Signal:
    def __init__(self, signum: int) -> None:
        self.signum = signum


class SessionNews:
    def __init__(self, event: SessionEvent) -> None:
        self.event = event


def refused_lease(exc: EtcdError) -> bool:
    """etcd refused a write because the lease it names no longer exists."""
    return "lease not found" in str(exc).lower()


class Incarnation:
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
        # Ownerships we gave back whose delete the view may not show yet: seg -> token.
        self.released: dict[int, int] = {}
        self.orphan_tried: dict[tuple[int, int], float] = {}
        self.last_step = 0.0
        self.draining = False
        self.drain_deadline = 0.0
        self.etcd_gone = False
        self.health: HealthPublisher | None = None  # our failing segments, in etcd
        self.compactor = Compactor(
            etcd,
            interval=worker.config.etcd.compact_interval,
            window=worker.config.etcd.compact_window,
        )

    def _session_event(self, event: SessionEvent) -> None:
        self.w.queue.put(SessionNews(event))

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.w.config
        self._start_session(until=clock.now() + max(3.0, cfg.lease_ttl))
        self.w.session = self.session
        lease = self.session.lease_id
        self.w.past_leases.add(lease)
        try:
            membership.register(
                self.etcd,
                self.keys,
                self.member_id,
                self.w.member_info(lease),
                lease,
                wait=self.session.ttl + 2.0,
                ours=self.w.past_leases,
            )
            self.candidate_rev = election.campaign(self.etcd, self.keys, lease, self.member_id)
            snapshot = self.etcd.get_prefix(self.keys.root)
        except EtcdUnavailable as exc:
            self._drop(revoke=True)
            raise Restart(f"etcd unavailable while joining: {exc}") from None
        except membership.DuplicateMember:
            self._drop(revoke=True)
            if not self.w.joined_once:
                raise  # a live duplicate at first start: a configuration error (exit 2)
            raise Restart(f"member id {self.member_id!r} is still registered") from None
        except EtcdError as exc:
            self._drop(revoke=not refused_lease(exc))
            if refused_lease(exc) or self.w.joined_once:
                raise Restart(f"etcd refused a join step: {exc}") from None
            raise
        self.w.joined_once = True
        self.health = HealthPublisher(self.etcd, self.keys, self.member_id, lease)
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
        except EtcdError as exc:
            # A refused call (not a transient one: those are retried where they happen),
            # e.g. a write naming a lease etcd no longer has: this lease is done for.
            self.session.lose(f"etcd refused a call: {exc}")
            self._drop(revoke=False)
            raise Restart(str(exc)) from None
        finally:
            self.watch.stop()

    def _start_session(self, until: float) -> None:
        """Grant the lease, heartbeating between attempts: a worker waiting for etcd is
        alive, and its supervisor must not take the silence for a hang."""
        while True:
            try:
                self.session.start(until=min(until, clock.now() + 1.0))
                return
            except EtcdUnavailable:
                if clock.now() >= until:
                    raise
                self.w.beat_rejoining()

    def _report(self) -> None:
        """Failing segments to etcd (rate-limited, never raises); heartbeat to the
        supervisor from this loop; stop if the supervisor is gone."""
        failing = failing_of(r.health for r in self.w.runners.values() if not r.stopping)
        if self.health is not None and not self.draining and self.session.alive():
            self.health.tick(failing)
        link = self.w.link
        if link is None:
            return
        if not link.parent_alive() and not self.draining:
            log.warning("supervisor %d is gone: stopping", link.parent_pid)
            self._on_signal(signal.SIGTERM)
            return
        current = self.view.assignment() if self.view else None
        runners = list(self.w.runners.values())
        now = clock.now()
        ages = [now - r.call_started for r in runners if r.call_started is not None]
        link.heartbeat(
            owned=sum(1 for r in runners if not r.stopping),
            assigned=len(current.members.get(self.member_id, [])) if current else 0,
            in_assignment=current is not None and self.member_id in current.members,
            leader=self.leader_id,
            segments=self.w.segments,
            failing=len(failing),
            oldest_call=int(max(ages)) if ages else None,
            rejoining=False,
            details={"failing_segments": heartbeat_rows(failing)},
        )

    def _loop(self) -> None:
        decide = True
        while True:
            if decide:
                self._step()
                self.last_step = clock.now()
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
            # A steady stream of checkpoint-only bursts must not starve the timers.
            decide = decide or clock.now() >= self._wake_at()

    def _wake_at(self) -> float:
        """When the decision step must run even if nothing arrives."""
        wake = [self.last_step + 1.0, self.session.deadline]
        if self.pending_since is not None:
            wake.append(self.pending_since + self.w.config.settle)
        if self.retry_at is not None:
            wake.append(self.retry_at)
        return min(wake)

    def _next_item(self) -> object | None:
        try:
            return self.w.queue.get(timeout=max(0.0, self._wake_at() - clock.now()))
        except queue.Empty:
            return None

    def _handle(self, item: object) -> bool:
        """Apply one queued item; whether it can change a decision.

        Checkpoint commits are most of the watch traffic and never change what this
        member should do, so a burst of only those does not re-run the decision step.
        """
        assert self.view is not None
        if isinstance(item, Changes):
            self._check_deletes(item)
            self.view.apply(item.changes, item.revision)
            checkpoints = self.keys.checkpoints
            quiet = (checkpoints, self.keys.health)  # what no decision depends on
            return any(not c.kv.key.startswith(quiet) for c in item.changes)
        elif isinstance(item, Resync):
            log.info(
                "watch history compacted: re-read the fleet at revision %d", item.snapshot.revision
            )
            self.view.reset(item.snapshot)
        elif isinstance(item, RunnerExited):
            runner = self.w.runners.get(item.segment)
            if runner is not None and runner.token == item.token:
                self.w.forget_runner(item.segment)
            if item.released:
                self.released[item.segment] = item.token
            log.info(
                "segment %d %s (token %d)",
                item.segment,
                "released" if item.released else "dropped",
                item.token,
            )
        elif isinstance(item, SessionNews):
            if item.event == "recovered" and self.watch is not None:
                self.watch.restart()
        elif isinstance(item, Signal):
            self._on_signal(item.signum)
        return True

    def _check_deletes(self, item: Changes) -> None:
        """A key of our lease deleted by someone else means the lease is gone: no runner
        may start another call, so the session is declared lost right here, before the
        decision step even runs."""
        assert self.view is not None
        if not any(c.kind == "delete" for c in item.changes):
            return  # the common case (checkpoint commits): nothing to look up
        expected = {self.keys.owner(s): t for s, t in self.released.items()}
        for seg, runner in self.w.runners.items():
            if runner.release_on_exit:
                expected[self.keys.owner(seg)] = runner.token
        gone = plan.deleted_keys_of_ours(
            self.view,
            self.keys,
            item.changes,
            self.session.lease_id,
            expected=expected,
            leaving=self.draining,
        )
        if gone:
            self.session.lose(f"key {gone[0]} of our lease was deleted")

    def _on_signal(self, signum: int) -> None:
        if self.draining:
            if signum == signal.SIGINT:
                log.warning("second interrupt: stopping now")
                self._drop(revoke=True)
                self.w.exit_now(0)
            return
        log.info("%s: stopping gracefully", signal.Signals(signum).name)
        self.w.stopping = True
        self.draining = True
        self.drain_deadline = clock.now() + self.w.config.graceful_timeout
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
        runners = list(self.w.runners.values())
        for runner in runners:
            runner.stop(release=False, lost=self.session.lost)
        for runner in runners:
            runner.thread.join(timeout=max(0.0, self.session.deadline - clock.now()) + 1.0)
        zombies = self.w.abandon_runners()
        if revoke and zombies:
            log.warning("%d handler calls still running: leaving the lease to expire", zombies)
            revoke = False
        self.session.close(revoke=revoke)

    # -- decisions ------------------------------------------------------------------------

    def _step(self) -> None:
        assert self.view is not None
        if not self.draining and self.keys.candidate(self.session.lease_id) not in self.view.kvs:
            self.session.lose("our election key disappeared")
        if self.session.lost:
            self._drop(revoke=not self.etcd_gone)
            if self.draining:
                self.w.stopping = True
                return
            raise Restart("lease lost")
        if self.draining:
            if clock.now() >= self.drain_deadline:
                log.warning("graceful timeout: abandoning %d running calls", len(self.w.runners))
                self.w.abandon_runners()
            return
        self.w.adopt_segments(self.view.segments())  # a `fleet resize` lands here
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
            self.pending_since = clock.now() if leading else None
        if not leading:
            return
        # The leader keeps etcd's history bounded (at most one etcd call; never raises).
        self.compactor.observe(self.view.revision)
        self.compactor.maybe_compact()
        current = self.view.assignment()
        segments = self.w.segments
        wanted = plan.next_assignment(self.view, segments)
        if wanted is None:
            self.pending_since = None
            return
        desired, generation = wanted
        now = clock.now()
        if self.pending_since is None:
            self.pending_since = now
        if current is not None and now < self.pending_since + self.w.config.settle:
            return
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
            count, gone = plan.moves(current.members if current else {}, desired, segments)
            log.info(
                "assignment generation %d: %d members, %d segments moved%s",
                generation,
                len(desired),
                count,
                f", {gone} released (resized to {segments})" if gone else "",
            )
        else:
            log.warning("assignment write rejected: no longer the leader")

    def _reconcile(self) -> None:
        assert self.view is not None
        lease = self.session.lease_id
        runners = self.w.runners
        owners = self.view.owners()
        self.released = {
            s: t for s, t in self.released.items() if s in owners and owners[s].token == t
        }
        todo = plan.reconcile(
            self.view,
            self.member_id,
            lease,
            {
                s: plan.Running(r.token, r.stopping, r.release_on_exit)
                for s, r in runners.items()
            },
            self.released,
            segments=self.w.segments,
        )
        for seg in todo.lost:
            log.warning(
                "segment %d: ownership (token %d) gone in etcd; stopping", seg, runners[seg].token
            )
            runners[seg].stop(release=False, lost=True)
        for seg in todo.release:
            runners[seg].stop(release=True)
        self.retry_at = None
        if todo.orphans:
            self._release_orphans(todo.orphans)
        current = self.view.assignment()
        if not todo.acquire or current is None or not self.session.alive():
            return
        for i in range(0, len(todo.acquire), ACQUIRE_BATCH):
            batch = todo.acquire[i : i + ACQUIRE_BATCH]
            try:
                got = ownership.acquire_many(
                    self.etcd, self.keys, batch, self.member_id, lease, current.mod_revision
                )
            except EtcdUnavailable as exc:
                log.warning("acquire of segments %s failed: %s", batch, exc)
                self.retry_at = clock.now() + 0.5
                return
            for seg, acquired in sorted(got.items()):
                if acquired is not None:
                    self._start_runner(seg, acquired)

    def _release_orphans(self, orphans: list[tuple[int, int]]) -> None:
        """Give back owner keys of ours that nobody runs and nobody assigned us (a
        runner's release that failed): otherwise the new assignee waits forever."""
        now = clock.now()
        self.orphan_tried = {k: t for k, t in self.orphan_tried.items() if k in orphans}
        for seg, token in orphans:
            if now < self.orphan_tried.get((seg, token), 0.0) + ORPHAN_RETRY:
                continue
            self.orphan_tried[(seg, token)] = now
            try:
                done = ownership.release(self.etcd, self.keys, seg, self.member_id, token)
            except EtcdUnavailable as exc:
                log.warning("release of segment %d failed: %s", seg, exc)
                done = False
            if done:
                self.released[seg] = token
                log.info("segment %d released (token %d, left over)", seg, token)
            else:
                log.debug("segment %d: left-over owner key not released yet", seg)
                self.retry_at = now + ORPHAN_RETRY

    def _start_runner(self, seg: int, acquired: ownership.Acquired) -> None:
        log.info("segment %d acquired (token %d)", seg, acquired.token)
        runner = SegmentRunner(
            segment=seg,
            acquired=acquired,
            member_id=self.member_id,
            handler=self.w.handler,
            interval=self.w.config.interval,
            session=self.session,
            etcd=self.etcd,
            keys=self.keys,
            post=self.w.queue.put,
        )
        self.w.adopt_runner(seg, runner)
        runner.start()
