"""What etcd says happened to a fleet, and when: a watch whose every event is stamped.

A benchmark that polls `fleet status` every few milliseconds steals the CPUs it
measures (two cores here) and only knows that an event happened between two reads.
`Observer` instead keeps one prefix watch (`fleet.coord.watch.PrefixWatch`, which resumes
a broken stream) and stamps each batch of events with `time.time()` the moment it
arrives: the same clock as the `ts` of `fleet up --log-format json` lines, so the
supervisor's and the workers' own log lines can be put on the same time line.

`wait(what, done)` checks `done` in the watch thread right after every batch that
changed something other than a checkpoint, so the time it returns is the arrival of
the batch that made `done` true, not the next time someone looked. Checkpoint commits
are only recorded (segment, revision, arrival), for "first call after the handoff".

The owner of every segment and the segments whose owner differs from the assignment
are kept incrementally: evaluating "settled" after each of the 4096 acquires of a large
cold start must not cost O(segments) each time.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import BenchError

from fleet.coord.etcd import Changes, Etcd, Resync, Snapshot
from fleet.coord.keys import Keys
from fleet.coord.view import FleetView
from fleet.coord.watch import PrefixWatch

Done = Callable[["Observer"], bool]


@dataclass(frozen=True)
class Event:
    """One change of a key other than a checkpoint, stamped on arrival (`time.time()`)."""

    at: float
    revision: int  # mod_revision (of the delete, for a delete)
    kind: str  # "put" | "delete"
    key: str
    create_revision: int
    value: bytes


@dataclass(eq=False)
class Waiter:
    """A condition the watch thread checks after each batch, and when it came true."""

    done: Done
    flag: threading.Event = field(default_factory=threading.Event)
    at: float | None = None


class Observer:
    """A live view of one fleet's keys, with the time each change arrived."""

    def __init__(self, endpoint: str, keys: Keys | None = None, *, from_start: bool = False):
        """`from_start`: replay the history from revision 1 (for counting every acquire of
        a cold start: replayed events are stamped on arrival, so only later ones time)."""
        self.keys = keys or Keys("/fleet", "default")
        self.client = Etcd([endpoint], timeout=3.0)
        self.endpoint = endpoint
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.commits: list[tuple[float, int, int]] = []  # (arrival, revision, segment)
        self.owner: dict[int, str] = {}
        self.owner_token: dict[int, int] = {}
        self.assigned: dict[int, str] = {}
        self.mismatch: set[int] = set()  # segments whose owner is not the assigned member
        self.last_at = time.time()
        self.error: str | None = None
        self._waiters: list[Waiter] = []
        self._shape: tuple[int, int] = (-1, -1)
        snapshot = Snapshot(0, []) if from_start else self.client.get_prefix(self.keys.root)
        self.view = FleetView.from_snapshot(self.keys, snapshot, track_checkpoints=False)
        for seg, owner in self.view.owners().items():
            self.owner[seg], self.owner_token[seg] = owner.member, owner.token
        self._assignment_changed()
        self.watch = PrefixWatch(self.client, self.keys.root, snapshot.revision + 1, self._sink)
        self.watch.start()

    # -- the watch thread ----------------------------------------------------------------

    def _sink(self, item: Changes | Resync) -> None:
        at = time.time()
        with self.lock:
            try:
                self._apply(item, at)
            except Exception as exc:  # a bug here must fail the wait, not kill the watch
                self.error = f"the observer failed on a watch event: {exc!r}"
                self._wake_all()

    def _apply(self, item: Changes | Resync, at: float) -> None:
        """Record one watch item (`lock` held)."""
        if isinstance(item, Resync):
            self.error = "the watch history was compacted: events were missed"
            self._wake_all()
            return
        interesting = False
        for change in item.changes:
            kv = change.kv
            seg = self.keys.segment_of(kv.key)
            if kv.key.startswith(self.keys.checkpoints):
                if seg is not None and change.kind == "put":
                    self.commits.append((at, kv.mod_revision, seg))
                continue
            interesting = True
            self.events.append(
                Event(at, kv.mod_revision, change.kind, kv.key, kv.create_revision, kv.value)
            )
            if seg is not None:  # an owners/ key
                if change.kind == "put":
                    self.owner[seg] = kv.value.decode()
                    self.owner_token[seg] = kv.create_revision
                else:
                    self.owner.pop(seg, None)
                    self.owner_token.pop(seg, None)
                self._recheck(seg)
        self.view.apply(item.changes, item.revision)
        if interesting:
            if self._shape != self._shape_now():
                self._assignment_changed()
            self.last_at = at
            self._check_waiters(at)

    def _shape_now(self) -> tuple[int, int]:
        """The revisions of the assignment and the spec: what `mismatch` is relative to."""
        assignment, spec = (self.view.kvs.get(k) for k in (self.keys.assignment, self.keys.spec))
        return (assignment.mod_revision if assignment else 0, spec.mod_revision if spec else 0)

    def _assignment_changed(self) -> None:
        assignment = self.view.assignment()
        self._shape = self._shape_now()
        self.assigned = assignment.owner_of() if assignment else {}
        segments = self.view.segments() or 0
        self.mismatch = {s for s in range(segments) if self.owner.get(s) != self.assigned.get(s)}

    def _recheck(self, seg: int) -> None:
        if self.owner.get(seg) == self.assigned.get(seg) and seg in self.assigned:
            self.mismatch.discard(seg)
        else:
            self.mismatch.add(seg)

    def _check_waiters(self, at: float) -> None:
        for waiter in list(self._waiters):
            if waiter.done(self):
                waiter.at = at
                waiter.flag.set()
                self._waiters.remove(waiter)

    def _wake_all(self) -> None:
        for waiter in self._waiters:
            waiter.flag.set()

    # -- the benchmark's side ------------------------------------------------------------

    def arm(self, done: Done) -> Waiter:
        """Start watching for `done` now: arm before the trigger (the kill, the signal, the
        scale command), so that even a descheduled benchmark gets the exact arrival."""
        waiter = Waiter(done)
        with self.lock:
            if done(self):
                waiter.at = time.time()
                waiter.flag.set()
            else:
                self._waiters.append(waiter)
        return waiter

    def wait(
        self,
        what: str,
        done: Done | Waiter,
        timeout: float,
        alive: Callable[[], None] = lambda: None,
        context: Callable[[], str] = lambda: "",
    ) -> float:
        """Block until `done(self)` (armed now unless given armed); the arrival time of the
        batch that made it true (the arming time if it already was). `alive()` is called
        every 0.1 s and raises if the fleet died."""
        waiter = done if isinstance(done, Waiter) else self.arm(done)
        deadline = time.monotonic() + timeout
        try:
            while not waiter.flag.wait(0.1):
                alive()
                if time.monotonic() >= deadline:
                    raise BenchError(
                        f"{what}: not reached within {timeout:.0f} s; {self.brief()}{context()}"
                    )
        finally:
            with self.lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self.error is not None:
            raise BenchError(f"{what}: {self.error}")
        assert waiter.at is not None
        return waiter.at

    def members(self) -> dict[str, dict[str, Any]]:
        """Member id -> its record (pid, slot, ...); call with `lock` held or at rest."""
        return {m.id: m.info for m in self.view.members().values()}

    def leader(self) -> str | None:
        kv = self.view.leader()
        return kv.value.decode() if kv else None

    def generation(self) -> int:
        assignment = self.view.assignment()
        return assignment.generation if assignment else 0

    def owned_by(self, member: str) -> list[int]:
        return sorted(s for s, m in self.owner.items() if m == member)

    def settled(self, members: set[str] | None = None) -> bool:
        """Every segment owned by its assigned member, every member in the assignment and
        balanced within one (equal weights); with `members`, exactly those are in."""
        segments = self.view.segments()
        if not segments or self.mismatch or len(self.owner) != segments:
            return False
        assignment = self.view.assignment()
        present = set(self.members())
        if assignment is None or set(assignment.members) != present:
            return False
        if members is not None and present != members:
            return False
        sizes = [len(segs) for segs in assignment.members.values()]
        return bool(sizes) and max(sizes) - min(sizes) <= 1

    def brief(self) -> str:
        with self.lock:
            owned: dict[str, int] = {}
            for member in self.owner.values():
                owned[member] = owned.get(member, 0) + 1
            return (
                f"leader {self.leader()}, generation {self.generation()}, "
                f"members {sorted(self.members())}, owned per member {owned}, "
                f"{len(self.mismatch)} segments not with their assigned member"
            )

    def events_since(self, t: float) -> list[Event]:
        with self.lock:
            return [e for e in self.events if e.at >= t]

    def first(self, t: float, match: Callable[[Event], bool]) -> Event | None:
        """The first event at or after `t` that `match`es."""
        return next((e for e in self.events_since(t) if match(e)), None)

    def first_commits(self, after: dict[int, int]) -> dict[int, float]:
        """Per segment of `after` (segment -> revision), when its first checkpoint commit
        with a higher revision arrived (the first call of an ownership begun there)."""
        found: dict[int, float] = {}
        with self.lock:
            for at, revision, seg in self.commits:
                if seg in after and seg not in found and revision > after[seg]:
                    found[seg] = at
        return found

    def close(self) -> None:
        self.watch.stop()
        self.client.close()


