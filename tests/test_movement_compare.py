"""The movement comparison (bench/strategies.py, bench/movement.py) at small sizes.

fleet's assignment must move exactly ``lower_bound`` and stay balanced; the bound must
be a true bound (no balanced assignment moves fewer; checked by exhaustive search on
tiny cases, and against the other strategies) and tight; the other strategies must be
valid assignments. Finally the benchmark itself, as a user runs it, with ``--quick``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from itertools import product
from pathlib import Path
from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _load(name: str) -> ModuleType:
    """bench/ is a directory of scripts, not a package: load the file itself."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S = _load("strategies")
OTHERS = ["contiguous", "hash_ring", "round_robin"]
NAMES = [f"m{i}" for i in range(8)] + ["a", "zz", "host-10", "host-2"]
MEMBER_SETS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=8, unique=True)
SETTINGS = settings(max_examples=150, deadline=None)


def check_valid(segments: int, members: Sequence[str], result: Mapping[str, list[int]]) -> None:
    """Every segment exactly once, only live members, every live member a key."""
    assert set(result) == set(members)
    owned = sorted(s for mine in result.values() for s in mine)
    assert owned == list(range(segments))


def is_balanced(segments: int, result: Mapping[str, list[int]]) -> bool:
    q, r = divmod(segments, len(result))
    sizes = sorted(len(mine) for mine in result.values())
    return all(size in (q, q + 1) for size in sizes) and sum(1 for x in sizes if x > q) == r


@st.composite
def states(draw: st.DrawFn, max_segments: int = 40, overlap: bool = False) -> tuple[int, dict[str, list[int]]]:
    """A segment count and a ``before``: some segments owned by some members (any of
    NAMES, live after or not), unbalanced at will, some unowned; with ``overlap``,
    segments may be listed by several members."""
    segments = draw(st.integers(0, max_segments))
    owners = draw(st.lists(st.sampled_from(NAMES), min_size=0, max_size=6, unique=True))
    before: dict[str, list[int]] = {m: [] for m in owners}
    if owners:
        for s in range(segments):
            who = draw(st.lists(st.sampled_from(owners), max_size=2 if overlap else 1, unique=True))
            for m in who:
                before[m].append(s)
    return segments, before


# -- fleet's strategy reaches the bound ---------------------------------------------------


@SETTINGS
@given(segments=st.integers(0, 60), sequence=st.lists(MEMBER_SETS, min_size=1, max_size=8))
def test_fleet_moves_exactly_the_bound_along_a_sequence(
    segments: int, sequence: list[list[str]]
) -> None:
    current: dict[str, list[int]] = {}
    for members in sequence:
        bound = S.lower_bound(segments, current, members)
        after = S.fleet(segments, members, current)
        check_valid(segments, members, after)
        most, fewest = S.balance(after)
        assert most - fewest <= 1
        assert S.moved(current, after) == bound
        current = after


@SETTINGS
@given(state=states(overlap=True), members=MEMBER_SETS)
def test_fleet_moves_exactly_the_bound_from_any_state(
    state: tuple[int, dict[str, list[int]]], members: list[str]
) -> None:
    segments, before = state
    after = S.fleet(segments, members, before)
    check_valid(segments, members, after)
    assert is_balanced(segments, after)
    assert S.moved(before, after) == S.lower_bound(segments, before, members)


# -- the bound is a bound, and tight ------------------------------------------------------


def all_balanced(segments: int, members: Sequence[str]) -> list[dict[str, list[int]]]:
    found = []
    for owners in product(members, repeat=segments):
        result: dict[str, list[int]] = {m: [] for m in members}
        for s, m in enumerate(owners):
            result[m].append(s)
        if is_balanced(segments, result):
            found.append(result)
    return found


@settings(max_examples=120, deadline=None)
@given(
    state=states(max_segments=6),
    members=st.lists(st.sampled_from(NAMES[:5]), min_size=1, max_size=3, unique=True),
)
def test_bound_is_the_minimum_over_every_balanced_assignment(
    state: tuple[int, dict[str, list[int]]], members: list[str]
) -> None:
    segments, before = state
    best = min(S.moved(before, after) for after in all_balanced(segments, members))
    assert S.lower_bound(segments, before, members) == best


