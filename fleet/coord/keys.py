"""The etcd key layout of one fleet, in one place so that no module spells a key by hand."""

from __future__ import annotations

from dataclasses import dataclass

SEGMENT_WIDTH = 5


@dataclass(frozen=True)
class Keys:
    """All keys of the fleet `name` under `prefix` (see DESIGN.md, "Keys")."""

    prefix: str
    name: str

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.name}/"

    @property
    def spec(self) -> str:
        return self.root + "spec"

    @property
    def assignment(self) -> str:
        return self.root + "assignment"

    @property
    def members(self) -> str:
        return self.root + "members/"

    @property
    def election(self) -> str:
        return self.root + "election/"

    @property
    def owners(self) -> str:
        return self.root + "owners/"

    @property
    def checkpoints(self) -> str:
        return self.root + "checkpoints/"

    @property
    def health(self) -> str:
        return self.root + "health/"

    def member(self, member_id: str) -> str:
        return self.members + member_id

    def candidate(self, lease_id: int) -> str:
        return f"{self.election}{lease_id:x}"

    def owner(self, segment: int) -> str:
        return f"{self.owners}{segment:0{SEGMENT_WIDTH}d}"

    def checkpoint(self, segment: int) -> str:
        return f"{self.checkpoints}{segment:0{SEGMENT_WIDTH}d}"

    def health_of(self, member_id: str) -> str:
        """A member's failing segments (fleet/coord/health.py), bound to its lease."""
        return self.health + member_id

    def segment_of(self, key: str) -> int | None:
        """The segment number at the end of an owners/ or checkpoints/ key, else None."""
        for folder in (self.owners, self.checkpoints):
            if key.startswith(folder):
                tail = key[len(folder) :]
                return int(tail) if tail.isdigit() else None
        return None
