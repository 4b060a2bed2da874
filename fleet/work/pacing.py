"""When the leader writes an assignment: pure timing decisions, no I/O.

Two rules, both about not paying for movement nobody needs and not waiting when there
is nothing to wait for:

- **Leading-edge coalescing** (`WritePacer`). A change (a member joined or left, a
  resize) is written at once when the leader wrote nothing in the last `settle` seconds:
  a lone `kill -9` costs no settle window. Changes that arrive within `settle` of the
  last write are coalesced into one write at `last write + settle`, so a burst (eight
  workers joining one after another) still makes at most one write per window, and no
  change waits longer than `settle` after it was seen.
- **The first assignment waits for the workers being started** (`first_assignment_hold`).
  `fleet up --workers N` tells each worker N (`EXPECT_ENV`); a worker puts that in its
  member record (`member_fields`), grouped by the `fleet up` that started it. A leader
  that finds nothing to be sticky about (no assignment, or one naming no registered
  member: a fleet started again after a full stop) waits until every group it can see
  has all its workers registered, or `FIRST_ASSIGNMENT_WAIT` after it became leader,
  whichever is first: so a cold start acquires each segment once, instead of the first
  worker taking all of them and handing them on as the others register (Kafka's
  initial rebalance delay, but ending as soon as the workers are there). A plain
  `fleet worker` has no expectation and changes nothing; a respawn finds an assignment
  naming live members and never waits.
- **A rejoin after a lost lease waits for the members the assignment names**
  (`rejoin_hold`). When etcd stalls past the TTL every member loses its lease at once and
  rejoins under the same id within a second or two. The first one back leads and sees
  an assignment naming members that are not registered *yet*: reassigning at once would
  give it every segment, then hand them on as the others come back (a cold start's
  churn, under the very load that caused the loss; issue 11). A leader whose own
  incarnation is a rejoin holds, up to `REJOIN_WAIT` after it rejoined, while members
  of the assignment are missing; meanwhile each member acquires its old segments (the
  assignment names them), so each segment is acquired once. A leader that did not just
  rejoin (a plain failover, a `kill -9`) never waits.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Set by `fleet up` in each worker's environment: how many workers it starts (its
# `--workers`, or the count after a `fleet scale`, for later spawns).
EXPECT_ENV = "FLEET_EXPECTED_WORKERS"
SUPERVISOR_ENV = "FLEET_SUPERVISOR_PID"
# The member record's field carrying it: {"group": "<host>:<supervisor pid>", "workers": N}.
EXPECT_FIELD = "expect"

# How long a new leader holds the first assignment back for workers still starting. It
# only runs out when a worker does not come (a slot crash-looping on a bad config, a host
# whose `fleet up` starts later): 8 workers started together on a loaded 2-core machine
# register within about 1 s of the first (imports and the etcd connect, ~0.3 CPU-s
# each), so 3 s covers that with room, like Kafka's 3 s initial rebalance delay, and
# keeps a missing worker from delaying the fleet for longer than a few seconds.
FIRST_ASSIGNMENT_WAIT = 3.0

# How long a leader that just rejoined (its lease was lost) waits for the members the
# assignment names to come back before reassigning their segments: they lost their
# leases at the same moment and rejoin with jitter within about a second.
REJOIN_WAIT = FIRST_ASSIGNMENT_WAIT

# Retry of a failed assignment write (etcd unreachable): doubling, with jitter, capped.
RETRY_FIRST = 0.25
RETRY_MAX = 4.0


@dataclass
class WritePacer:
    """The leader's pending assignment write and when it is due.

    `changed(now)` records that the view wants a new assignment (only the first unwritten
    change counts: coalescing never delays an older one); `due()` says when to write;
    `wrote(now)` / `failed(now)` / `nothing_to_write()` report what the step did.
    """

    settle: float
    pending_since: float | None = None  # first change seen and not yet written
    last_write: float | None = None
    retry_at: float | None = None
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def changed(self, now: float) -> None:
        if self.pending_since is None:
            self.pending_since = now

    def due(self) -> float | None:
        """When the pending change is to be written; None when nothing is pending."""
        if self.pending_since is None:
            return None
        at = self.pending_since
        if self.last_write is not None:
            at = max(at, self.last_write + self.settle)
        if self.retry_at is not None:
            at = max(at, self.retry_at)
        return at

    def should_write(self, now: float) -> bool:
        due = self.due()
        return due is not None and now >= due

    def wrote(self, now: float) -> None:
        self.last_write = now
        self.pending_since = self.retry_at = None
        self.failures = 0

    def failed(self, now: float) -> float:
        """A write that did not reach etcd: the change stays pending, retried after a
        doubling delay with jitter (never a tight loop against an etcd that is down).
        Returns the delay."""
        base = min(RETRY_MAX, RETRY_FIRST * 2.0**self.failures)
        self.failures += 1
        delay = base * self.rng.uniform(0.5, 1.0)
        self.retry_at = now + delay
        return delay

    def nothing_to_write(self) -> None:
        """The view needs no new assignment (or we do not lead): drop what was pending."""
        self.pending_since = self.retry_at = None
        self.failures = 0


def jittered(seconds: float, rng: random.Random | None = None) -> float:
    """`seconds` times a random factor in [0.5, 1.0): members that failed together (an
    etcd failover) retry spread out, not in lockstep."""
    return seconds * (rng or random).uniform(0.5, 1.0)


def expectation(env: Mapping[str, str], host: str) -> dict[str, Any] | None:
    """This worker's `EXPECT_FIELD` value from its environment; None for a worker not
    started by `fleet up` (or with a value that is not a positive count)."""
    raw = env.get(EXPECT_ENV, "")
    if not raw.isdigit() or int(raw) < 1:
        return None
    return {"group": f"{host}:{env.get(SUPERVISOR_ENV, '')}", "workers": int(raw)}


def member_fields(env: Mapping[str, str], host: str) -> dict[str, Any]:
    """What to add to the member record: `{"expect": ...}`, or nothing."""
    found = expectation(env, host)
    return {EXPECT_FIELD: found} if found is not None else {}


def _expected(info: Mapping[str, Any]) -> tuple[str, int] | None:
    """(group, workers) from a member record; None when absent or malformed (a record of
    another version, a hand-written one: never fatal, it just expects nothing)."""
    found = info.get(EXPECT_FIELD)
    if not isinstance(found, Mapping):
        return None
    group, workers = found.get("group"), found.get("workers")
    if not isinstance(group, str) or not isinstance(workers, int) or isinstance(workers, bool):
        return None
    return (group, workers) if workers >= 1 else None


def nothing_to_keep(assigned: Iterable[str] | None, registered: Iterable[str]) -> bool:
    """No assignment, or one that names no registered member: nothing is owned under it
    (an owner key lives on the lease of its member's record), so holding the first
    write back delays no running segment."""
    if assigned is None:
        return True
    return not set(assigned) & set(registered)


def rejoin_hold(
    assigned: Iterable[str] | None,
    registered: Iterable[str],
    *,
    rejoined_at: float | None,
    now: float,
    bound: float = REJOIN_WAIT,
) -> float | None:
    """Until when a leader that rejoined at `rejoined_at` (None: its first join) holds
    its assignment back for members of `assigned` not registered yet; None: write now."""
    if rejoined_at is None or assigned is None or now >= rejoined_at + bound:
        return None
    return rejoined_at + bound if set(assigned) - set(registered) else None


def first_assignment_hold(
    members: Mapping[str, Mapping[str, Any]],
    *,
    cold: bool,
    leading_since: float,
    now: float,
    bound: float = FIRST_ASSIGNMENT_WAIT,
) -> float | None:
    """Until when the leader holds its first assignment back; None: write now.

    `members` maps each registered member to its record. Each group's count is the
    largest any of its records announces (a `fleet scale` up during the start raises it
    for the workers it adds). Held only while `cold` (see `nothing_to_keep`) and within
    `bound` of becoming leader.
    """
    until = leading_since + bound
    if not cold or now >= until:
        return None
    wanted: dict[str, int] = {}
    present: dict[str, int] = {}
    for info in members.values():
        found = _expected(info)
        if found is None:
            continue
        group, workers = found
        wanted[group] = max(wanted.get(group, 0), workers)
        present[group] = present.get(group, 0) + 1
    if all(present[group] >= workers for group, workers in wanted.items()):
        return None
    return until
