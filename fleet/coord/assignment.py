"""Balanced, sticky, deterministic assignment of segments to members.

The leader recomputes the assignment on every membership change, and every segment
that changes member costs a release/acquire handoff (a paused segment), so the result
must be balanced *and* move as few segments as any balanced result could. It is pure
and independent of dict ordering so that any leader, given the same view, writes the
same assignment, and a new leader continues stickily from whatever the last one wrote.

Why the result is minimal. Call ``c_i`` the valid segments member ``i`` holds now and
``f_i`` the floor of its share ``S*w_i/W``; a balanced quota is ``q_i = f_i + x_i``
with ``x_i`` in {0, 1} (0 when the share is an integer) and ``sum q_i = S``. A member
can keep at most ``min(c_i, q_i)`` of its segments and keeping exactly that many is
always possible (the rest of the quota is filled from free segments, of which there
are exactly enough), so the moved count is ``owned_before - sum min(c_i, q_i)``.
Since ``min(c_i, f_i + 1) - min(c_i, f_i)`` is 1 iff ``c_i > f_i``, a +1 is worth
one kept segment exactly for members holding more than their floor, and handing the
``S - sum f_i`` extra slots to those members first maximises the kept total.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from itertools import islice

__all__ = ["assign", "moved", "quotas"]


def _weights(segments: int, members: Mapping[str, float]) -> dict[str, Fraction]:
    """Validate, and read each weight as the decimal its user wrote.

    ``Fraction(str(w))`` rather than ``Fraction(w)``: the binary value of 0.1 is not
    a tenth, and weights 0.1/0.2/0.3 must split 6 segments as 1/2/3, not 2/2/2.
    """
    if segments < 0:
        raise ValueError(f"segments must be >= 0, got {segments!r}")
    weights: dict[str, Fraction] = {}
    for member, weight in members.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"weight of member {member!r} must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight of member {member!r} must be finite and > 0, got {weight!r}")
        weights[member] = Fraction(weight) if isinstance(weight, int) else Fraction(str(weight))
    return weights


def _held(
    segments: int, live: Sequence[str], current: Mapping[str, Sequence[int]]
) -> dict[str, list[int]]:
    """Clean ``current`` down to what each live member may keep, lowest first.

    Departed members, out-of-range segments and repeats are dropped; a segment
    claimed twice stays with the claimant that sorts first, so that the outcome
    never depends on the order of a dict.
    """
    taken: set[int] = set()
    held: dict[str, list[int]] = {}
    for member in live:
        mine = [s for s in sorted(set(current.get(member, ()))) if 0 <= s < segments]
        held[member] = [s for s in mine if s not in taken]
        taken.update(held[member])
    return held


def _quotas(
    segments: int, weights: Mapping[str, Fraction], held: Mapping[str, list[int]]
) -> dict[str, int]:
    """Give the ceil slots to the members for which it saves a move (see module doc).

    Only members with a fractional share may take a +1 (the ceil of an integer is
    itself); there are always enough of them, because the fractional parts, each
    below 1, add up to the number of extra slots.
    """
    total = sum(weights.values(), Fraction(0))
    floor: dict[str, int] = {}
    eligible: list[str] = []
    for member in sorted(weights):
        share = segments * weights[member] / total
        floor[member] = math.floor(share)
        if share != floor[member]:
            eligible.append(member)
    extra = segments - sum(floor.values())
    eligible.sort(key=lambda m: (floor[m] - len(held[m]), m))
    quota = dict(floor)
    for member in eligible[:extra]:
        quota[member] += 1
    return quota


def quotas(
    segments: int, members: Mapping[str, float], current: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """How many segments each member gets; exposed so status and tests can explain
    an assignment without recomputing the tie-breaks. ``{}`` when there are no members.
    """
    weights = _weights(segments, members)
    live = sorted(weights)
    return _quotas(segments, weights, _held(segments, live, current)) if live else {}


def assign(
    segments: int, members: Mapping[str, float], current: Mapping[str, Sequence[int]]
) -> dict[str, list[int]]:
    """The next assignment: balanced within one of each weighted share, and moving the
    fewest segments any balanced assignment could, starting from ``current``.

    Over-quota members keep their lowest segments and the free ones go, lowest first,
    to under-quota members in id order: arbitrary but fixed choices, so that two
    leaders never disagree. Every live member is a key, even with nothing to do, so
    readers can tell "idle" from "unknown". ``{}`` when there are no members.
    """
    weights = _weights(segments, members)
    live = sorted(weights)
    if not live:
        return {}
    held = _held(segments, live, current)
    quota = _quotas(segments, weights, held)
    result = {m: held[m][: quota[m]] for m in live}
    kept = {s for mine in result.values() for s in mine}
    free = iter([s for s in range(segments) if s not in kept])
    for member in live:
        result[member].extend(islice(free, quota[member] - len(result[member])))
        result[member].sort()
    return result


def moved(before: Mapping[str, Sequence[int]], after: Mapping[str, Sequence[int]]) -> int:
    """Count the handoffs from ``before`` to ``after``: segments that had an owner in
    ``before`` and have a different one, or none, in ``after``.

    Segments nobody owned before are not counted: giving them out costs no handoff.
    Losing the owner does count (the old owner still has to stop and release). A
    segment listed by several members in ``before`` is owned the way ``assign``
    cleans it, by the first in id order among those still keys of ``after``
    (the live ones), else by the first overall; ``after`` is resolved by id order.
    """
    new: dict[int, str] = {}
    for member in sorted(after):
        for s in after[member]:
            new.setdefault(s, member)
    old: dict[int, str] = {}
    for member in sorted(before, key=lambda m: (m not in after, m)):
        for s in before[member]:
            old.setdefault(s, member)
    return sum(1 for s, member in old.items() if new.get(s) != member)
