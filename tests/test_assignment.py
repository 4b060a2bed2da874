"""Properties of fleet.coord.assignment: exact cover, balance, minimal movement, determinism.

The minimal-movement checks compare against a bound computed here independently
(best quota vector by exhaustive search, and for tiny cases the best assignment by
exhaustive search), not against the module's own greedy.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction
from itertools import product

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fleet.coord.assignment import assign, moved, quotas

NAMES = [f"m{i}" for i in range(8)] + ["a", "zz", "host-10", "host-2"]
WEIGHTS = st.one_of(
    st.just(1),
    st.sampled_from([1.0, 2, 0.5, 3.0, 0.1, 0.2, 0.3, 7]),
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False),
)


def exact(weight: float) -> Fraction:
    """The weight the user wrote, as the module reads it (decimal, not binary)."""
    return Fraction(weight) if isinstance(weight, int) else Fraction(str(weight))


def shares(segments: int, members: Mapping[str, float]) -> dict[str, Fraction]:
    total = sum((exact(w) for w in members.values()), Fraction(0))
    return {m: segments * exact(w) / total for m, w in members.items()}


def check_cover_and_balance(
    segments: int, members: Mapping[str, float], result: Mapping[str, list[int]]
) -> None:
    if not members:
        assert result == {}
        return
    assert set(result) == set(members)
    for mine in result.values():
        assert mine == sorted(mine)
    everything = [s for mine in result.values() for s in mine]
    assert sorted(everything) == list(range(segments))
    for member, share in shares(segments, members).items():
        assert math.floor(share) <= len(result[member]) <= math.ceil(share), (member, share)


def before_owners(
    current: Mapping[str, Sequence[int]], live: Mapping[str, float]
) -> dict[int, str]:
    """Owner of each segment listed in ``current``: the first live lister, else the first."""
    owners: dict[int, str] = {}
    for s in {s for mine in current.values() for s in mine}:
        listers = sorted(m for m, mine in current.items() if s in mine)
        owners[s] = ([m for m in listers if m in live] or listers)[0]
    return owners


def lower_bound(
    segments: int, members: Mapping[str, float], current: Mapping[str, Sequence[int]]
) -> int:
    """Fewest handoffs any balanced result needs: every owned segment moves except
    those kept, and member i keeps at most min(held_i, q_i) for the best quota vector."""
    owners = before_owners(current, members)
    held = Counter(m for s, m in owners.items() if m in members and 0 <= s < segments)
    live = sorted(members)
    share = shares(segments, members)
    options = [sorted({math.floor(share[m]), math.ceil(share[m])}) for m in live]
    best = max(
        sum(min(held[m], q) for m, q in zip(live, qs, strict=True))
        for qs in product(*options)
        if sum(qs) == segments
    )
    return len(owners) - best


def brute_force_minimum(
    segments: int, members: Mapping[str, float], current: Mapping[str, Sequence[int]]
) -> int:
    """Try every map segment -> member, keep the balanced ones, count handoffs."""
    owners = before_owners(current, members)
    live = sorted(members)
    share = shares(segments, members)
    best = len(owners)
    for choice in product(live, repeat=segments):
        counts = Counter(choice)
        if all(math.floor(share[m]) <= counts[m] <= math.ceil(share[m]) for m in live):
            kept = sum(1 for s, m in owners.items() if 0 <= s < segments and choice[s] == m)
            best = min(best, len(owners) - kept)
    return best


class Churn(RuleBasedStateMachine):
    """Joins, leaves, weight changes and corrupted input, each result fed back."""

    @initialize(segments=st.integers(0, 40))
    def start(self, segments: int) -> None:
        self.segments = segments
        self.members: dict[str, float] = {}
        self.current: dict[str, list[int]] = {}

    def step(self) -> None:
        result = assign(self.segments, self.members, self.current)
        check_cover_and_balance(self.segments, self.members, result)
        assert quotas(self.segments, self.members, self.current) == {
            m: len(mine) for m, mine in result.items()
        }
        if self.members:
            assert moved(self.current, result) == lower_bound(
                self.segments, self.members, self.current
            )
        self.current = result

    @rule(name=st.sampled_from(NAMES), weight=WEIGHTS)
    def join_or_reweight(self, name: str, weight: float) -> None:
        self.members[name] = weight
        self.step()

    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        if self.members:
            del self.members[data.draw(st.sampled_from(sorted(self.members)))]
        self.step()

    @rule(
        name=st.sampled_from(NAMES),
        garbage=st.lists(st.integers(-3, 60), max_size=6),
    )
    def corrupt(self, name: str, garbage: list[int]) -> None:
        """A stale or hand-edited assignment: unknown segments, repeats, ghosts."""
        self.current.setdefault(name, [])
        self.current[name] = list(self.current[name]) + garbage
        self.step()

    @invariant()
    def fed_back_result_names_exactly_the_live_members(self) -> None:
        assert set(self.current) == set(self.members)


TestChurn = Churn.TestCase
TestChurn.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


currents = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "gone"]), st.lists(st.integers(-1, 7), max_size=5)
)


@settings(max_examples=200, deadline=None)
@given(
    segments=st.integers(0, 6),
    members=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), WEIGHTS, min_size=1, max_size=3),
    current=currents,
)
def test_minimal_against_exhaustive_search(
    segments: int, members: dict[str, float], current: dict[str, list[int]]
) -> None:
    result = assign(segments, members, current)
    check_cover_and_balance(segments, members, result)
    bound = lower_bound(segments, members, current)
    assert brute_force_minimum(segments, members, current) == bound
    assert moved(current, result) == bound


def balanced(segments: int, names: list[str], rnd: random.Random) -> dict[str, list[int]]:
    """Some balanced assignment (equal weights), not necessarily the one assign picks."""
    order = list(range(segments))
    rnd.shuffle(order)
    sizes = [segments // len(names)] * len(names)
    for i in rnd.sample(range(len(names)), segments % len(names)):
        sizes[i] += 1
    out, pos = {}, 0
    for name, size in zip(names, sizes, strict=True):
        out[name], pos = sorted(order[pos : pos + size]), pos + size
    return out


@settings(max_examples=300, deadline=None)
@given(segments=st.integers(0, 64), n=st.integers(1, 9), rnd=st.randoms())
def test_join_moves_floor_share_and_leave_moves_only_the_leaver(
    segments: int, n: int, rnd: random.Random
) -> None:
    names = [f"w{i}" for i in range(n)]
    start = balanced(segments, names, rnd)
    grown = {name: 1.0 for name in [*names, "new"]}
    assert moved(start, assign(segments, grown, start)) == segments // (n + 1)
    leaver = rnd.choice(names)
    shrunk = {name: 1.0 for name in names if name != leaver}
    after = assign(segments, shrunk, start)
    assert moved(start, after) == (len(start[leaver]) if shrunk else segments)
    for name in shrunk:
        assert set(start[name]) <= set(after[name])


def test_twelve_segments_three_to_four_members_moves_three() -> None:
    three = assign(12, {"a": 1, "b": 1, "c": 1}, {})
    assert three == {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7], "c": [8, 9, 10, 11]}
    four = assign(12, {"a": 1, "b": 1, "c": 1, "d": 1}, three)
    assert moved(three, four) == 3
    assert four == {"a": [0, 1, 2], "b": [4, 5, 6], "c": [8, 9, 10], "d": [3, 7, 11]}


def test_ceil_goes_to_members_already_above_floor() -> None:
    # 10 over 3: floors 3, one extra slot; "c" holds 4, so giving it the 4th saves a move.
    current = {"a": [0, 1, 2], "b": [3, 4, 5], "c": [6, 7, 8, 9]}
    assert quotas(10, {"a": 1, "b": 1, "c": 1}, current) == {"a": 3, "b": 3, "c": 4}
    assert assign(10, {"a": 1, "b": 1, "c": 1}, current) == current


def test_decimal_weights_split_exactly() -> None:
    result = assign(6, {"a": 0.1, "b": 0.2, "c": 0.3}, {})
    assert {m: len(s) for m, s in result.items()} == {"a": 1, "b": 2, "c": 3}
    # An integral share is exact: "c" may not take the extra slot even holding more.
    assert quotas(6, {"a": 1, "b": 1, "c": 2}, {"c": [0, 1, 2, 3, 4]})["c"] == 3


def test_duplicates_stay_with_first_live_member_and_garbage_is_dropped() -> None:
    current = {"b": [0, 1, 1, 9, -1], "a": [1, 2], "gone": [3, 0]}
    result = assign(4, {"a": 1, "b": 1}, current)
    assert result == {"a": [1, 2], "b": [0, 3]}
    # 1 and 0 stay with their first live lister, 9 and -1 vanish, 3 leaves "gone".
    assert moved(current, result) == 3


@settings(max_examples=200, deadline=None)
@given(
    segments=st.integers(0, 30),
    members=st.dictionaries(st.sampled_from(NAMES), WEIGHTS, max_size=8),
    current=st.dictionaries(st.sampled_from(NAMES), st.lists(st.integers(-2, 35), max_size=8)),
    rnd=st.randoms(),
)
def test_dict_and_list_order_do_not_matter(
    segments: int,
    members: dict[str, float],
    current: dict[str, list[int]],
    rnd: random.Random,
) -> None:
    def shuffled(d: dict[str, list[int]]) -> dict[str, list[int]]:
        keys = list(d)
        rnd.shuffle(keys)
        return {k: rnd.sample(d[k], len(d[k])) for k in keys}

    keys = list(members)
    rnd.shuffle(keys)
    members2 = {k: members[k] for k in keys}
    current2 = shuffled(current)
    result = assign(segments, members, current)
    assert assign(segments, members2, current2) == result
    assert quotas(segments, members2, current2) == quotas(segments, members, current)
    assert moved(current2, shuffled(result)) == moved(current, result)
    check_cover_and_balance(segments, members, result)


def test_fewer_segments_than_members() -> None:
    members = {name: 1.0 for name in "abcde"}
    result = assign(3, members, {})
    assert sorted(len(s) for s in result.values()) == [0, 0, 1, 1, 1]
    sticky = assign(2, members, {"e": [0], "d": [1]})
    assert sticky == {"a": [], "b": [], "c": [], "d": [1], "e": [0]}


def test_edge_sizes() -> None:
    assert assign(0, {"a": 1, "b": 2}, {"a": [0]}) == {"a": [], "b": []}
    assert quotas(0, {"a": 1}, {}) == {"a": 0}
    assert assign(5, {}, {"a": [0, 1]}) == {}
    assert quotas(5, {}, {}) == {}
    assert moved({"a": [0, 1]}, {}) == 2
    assert moved({}, {"a": [0, 1]}) == 0


@pytest.mark.parametrize("weight", [0, -1, 0.0, float("nan"), float("inf"), "1", True, None])
def test_bad_weights_are_rejected(weight: object) -> None:
    with pytest.raises(ValueError, match="weight of member 'x'"):
        assign(3, {"x": weight}, {})  # type: ignore[dict-item]


def test_negative_segments_are_rejected() -> None:
    with pytest.raises(ValueError, match="segments"):
        quotas(-1, {"a": 1}, {})
