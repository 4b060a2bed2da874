"""The local view of one fleet: every key under its prefix, kept current by the watch.

Pure data: built from a snapshot, updated by changes, read through typed accessors.
Both the worker (to decide) and `fleet status` (to show) read the cluster through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fleet.coord import spec as spec_mod
from fleet.coord.etcd import KV, Change, Snapshot
from fleet.coord.health import Health
from fleet.coord.health import decode as decode_health
from fleet.coord.keys import Keys
from fleet.coord.spec import Spec


@dataclass(frozen=True)
class Member:
    id: str
    lease: int
    info: dict[str, Any]

    @property
    def weight(self) -> float:
        try:
            weight = float(self.info.get("weight", 1.0))
        except (TypeError, ValueError):
            return 1.0
        return weight if weight > 0 else 1.0


@dataclass(frozen=True)
class Assignment:
    generation: int
    leader: str
    members: dict[str, list[int]]
    mod_revision: int

    def owner_of(self) -> dict[int, str]:
        return {seg: member for member, segs in self.members.items() for seg in segs}


@dataclass(frozen=True)
class Owner:
    member: str
    token: int
    lease: int


@dataclass
class FleetView:
    """`track_checkpoints=False` (the worker) drops checkpoint values: the worker reads a
    checkpoint in its acquire transaction and never needs the others'.

    A change at or below the revision of the last reset is ignored: the snapshot already
    reflects it (or something newer). The worker's view is fed by a watch of two ranges
    (fleet/coord/controlwatch.py); a stream must never undo what a resync brought.
    """

    keys: Keys
    revision: int = 0
    kvs: dict[str, KV] = field(default_factory=dict)
    track_checkpoints: bool = True
    _parsed: dict[str, Assignment] = field(default_factory=dict, repr=False)
    _reset_at: int = field(default=0, repr=False)  # revision of the last snapshot

    @classmethod
    def from_snapshot(
        cls, keys: Keys, snapshot: Snapshot, *, track_checkpoints: bool = True
    ) -> FleetView:
        view = cls(keys, track_checkpoints=track_checkpoints)
        view.reset(snapshot)
        return view

    def _tracked(self, key: str) -> bool:
        return self.track_checkpoints or not key.startswith(self.keys.checkpoints)

    def reset(self, snapshot: Snapshot) -> None:
        self.kvs = {kv.key: kv for kv in snapshot.kvs if self._tracked(kv.key)}
        self.revision = self._reset_at = snapshot.revision

    def apply(self, changes: list[Change], revision: int) -> None:
        for change in changes:
            if change.kv.mod_revision <= self._reset_at or not self._tracked(change.kv.key):
                continue
            if change.kind == "put":
                self.kvs[change.kv.key] = change.kv
            else:
                self.kvs.pop(change.kv.key, None)
        self.revision = max(self.revision, revision)

    def _under(self, folder: str) -> list[KV]:
        return [kv for key, kv in self.kvs.items() if key.startswith(folder)]

    def spec(self) -> Spec | None:
        """The fleet spec; None when absent or not a spec (keep what was known before)."""
        kv = self.kvs.get(self.keys.spec)
        if kv is None:
            return None
        try:
            return spec_mod.parse(kv.value)
        except spec_mod.BadSpec:
            return None

    def segments(self) -> int | None:
        spec = self.spec()
        return spec.segments if spec else None

    def members(self) -> dict[str, Member]:
        out = {}
        for kv in self._under(self.keys.members):
            member_id = kv.key[len(self.keys.members) :]
            try:
                info = json.loads(kv.value)
            except ValueError:
                info = {}
            out[member_id] = Member(member_id, kv.lease, info if isinstance(info, dict) else {})
        return out

    def candidates(self) -> list[KV]:
        return sorted(self._under(self.keys.election), key=lambda kv: kv.create_revision)

    def leader(self) -> KV | None:
        candidates = self.candidates()
        return candidates[0] if candidates else None

    def assignment(self) -> Assignment | None:
        kv = self.kvs.get(self.keys.assignment)
        if kv is None:
            return None
        cached = self._parsed.get("assignment")
        if cached is not None and cached.mod_revision == kv.mod_revision:
            return cached
        data = json.loads(kv.value)
        members = {str(m): sorted(int(s) for s in segs) for m, segs in data["members"].items()}
        parsed = Assignment(int(data["generation"]), str(data["leader"]), members, kv.mod_revision)
        self._parsed["assignment"] = parsed
        return parsed

    def owner(self, segment: int) -> Owner | None:
        kv = self.kvs.get(self.keys.owner(segment))
        return Owner(kv.value.decode(), kv.create_revision, kv.lease) if kv else None

    def owners(self) -> dict[int, Owner]:
        out = {}
        for kv in self._under(self.keys.owners):
            seg = self.keys.segment_of(kv.key)
            if seg is not None:
                out[seg] = Owner(kv.value.decode(), kv.create_revision, kv.lease)
        return out

    def checkpoints(self) -> dict[int, Any]:
        out = {}
        for kv in self._under(self.keys.checkpoints):
            seg = self.keys.segment_of(kv.key)
            if seg is not None:
                try:
                    out[seg] = json.loads(kv.value)
                except ValueError:
                    out[seg] = kv.value.decode(errors="replace")
        return out

    def health(self) -> dict[str, tuple[int, Health]]:
        """Each member's published failing segments, with the lease the key is bound to
        (a key of an earlier lease is a dead incarnation's, not the member's news)."""
        return {
            kv.key[len(self.keys.health) :]: (kv.lease, decode_health(kv.value))
            for kv in self._under(self.keys.health)
        }
