"""Assignment strategies compared by ``movement.py``, and the bound they are measured against.

Every strategy is a pure function ``(segments, members, current) -> {member: [segment]}``
that gives each of ``range(segments)`` to exactly one of ``members`` and lists every
member as a key (possibly with nothing). Only fleet's uses ``current``: the others are
what one writes without thinking about movement, and recompute from scratch.

* ``fleet``: ``fleet.coord.assignment.assign`` with every weight 1.0.
* ``contiguous``: the original .NET example's ``SegmentDistributor.DistributeEvenly``,
  contiguous ranges over the sorted member ids. Its source is not in the reference
  material (``/work/shared/reference`` holds its README only); the README's worked
  example fixes the arithmetic: 10 segments over ``[node1, node2, node3]`` are
  ``[0-3], [4-6], [7-9]``, over two nodes ``[0-4], [5-9]``: ``S // N`` each, the first
  ``S % N`` members in id order one more, in id order from segment 0.
* ``hash_ring``: a consistent-hash ring, 32 virtual nodes per member at
  ``blake2b("<member>#<v>")``; a segment at ``blake2b("segment-<s>")`` belongs to the
  first virtual node at or after it, clockwise. blake2b rather than ``hash()``, which
  Python salts per process: the ring must be the same in every run.
* ``round_robin``: segment ``s`` to the ``s % N``-th member in id order.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache

from fleet.coord.assignment import assign, moved

__all__ = [
    "STRATEGIES",
    "Strategy",
    "balance",
    "contiguous",
    "fleet",
    "hash_ring",
    "lower_bound",
    "moved",
    "new_segments",
    "round_robin",
]

Assignment = dict[str, list[int]]
Strategy = Callable[[int, Sequence[str], Mapping[str, Sequence[int]]], Assignment]

VIRTUAL_NODES = 32


def fleet(
    segments: int, members: Sequence[str], current: Mapping[str, Sequence[int]]
) -> Assignment:
    """fleet's own: balanced and sticky (moves the fewest any balanced result could)."""
    return assign(segments, {m: 1.0 for m in members}, current)


def contiguous(
    segments: int, members: Sequence[str], current: Mapping[str, Sequence[int]]
) -> Assignment:
    """``DistributeEvenly``: ranges over sorted ids, the first ``S % N`` one longer."""
    live = sorted(set(members))
    if not live:
        return {}
    base, extra = divmod(segments, len(live))
    result: Assignment = {}
    start = 0
    for i, member in enumerate(live):
        size = base + (1 if i < extra else 0)
        result[member] = list(range(start, start + size))
        start += size
    return result


def round_robin(
    segments: int, members: Sequence[str], current: Mapping[str, Sequence[int]]
) -> Assignment:
    """Segment ``s`` to the ``s % N``-th member in id order."""
    live = sorted(set(members))
    if not live:
        return {}
    return {m: list(range(i, segments, len(live))) for i, m in enumerate(live)}


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


@lru_cache(maxsize=1 << 16)
def _member_points(member: str) -> tuple[int, ...]:
    """A member's virtual nodes. Cached: a ring changes by one member per event, and
    rehashing every member every step would time the hashing, not the strategy."""
    return tuple(_point(f"{member}#{v}") for v in range(VIRTUAL_NODES))


@lru_cache(maxsize=8)
def _segment_points(segments: int) -> tuple[int, ...]:
    return tuple(_point(f"segment-{s}") for s in range(segments))


def hash_ring(
    segments: int, members: Sequence[str], current: Mapping[str, Sequence[int]]
) -> Assignment:
    """Consistent hashing, 32 virtual nodes per member; ties between two members' points
    (astronomically unlikely with 64-bit points) go to the smaller id."""
    live = sorted(set(members))
    if not live:
        return {}
    ring = sorted((p, m) for m in live for p in _member_points(m))
    points = [p for p, _ in ring]
    result: Assignment = {m: [] for m in live}
    for s, key in enumerate(_segment_points(segments)):
        i = bisect.bisect_left(points, key)
        result[ring[i % len(ring)][1]].append(s)
    return result


STRATEGIES: dict[str, Strategy] = {
    "fleet": fleet,
    "contiguous": contiguous,
    "hash_ring": hash_ring,
    "round_robin": round_robin,
}


def _owners(before: Mapping[str, Sequence[int]], live: Iterable[str]) -> dict[int, str]:
    """The owner of each segment in ``before``, resolved as ``moved`` resolves it: a
    segment listed twice belongs to the first live lister in id order, else the first."""
    alive = set(live)
    owner: dict[int, str] = {}
    for member in sorted(before, key=lambda m: (m not in alive, m)):
        for s in before[member]:
            owner.setdefault(s, member)
    return owner


def lower_bound(
    segments: int, before: Mapping[str, Sequence[int]], after_members: Sequence[str]
) -> int:
    """The fewest segments any balanced equal-weight assignment of ``range(segments)``
    to ``after_members`` must move away from ``before`` (segments of ``before`` are
    taken to be in that range).

    Derivation. Let ``n`` be the number of members after, ``q, r = divmod(segments, n)``.
    Balanced means every member gets ``q`` or ``q + 1`` segments, so (the sizes adding
    up to ``segments``) exactly ``r`` of them get ``q + 1``. A segment that had an owner
    before stays put only if that owner is still a member and gets it again, so with
    ``c_i`` the number of segments member ``i`` owned before (0 for a newcomer) and
    ``k_i`` its size after, at most ``sum min(c_i, k_i)`` segments stay: segments of
    departed members all move, and a member keeps at most its new size. That many can
    stay for any choice of sizes: each member keeps ``min(c_i, k_i)`` of its own and the
    rest, exactly ``sum (k_i - min(c_i, k_i))`` segments, fills the remaining places.
    The sizes are then chosen best: a ``q + 1`` instead of a ``q`` keeps one more
    segment exactly when ``c_i > q`` (``min(c_i, q + 1) - min(c_i, q)``), so the most
    that can stay is ``sum min(c_i, q) + min(r, #{i: c_i > q})``, and the bound is the
    number of segments owned before minus that. With no member after, every owned
    segment loses its owner: all of them count.

    This is the quantity fleet's assignment reaches (see the module docstring of
    ``fleet.coord.assignment``), computed here from counts alone, without building an
    assignment, so that comparing the two checks the module rather than itself.
    Segments nobody owned before are not moves, whoever gets them (``new_segments``).
    """
    owner = _owners(before, after_members)
    live = set(after_members)
    if not live:
        return len(owner)
    q, r = divmod(segments, len(live))
    held: dict[str, int] = dict.fromkeys(live, 0)
    for member in owner.values():
        if member in live:
            held[member] += 1
    kept = sum(min(c, q) for c in held.values()) + min(r, sum(1 for c in held.values() if c > q))
    return len(owner) - kept


def new_segments(before: Mapping[str, Sequence[int]], after: Mapping[str, Sequence[int]]) -> int:
    """Segments owned in ``after`` that nobody owned in ``before``: given out, not moved."""
    owned = {s for mine in before.values() for s in mine}
    return len({s for mine in after.values() for s in mine} - owned)


def balance(result: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """(most, fewest) segments of one member; ``(0, 0)`` for no members."""
    sizes = [len(mine) for mine in result.values()]
    return (max(sizes), min(sizes)) if sizes else (0, 0)
