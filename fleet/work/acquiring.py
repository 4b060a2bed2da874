"""The follower's part of an incarnation: acquire what we are assigned, give back the rest.

Every member runs this each decision step, the leader too. plan.reconcile says what to
do against the view; this part does it: stops the runners whose ownership is gone or no
longer ours to keep, releases owner keys of ours that nobody runs (left over by a failed
release), and acquires the assigned segments in batches, starting a runner for each one
won (through the incarnation, which owns the runner registry). It keeps the releases the
view may not show yet, which the incarnation's delete check reads too, and its retry
timer with the backoff after a failed acquire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fleet import clock
from fleet.coord import ownership
from fleet.coord.etcd import Etcd, EtcdUnavailable
from fleet.coord.keys import Keys
from fleet.coord.session import Session
from fleet.coord.view import FleetView
from fleet.work import lines, pacing, plan
from fleet.work.runner import SegmentRunner

log = logging.getLogger("fleet.work.worker")  # the worker's lines, whichever part says them

# Segments acquired per round trip (nested transactions; etcd allows 128 ops a level).
ACQUIRE_BATCH = 64
ORPHAN_RETRY = 1.0


class Acquiring:
    """Acquires and releases of one incarnation, and what it remembers between steps."""

    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        member_id: str,
        session: Session,
        start_runner: Callable[[int, ownership.Acquired], None],
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.member_id = member_id
        self.session = session
        self.start_runner = start_runner
        self.retry_at: float | None = None
        self.acquire_failures = 0  # failed acquire steps in a row, for the backoff
        # Ownerships we gave back whose delete the view may not show yet: seg -> token.
        self.released: dict[int, int] = {}
        self.orphan_tried: dict[tuple[int, int], float] = {}

    def step(self, view: FleetView, runners: dict[int, SegmentRunner], segments: int) -> None:
        """Act on what plan.reconcile finds: stops, releases, left-over keys, acquires."""
        lease = self.session.lease_id
        owners = view.owners()
        self.released = {
            s: t for s, t in self.released.items() if s in owners and owners[s].token == t
        }
        todo = plan.reconcile(
            view,
            self.member_id,
            lease,
            {s: plan.Running(r.token, r.stopping, r.release_on_exit) for s, r in runners.items()},
            self.released,
            segments=segments,
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
        current = view.assignment()
        if not todo.acquire or current is None or not self.session.alive():
            return
        started: list[tuple[int, int]] = []  # logged as one line for the whole step
        for i in range(0, len(todo.acquire), ACQUIRE_BATCH):
            batch = todo.acquire[i : i + ACQUIRE_BATCH]
            try:
                got = ownership.acquire_many(
                    self.etcd, self.keys, batch, self.member_id, lease, current.mod_revision
                )
            except EtcdUnavailable as exc:
                log.warning("acquire of segments %s failed: %s", lines.format_ranges(batch), exc)
                # Backed off and jittered: after an etcd failover every member retries,
                # and they must not come back in lockstep.
                self.acquire_failures += 1
                self.retry_at = clock.now() + pacing.jittered(
                    min(4.0, 0.25 * 2 ** (self.acquire_failures - 1))
                )
                break
            self.acquire_failures = 0
            for seg, acquired in sorted(got.items()):
                if acquired is not None:
                    self.start_runner(seg, acquired)
                    started.append((seg, acquired.token))
        if started:
            log.info("%s", lines.decision_line("acquired", started))

    def _release_orphans(self, orphans: list[tuple[int, int]]) -> None:
        """Give back owner keys of ours that nobody runs and nobody assigned us (a
        runner's release that failed): otherwise the new assignee waits forever."""
        now = clock.now()
        self.orphan_tried = {k: t for k, t in self.orphan_tried.items() if k in orphans}
        done_now: list[tuple[int, int]] = []
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
                done_now.append((seg, token))
                log.debug("segment %d released (token %d, left over)", seg, token)
            else:
                log.debug("segment %d: left-over owner key not released yet", seg)
                self.retry_at = now + ORPHAN_RETRY
        if done_now:
            log.info("%s", lines.decision_line("released", done_now, note="left over"))