@SETTINGS
@given(state=states(), members=MEMBER_SETS, data=st.data())
def test_bound_never_exceeds_a_random_balanced_assignment(
    state: tuple[int, dict[str, list[int]]], members: list[str], data: st.DataObject
) -> None:
    segments, before = state
    order = data.draw(st.permutations(range(segments)))
    big = data.draw(st.permutations(members))[: segments % len(members)]
    result: dict[str, list[int]] = {}
    it = iter(order)
    for m in members:
        size = segments // len(members) + (1 if m in big else 0)
        result[m] = sorted(next(it) for _ in range(size))
    assert is_balanced(segments, result)
    assert S.lower_bound(segments, before, members) <= S.moved(before, result)


@SETTINGS
@given(segments=st.integers(0, 60), sequence=st.lists(MEMBER_SETS, min_size=2, max_size=6))
def test_bound_never_exceeds_the_other_strategies_when_balanced(
    segments: int, sequence: list[list[str]]
) -> None:
    for name in OTHERS:
        strategy = S.STRATEGIES[name]
        current: dict[str, list[int]] = {}
        for members in sequence:
            after = strategy(segments, members, current)
            if is_balanced(segments, after):
                assert S.lower_bound(segments, current, members) <= S.moved(current, after)
            current = after


# -- the other strategies are valid ------------------------------------------------------


@SETTINGS
@given(segments=st.integers(0, 80), members=MEMBER_SETS, state=states())
def test_other_strategies_give_every_segment_once_to_a_live_member(
    segments: int, members: list[str], state: tuple[int, dict[str, list[int]]]
) -> None:
    for name in OTHERS:
        result = S.STRATEGIES[name](segments, members, state[1])
        check_valid(segments, members, result)
        if name != "hash_ring":
            assert is_balanced(segments, result), name


def test_no_members_no_assignment() -> None:
    for name, strategy in S.STRATEGIES.items():
        assert strategy(10, [], {}) == {}, name
    assert S.lower_bound(4, {"a": [0, 1], "b": [2]}, []) == 3


def test_contiguous_matches_the_original_example() -> None:
    """The worked example in the original .NET project's README (10 segments)."""
    ten = list(range(10))
    assert S.contiguous(10, ["node1"], {}) == {"node1": ten}
    assert S.contiguous(10, ["node2", "node1"], {}) == {"node1": ten[:5], "node2": ten[5:]}
    three = S.contiguous(10, ["node3", "node1", "node2"], {})
    assert three == {"node1": ten[:4], "node2": ten[4:7], "node3": ten[7:]}


def test_round_robin_deals_in_id_order() -> None:
    assert S.round_robin(5, ["b", "a"], {}) == {"a": [0, 2, 4], "b": [1, 3]}


def test_hash_ring_is_the_same_in_every_process() -> None:
    """blake2b, not the per-process salted hash(): another PYTHONHASHSEED, same ring."""
    code = (
        "import importlib.util, json, sys;"
        f"spec = importlib.util.spec_from_file_location('s', {str(BENCH / 'strategies.py')!r});"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "print(json.dumps(m.hash_ring(200, ['x', 'y', 'host-1', 'host-2'], {})))"
    )
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1] == S.hash_ring(200, ["x", "y", "host-1", "host-2"], {})


# -- the benchmark as a user runs it -----------------------------------------------------


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/movement.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    proc = run_bench("--quick", "--seed", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "movement-quick.json").read_text())
    markdown = (tmp_path / "movement-quick.md").read_text()
    assert report["parameters"]["quick"] is True and report["parameters"]["seed"] == 3
    cells = {(c["segments"], c["members"]): c for c in report["cells"]}
    assert len(cells) == len(report["parameters"]["segments"]) * len(report["parameters"]["members"])
    for cell in cells.values():
        assert set(cell["summary"]) == {"fleet", *OTHERS}
        fleet = cell["summary"]["fleet"]
        assert fleet["moved"] == fleet["lower_bound"] and fleet["moved_over_bound"] in (1.0, None)
        assert all(s["new"] == cell["segments"] for s in cell["summary"].values())
        assert len(cell["events"]) == report["parameters"]["events"]
    assert f"`python bench/movement.py --quick --seed 3 --out {tmp_path}`" in markdown
    assert "| S | N | strategy | moved | lower bound |" in markdown
    assert markdown.count("| fleet |") == len(cells)
    assert not (tmp_path / "movement.json").exists()  # --quick never replaces the full run


def test_bad_event_count_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_bench("--quick", "--events", "0", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "--events must be at least 1, got 0" in proc.stderr
    assert not list(tmp_path.iterdir())
