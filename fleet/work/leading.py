"""The leader's part of an incarnation: who leads, the assignment write, compaction.

Every member runs this each decision step; only the one whose election key is the
oldest acts. It writes the assignment the view calls for when pacing.py says so (at once
after a quiet `settle` window, coalesced within one; the first one of a fleet held until
the workers `fleet up` starts are registered), and keeps etcd's history bounded. It is a
part of the incarnation (incarnation.py), not a thread: it is given the view, its own
candidacy and the segment count on each step, and owns only the leader's timers.
"""

from __future__ import annotations

import json
import logging

from fleet import clock
from fleet.coord import election
from fleet.coord.compaction import Compactor
from fleet.coord.etcd import Compare, Etcd, EtcdUnavailable, Get, Put
from fleet.coord.keys import Keys
from fleet.coord.session import Session
from fleet.coord.view import FleetView
from fleet.logs import plural
from fleet.work import pacing, plan

log = logging.getLogger("fleet.work.worker")  # the worker's lines, whichever part says them


class Leadership:
    """Whether this member leads, and the leader's writes while it does."""

    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        member_id: str,
        session: Session,
        *,
        settle: float,
        compact_interval: float,
        compact_window: float,
        rejoined_at: float | None = None,
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.member_id = member_id
        self.session = session
        self.leading = False
        self.leader_id: str | None = None
        # When the leader writes: leading edge, bursts coalesced per `settle` (pacing.py).
        self.pacer = pacing.WritePacer(settle)
        self.leading_since = 0.0
        self.hold_until: float | None = None  # first assignment held for workers starting
        self.rejoined_at = rejoined_at  # this incarnation is a rejoin after a lost lease
        self.written_rev = 0  # our last assignment write: act on a view that has it
        self.compactor = Compactor(
            etcd,
            interval=compact_interval,
            window=compact_window,
            probe_key=keys.spec,  # any fleet key: under auth the worker may read it
        )

    def timers(self) -> list[float]:
        """When the leader's part must run even if nothing arrives (the incarnation's
        loop wakes for the earliest)."""
        return [at for at in (self.pacer.due(), self.hold_until) if at is not None]

    def step(self, view: FleetView, candidate_rev: int, segments: int) -> None:
        """Follow who leads (one line when that changes); if it is us, write what the
        view calls for, then maybe compact."""
        leader = view.leader()
        leading = leader is not None and leader.create_revision == candidate_rev
        leader_id = leader.value.decode() if leader else None
        if leader_id != self.leader_id:
            self.leader_id = leader_id
            log.info("leader is %s%s", leader_id or "nobody", " (me)" if leading else "")
        if leading != self.leading:
            self.leading = leading
            self.leading_since = clock.now()
        if not leading:
            self.pacer.nothing_to_write()
            self.hold_until = None
            return
        self._write_assignment(view, candidate_rev, segments)
        # The leader keeps etcd's history bounded (at most one etcd call; never raises);
        # after the assignment, so that a compaction never delays a failover.
        self.compactor.observe(view.revision)
        self.compactor.maybe_compact()

    def _write_assignment(self, view: FleetView, candidate_rev: int, segments: int) -> None:
        """Write the assignment the view calls for, when pacing.py says so: at once after
        a quiet `settle` window, coalesced within one; the first one of a fleet held
        until the workers `fleet up` starts are registered (bounded)."""
        if view.revision < self.written_rev:
            return  # our last write is not in the view yet; its arrival wakes us
        wanted = plan.next_assignment(view, segments)
        if wanted is None:
            self.pacer.nothing_to_write()
            self.hold_until = None
            return
        now = clock.now()
        current = view.assignment()
        members = view.members()
        assigned = current.members if current else None
        hold = pacing.first_assignment_hold(
            {m.id: m.info for m in members.values()},
            cold=pacing.nothing_to_keep(assigned, members),
            leading_since=self.leading_since,
            now=now,
        )
        why = "the workers being started"
        if hold is None:
            hold = pacing.rejoin_hold(assigned, members, rejoined_at=self.rejoined_at, now=now)
            why = "the members of the assignment to rejoin"
        if hold is not None:
            if self.hold_until is None:
                log.info(
                    "assignment: waiting up to %.1f s for %s (%d registered)",
                    hold - now,
                    why,
                    len(members),
                )
            self.hold_until = hold
            self.pacer.nothing_to_write()  # the hold's end is the one timer to wake for
            return
        self.hold_until = None
        self.pacer.changed(now)
        if not self.pacer.should_write(now):
            return  # within `settle` of our last write: coalesced, written at `due()`
        desired, generation = wanted
        value = json.dumps(
            {"generation": generation, "leader": self.member_id, "members": desired},
            sort_keys=True,
        ).encode()
        guard = election.leader_guard(self.keys, self.session.lease_id, candidate_rev)
        # Over the assignment this view holds, or none: the control watch's two ranges
        # may deliver a backlog out of step (fleet/coord/controlwatch.py), and a leader
        # whose copy lags must not write a next assignment computed from an older one
        # (more moves than needed, a generation repeated). Refused, it waits for the view.
        seen = view.kvs.get(self.keys.assignment)
        fresh = Compare(self.keys.assignment, "mod", seen.mod_revision if seen else 0)
        try:
            res = self.etcd.txn(
                [guard, fresh],
                [Put(self.keys.assignment, value)],
                [Get(self.keys.assignment)],
            )
        except EtcdUnavailable as exc:
            delay = self.pacer.failed(clock.now())
            log.warning("assignment write failed (retry in %.1f s): %s", delay, exc)
            return
        self.pacer.wrote(now)
        if res.succeeded:
            self.written_rev = res.revision
            count, gone = plan.moves(current.members if current else {}, desired, segments)
            log.info(
                "assignment generation %d: %s, %s moved%s",
                generation,
                plural(len(desired), "member"),
                plural(count, "segment"),
                f", {gone} released (resized to {segments})" if gone else "",
            )
        else:
            [found] = res.ranges
            now_rev = found[0].mod_revision if found else 0
            if now_rev != (seen.mod_revision if seen else 0):
                log.debug("assignment write refused: the view lags (revision %d)", now_rev)
                self.written_rev = max(self.written_rev, now_rev)  # wait until it is seen
            else:
                log.warning("assignment write rejected: no longer the leader")
