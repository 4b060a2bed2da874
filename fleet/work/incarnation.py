"""One incarnation of a worker: everything that lives as long as one lease.

Join (lease, member key, candidacy, snapshot, watch), then one loop over the worker's
queue: apply what the watch delivered, decide (plan.py), act, heartbeat. When the lease
is gone, or any key it holds is deleted behind our back, every runner is stopped at once
(the session is declared lost, so no new call starts), the runners are waited for, and
the incarnation ends with `Restart`; the worker then starts a new one.

Its parts: the leader's (leading.py: who leads, the paced assignment write, compaction)
and the follower's (acquiring.py: acquires, releases of left-over keys). This module is
their composition: join, the loop, the queued items, signals and draining, the lines.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
from typing import TYPE_CHECKING, Any

from fleet import clock
from fleet.coord import election, membership, ownership
from fleet.coord.controlwatch import control_watch
from fleet.coord.etcd import Changes, Etcd, EtcdError, EtcdUnavailable, Resync
from fleet.coord.session import Session, SessionEvent
from fleet.coord.view import FleetView
from fleet.coord.watch import RangeWatch
from fleet.work import lines, pacing, plan
from fleet.work.acquiring import Acquiring
from fleet.work.health import HealthPublisher, failing_of, heartbeat_rows
from fleet.work.leading import Leadership
from fleet.work.runner import RunnerExited, SegmentRunner

if TYPE_CHECKING:
    from fleet.work.worker import Worker

log = logging.getLogger("fleet.work.worker")


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
        self.session = Session(
            etcd,
            worker.config.lease_ttl,
            self._session_event,
            on_round_trip=worker.pressure.observe,
        )
        self.view: FleetView | None = None
        self.watch: RangeWatch | None = None
        self.candidate_rev = 0
        cfg = worker.config
        # The leader's part (leading.py) and the acquires and releases (acquiring.py).
        self.leadership = Leadership(
            etcd,
            self.keys,
            self.member_id,
            self.session,
            settle=cfg.settle,
            compact_interval=cfg.etcd.compact_interval,
            compact_window=cfg.etcd.compact_window,
            rejoined_at=clock.now() if worker.joined_once else None,
        )
        self.acquiring = Acquiring(
            etcd, self.keys, self.member_id, self.session, self._start_runner
        )
        self.last_step = 0.0
        self.draining = False
        self.drain_deadline = 0.0
        self.etcd_gone = False
        self.health: HealthPublisher | None = None  # our failing segments, in etcd
        self.exits = lines.Exits()  # runner exits held for one line per handoff
        self.summary_since = clock.now()  # start of the current summary period

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
                self._member_record(lease),
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
        # Every key but the checkpoints (controlwatch.py); the view drops them from the
        # snapshot too.
        # On the lease's connection (Etcd.liveness): membership, election, assignment and
        # ownership news must not queue behind this worker's own commits and acquires.
        self.watch = control_watch(
            self.etcd.liveness(), self.keys, snapshot.revision + 1, self.w.queue.put
        )
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
            self._log_news(final=True)
            self.watch.stop()

    def _member_record(self, lease: int) -> dict[str, Any]:
        """The worker's record, plus how many workers its `fleet up` starts: a leader
        holds the first assignment back until they are registered (pacing.py)."""
        info = self.w.member_info(lease)
        return {**info, **pacing.member_fields(os.environ, str(info.get("host", "")))}

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
            self.health.tick(failing, self.w.pressure.shedding())
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
            leader=self.leadership.leader_id,
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
            self._log_news()
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
            # A steady stream of bursts that change no decision must not starve the timers.
            decide = decide or clock.now() >= self._wake_at()

    def _wake_at(self) -> float:
        """When the decision step must run even if nothing arrives."""
        wake = [self.last_step + 1.0, self.session.deadline, *self.leadership.timers()]
        if self.acquiring.retry_at is not None:
            wake.append(self.acquiring.retry_at)
        return min(wake)

    def _next_item(self) -> object | None:
        try:
            return self.w.queue.get(timeout=max(0.0, self._wake_at() - clock.now()))
        except queue.Empty:
            return None

    def _handle(self, item: object) -> bool:
        """Apply one queued item; whether it can change a decision.

        Health keys (other members' failing segments) never change what this member
        should do, so a burst of only those does not re-run the decision step. Checkpoint
        commits do not arrive at all: the control watch leaves them out (controlwatch.py);
        their prefix stays in the filter all the same.
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
                self.acquiring.released[item.segment] = item.token
            log.debug(
                "segment %d %s (token %d)",
                item.segment,
                "released" if item.released else "dropped",
                item.token,
            )
            self.exits.add(item.segment, item.token, released=item.released, now=clock.now())
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
            return  # the common case (puts: acquires, assignments, health): nothing to look up
        expected = {self.keys.owner(s): t for s, t in self.acquiring.released.items()}
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

    def _log_news(self, final: bool = False) -> None:
        """The lines that are not about one event: held runner exits (once the handoff
        they belong to is over) and, every `summary_interval`, the calls of the period."""
        now = clock.now()
        if self.exits.pending:
            stopping = not final and any(r.stopping for r in self.w.runners.values())
            for line in self.exits.take(now, waiting=stopping):
                log.info("%s", line)
        every = self.w.config.summary_interval
        if every and not self.draining and not final and now >= self.summary_since + every:
            owned = sum(1 for r in self.w.runners.values() if not r.stopping)
            period = self.w.call_stats.take()
            shed = self.w.pressure.shedding()
            line = lines.summary_line(period, now - self.summary_since, owned)
            log.info("%s", line + (lines.shedding_note(shed.stretch) if shed else ""))
            self.summary_since = now

    def _finish_graceful(self) -> None:
        self._log_news(final=True)
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
            runner.wait(timeout=max(0.0, self.session.deadline - clock.now()) + 1.0)
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
        self.leadership.step(self.view, self.candidate_rev, self.w.segments)
        self.acquiring.step(self.view, self.w.runners, self.w.segments)

    def _start_runner(self, seg: int, acquired: ownership.Acquired) -> None:
        log.debug("segment %d acquired (token %d)", seg, acquired.token)
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
            scheduler=self.w.scheduler,
            call_stats=self.w.call_stats,
            pressure=self.w.pressure,
        )
        self.w.adopt_runner(seg, runner)
        self.w.scheduler.submit(runner)