# -- etcd's own counters ------------------------------------------------------------------


def scrape(endpoint: str) -> dict[str, float]:
    """etcd's `/metrics` (Prometheus text), the counters the benchmarks read, summed:
    `requests:<method>` (grpc_server_handled_total, unary calls), `messages_in:<method>`
    and `messages_out:<method>` (grpc_server_msg_received/sent_total, streams included),
    `bytes_in` / `bytes_out` (etcd_network_client_grpc_*_bytes_total) and
    `mvcc:<put|txn|range|delete>` (etcd_mvcc_*_total)."""
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        labels, value = rest.rsplit("} ", 1) if rest else ("", line.rsplit(" ", 1)[-1])
        name = name.split(" ")[0]
        key = _metric_key(name, labels)
        if key is not None:
            out[key] = out.get(key, 0.0) + float(value)
    return out


def _metric_key(name: str, labels: str) -> str | None:
    method = _label(labels, "grpc_method")
    if name == "grpc_server_handled_total" and _label(labels, "grpc_type") == "unary":
        return f"requests:{method}"
    if name == "grpc_server_msg_received_total":
        return f"messages_in:{method}"
    if name == "grpc_server_msg_sent_total":
        return f"messages_out:{method}"
    if name == "etcd_network_client_grpc_received_bytes_total":
        return "bytes_in"
    if name == "etcd_network_client_grpc_sent_bytes_total":
        return "bytes_out"
    for op in ("put", "txn", "range", "delete"):
        if name == f"etcd_mvcc_{op}_total":
            return f"mvcc:{op}"
    return None


def _label(labels: str, name: str) -> str | None:
    for part in labels.split(","):
        key, _, value = part.partition("=")
        if key == name:
            return value.strip('"')
    return None


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """The counters that moved between two scrapes (zeros left out)."""
    keys = set(after) | set(before)
    moved = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: v for k, v in sorted(moved.items()) if v}


def requests_total(moved: dict[str, float]) -> float:
    """Unary requests plus messages received on streams (watch creates, keepalives)."""
    unary = sum(v for k, v in moved.items() if k.startswith("requests:"))
    streams = sum(
        v
        for k, v in moved.items()
        if k.startswith("messages_in:") and k.split(":", 1)[1] in ("Watch", "LeaseKeepAlive")
    )
    return unary + streams


def parse_json_line(line: str) -> dict[str, Any] | None:
    """One `--log-format json` line of `fleet up`, or None for anything else."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
