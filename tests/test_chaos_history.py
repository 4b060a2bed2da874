"""Unit tests of the chaos-run invariant checker (`tests.chaos.history`) on hand-made ledgers.

It is the oracle of every chaos test, so it must catch each fault it claims to (overlap,
token going backwards, double-applied commit, lost commit, phantom commit) and stay
quiet on the untidy but correct histories a chaos run produces: calls fenced out while
a new owner works, processes killed after their commit landed, ambiguous commits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.history import KINDS, Violation, check, check_calls, summarize
from tests.support import recording
from tests.support.checker import check_history, load_calls

Record = dict[str, Any]
_UNSET: Any = object()


def _call(
    seg: int,
    token: int,
    t0: float,
    t1: float | None,
    *,
    read: Any = None,
    commit: str = "ok",
    pid: int = 1,
    member: str = "m",
) -> list[Record]:
    """The ledger lines of one call: a start at t0 and, unless t1 is None, an end at t1.

    An ok call's work ends just before its end line (its commit took 1 ms).
    """
    ids = {"segment": seg, "token": token, "member": member, "pid": pid}
    lines: list[Record] = [{"ev": "start", **ids, "t": t0, "wall": 1000.0 + t0}]
    if t1 is not None:
        lines.append({"ev": "end", **ids, "t": t1, "work_end": t1 - 0.001,
                      "wall": 1000.0 + t1, "commit": commit, "checkpoint_read": read})  # fmt: skip
    return lines


def _write(ledger: Path, member: str, pid: int, *calls: list[Record]) -> None:
    """One process's ledger file, lines in time order (as the process would write them)."""
    ledger.mkdir(exist_ok=True)
    records = sorted((r for call in calls for r in call), key=lambda r: r["t"])
    path = ledger / f"{member}-{pid}.jsonl"
    with path.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def _found(violations: list[Violation]) -> set[tuple[str, int]]:
    return {(v.kind, v.segment) for v in violations}


def _write_clean_history(ledger: Path) -> dict[int, Any]:
    """A correct but untidy history over 5 segments; returns its final checkpoints."""
    # Segment 0. Member a (pid 1) owns it under token 10 and commits 1 and 2; its third
    # call is paused past the lease, overlaps the next owner and is fenced ("lost").
    # Member b (token 20) read 2, commits 3, then is killed after its next commit (4)
    # landed but before the end line: an unterminated call whose increment IS in the
    # final value. Member a, restarted in-process (same pid, same file, new lease), takes
    # the segment back under token 30 and commits 5.
    _write(ledger, "a", 1,
           _call(0, 10, 1.0, 1.1, read=None, pid=1, member="a"),
           _call(0, 10, 1.2, 1.3, read=1, pid=1, member="a"),
           _call(0, 10, 1.4, 2.0, read=2, commit="lost", pid=1, member="a"),
           _call(0, 30, 2.5, 2.6, read=4, pid=1, member="a"))  # fmt: skip
    _write(ledger, "b", 2,
           _call(0, 20, 1.6, 1.7, read=2, pid=2, member="b"),
           _call(0, 20, 1.8, None, pid=2, member="b"))  # fmt: skip
    # Segment 1. c's commit of 2 raises (it landed anyway: "error"); the retried call
    # reads the unchanged ctx.checkpoint and commits 2 again, ok. Then c's commit of 3
    # raises and lands, and c hands over: d reads 3 and commits 4. Value 3 is explained
    # only by the ambiguous "error" commit.
    _write(ledger, "c", 3,
           _call(1, 11, 1.0, 1.1, read=None, pid=3, member="c"),
           _call(1, 11, 1.2, 1.3, read=1, commit="error", pid=3, member="c"),
           _call(1, 11, 1.4, 1.5, read=1, pid=3, member="c"),
           _call(1, 11, 1.6, 1.7, read=2, commit="error", pid=3, member="c"))  # fmt: skip
    _write(ledger, "d", 4, _call(1, 21, 2.0, 2.1, read=3, pid=4, member="d"))
    # Segment 2. e's commit of 2 times out until the deadline ("lost"), but the attempt
    # had been applied; its end line comes late, overlapping f, who reads 2 and commits 3.
    _write(ledger, "e", 5,
           _call(2, 12, 1.0, 1.1, read=None, pid=5, member="e"),
           _call(2, 12, 1.2, 1.9, read=1, commit="lost", pid=5, member="e"))  # fmt: skip
    _write(ledger, "f", 6, _call(2, 22, 1.5, 1.6, read=2, pid=6, member="f"))
    # Segment 3: g dies at its first call (no commit); nothing is committed.
    _write(ledger, "g", 7, _call(3, 13, 1.0, None, pid=7, member="g"))
    # Segment 4: never worked on, absent from the mapping.
    return {0: 5, 1: 4, 2: 3, 3: None}


def test_clean_history_has_no_violations(tmp_path: Path) -> None:
    final = _write_clean_history(tmp_path)
    assert check(tmp_path, final, segments=5) == []
    # The fenced calls are what the plain overlap check, without allow_fenced, objects to.
    calls = load_calls(tmp_path)
    assert check_history(calls, allow_fenced=True) == []
    unfenced = check_history(calls)
    assert unfenced and all(v.startswith(("segment 0:", "segment 2:")) for v in unfenced)
    assert summarize(calls) == {
        "calls": 15, "ok_commits": 9, "lost_commits": 2, "error_commits": 2, "unterminated": 2
    }  # fmt: skip
    assert {c.checkpoint_read for c in calls if c.commit == "ok"} == {None, 1, 2, 3, 4}


def test_unterminated_and_ambiguous_calls_are_needed_to_explain_the_final_value(
    tmp_path: Path,
) -> None:
    # Without b's unterminated call, e's landed "lost" call or c's landed "error" call,
    # the same final values would be phantoms: each one is what makes them legitimate.
    _write_clean_history(tmp_path)
    final = {0: 5, 1: 4, 2: 3}
    calls = load_calls(tmp_path)
    for dropped, segment in [((0, 20, 1.8), 0), ((2, 12, 1.2), 2), ((1, 11, 1.6), 1)]:
        kept = [c for c in calls if (c.segment, c.token, c.start) != dropped]
        assert len(kept) == len(calls) - 1
        assert _found(check_calls(kept, final, segments=5)) == {("phantom_commit", segment)}


def test_overlap_is_reported(tmp_path: Path) -> None:
    _write(tmp_path, "a", 1, _call(0, 10, 1.0, 1.3, read=None, member="a"))
    _write(tmp_path, "b", 2, _call(0, 20, 1.2, 1.4, read=1, pid=2, member="b"))
    violations = check(tmp_path, {0: 2}, segments=1)
    assert _found(violations) == {("overlap", 0)}
    assert "10" in violations[0].detail and "20" in violations[0].detail


def test_unterminated_call_overlaps_only_at_its_start(tmp_path: Path) -> None:
    # A call whose process died counts from its start to its start: a later owner is fine,
    # but an owner already working when it starts overlaps it.
    _write(tmp_path, "a", 1, _call(0, 10, 1.0, None, member="a"))
    _write(tmp_path, "b", 2, _call(0, 20, 1.1, 1.2, read=None, pid=2, member="b"))
    _write(tmp_path, "c", 3, _call(1, 21, 1.0, 1.2, read=None, pid=3, member="c"))
    _write(tmp_path, "d", 4, _call(1, 31, 1.1, None, pid=4, member="d"))
    assert _found(check(tmp_path, {0: 1, 1: 1}, segments=2)) == {("overlap", 1)}


def test_token_going_backwards_is_reported(tmp_path: Path) -> None:
    _write(tmp_path, "b", 2, _call(0, 20, 1.0, 1.1, read=None, pid=2, member="b"))
    _write(tmp_path, "a", 1, _call(0, 10, 1.2, 1.3, read=1, member="a"))
    violations = check(tmp_path, {0: 2}, segments=1)
    assert _found(violations) == {("token_regression", 0)}
    assert "from 20 to 10" in violations[0].detail


def test_double_applied_commit_is_reported(tmp_path: Path) -> None:
    # b read a stale checkpoint: a's increment 0 -> 1 was acknowledged twice.
    _write(tmp_path, "a", 1, _call(0, 10, 1.0, 1.1, read=None, member="a"))
    _write(tmp_path, "b", 2, _call(0, 20, 1.2, 1.3, read=None, pid=2, member="b"))
    violations = check(tmp_path, {0: 1}, segments=1)
    assert _found(violations) == {("double_apply", 0)}
    assert "acknowledged 2 times" in violations[0].detail


def test_lost_commit_is_reported(tmp_path: Path) -> None:
    # Commits 1, 2 and 3 were acknowledged, but the final state says 1: it went back.
    _write(tmp_path, "a", 1,
           _call(0, 10, 1.0, 1.1, read=None, member="a"),
           _call(0, 10, 1.2, 1.3, read=1, member="a"))  # fmt: skip
    _write(tmp_path, "b", 2, _call(0, 20, 1.4, 1.5, read=2, pid=2, member="b"))
    violations = check(tmp_path, {0: 1}, segments=1)
    assert _found(violations) == {("lost_commit", 0)}
    assert "2 acknowledged commit(s) above the final checkpoint 1" in violations[0].detail
    # An acknowledged commit and a checkpoint that is absent at the end: lost as well.
    assert _found(check(tmp_path, {}, segments=1)) == {("lost_commit", 0)}


def test_phantom_commit_is_reported(tmp_path: Path) -> None:
    # Segment 0: one ok commit (1) and one call cut short (one more at most): 2 is the
    # highest final value these calls can explain.
    _write(tmp_path, "a", 1,
           _call(0, 10, 1.0, 1.1, read=None, member="a"),
           _call(0, 10, 1.2, None, member="a"))  # fmt: skip
    assert check(tmp_path, {0: 2}, segments=3) == []
    violations = check(tmp_path, {0: 3, 1: 1, 2: "garbage"}, segments=3)
    assert _found(violations) == {("phantom_commit", 0), ("phantom_commit", 1),
                                  ("phantom_commit", 2)}  # fmt: skip
    assert "(2, 3)" in violations[0].detail  # names the unexplained values
    # A fenced call's value counts as possibly landed, but only that value.
    _write(tmp_path, "b", 2, _call(0, 20, 1.3, 1.4, read=5, commit="lost", pid=2, member="b"))
    assert _found(check(tmp_path, {0: 3}, segments=1)) == {("phantom_commit", 0)}


def test_all_four_faults_at_once_are_each_reported_on_their_segment(tmp_path: Path) -> None:
    # Five segments over three processes; segment 4 is clean.
    _write(tmp_path, "a", 1,
           _call(0, 10, 1.0, 1.3, read=None, member="a"),  # overlaps b on segment 0
           _call(1, 21, 1.0, 1.1, read=None, member="a"),  # token 21, then c's 11
           _call(2, 12, 1.0, 1.1, read=None, member="a"),  # 0 -> 1 ...
           _call(3, 13, 1.0, 1.1, read=None, member="a"),
           _call(3, 13, 1.2, 1.3, read=1, member="a"),
           _call(4, 14, 1.0, 1.1, read=None, member="a"))  # fmt: skip
    _write(tmp_path, "b", 2,
           _call(0, 20, 1.2, 1.4, read=1, pid=2, member="b"),
           _call(2, 22, 1.2, 1.3, read=None, pid=2, member="b"),  # ... 0 -> 1 again
           _call(3, 23, 1.4, 1.5, read=2, pid=2, member="b"),  # 3, final says 2
           _call(4, 24, 1.2, 1.3, read=1, pid=2, member="b"))  # fmt: skip
    _write(tmp_path, "c", 3, _call(1, 11, 1.2, 1.3, read=1, pid=3, member="c"))
    final = {0: 2, 1: 2, 2: 1, 3: 2, 4: 2}
    violations = check(tmp_path, final, segments=5)
    assert _found(violations) == {
        ("overlap", 0), ("token_regression", 1), ("double_apply", 2), ("lost_commit", 3)
    }  # fmt: skip
    assert [v.segment for v in violations] == [0, 1, 2, 3]  # sorted, one each
    assert all(v.kind in KINDS and str(v).startswith(f"segment {v.segment}: ") for v in violations)


def test_segments_outside_the_range_are_an_input_error(tmp_path: Path) -> None:
    _write(tmp_path, "a", 1, _call(5, 10, 1.0, 1.1, read=None, member="a"))
    with pytest.raises(ValueError, match="segment 5, outside 0..1"):
        check(tmp_path, {}, segments=2)
    with pytest.raises(ValueError, match="segment 7"):
        check_calls([], {7: 3}, segments=2)
    assert check_calls([], {7: None}, segments=2) == []


def test_summarize_counts_outcomes() -> None:
    assert summarize([]) == {
        "calls": 0, "ok_commits": 0, "lost_commits": 0, "error_commits": 0, "unterminated": 0
    }  # fmt: skip


@dataclass
class _Ctx:
    """The handler-visible part of fleet.SegmentContext over a dict standing for etcd."""

    segment: int
    token: int
    member_id: str
    store: dict[int, Any]
    accept: bool = True
    checkpoint: Any = _UNSET
    stopping: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.checkpoint is _UNSET:
            self.checkpoint = self.store.get(self.segment)  # read at acquire

    def commit(self, value: Any) -> None:
        from fleet import LostOwnership

        if not self.accept:
            raise LostOwnership("fenced")
        self.store[self.segment] = value
        self.checkpoint = value


def test_ledgers_of_the_real_recording_handler_check_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(recording.LEDGER_ENV, str(tmp_path))
    monkeypatch.setenv(recording.CALL_SECONDS_ENV, "0.001")
    store: dict[int, Any] = {}
    try:
        first = _Ctx(segment=0, token=10, member_id="m1", store=store)
        for _ in range(3):
            recording.handle(first)  # type: ignore[arg-type]
        recording.handle(_Ctx(segment=0, token=10, member_id="m1", store=store, accept=False))  # type: ignore[arg-type]
        second = _Ctx(segment=0, token=20, member_id="m2", store=store)
        for _ in range(2):
            recording.handle(second)  # type: ignore[arg-type]
    finally:
        recording.close_ledgers()
    assert store == {0: 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"m1-{os.getpid()}.jsonl", f"m2-{os.getpid()}.jsonl"
    ]  # fmt: skip
    calls = load_calls(tmp_path)
    assert [c.checkpoint_read for c in calls] == [None, 1, 2, 3, 3, 4]
    assert check(tmp_path, store, segments=1) == []
    assert _found(check(tmp_path, {0: 4}, segments=1)) == {("lost_commit", 0)}


# -- hooks, child processes and pauses ----------------------------------------------------


def _hook(
    seg: int, token: int, t0: float, t1: float | None, *, kind: str = "on_release",
    pid: int = 1, member: str = "m", lost: bool = False,
) -> list[Record]:  # fmt: skip
    """The ledger lines of one hook run (`tests.support.recording.record_hook`)."""
    ids = {"segment": seg, "token": token, "member": member, "pid": pid}
    start: Record = {"ev": "start", "kind": kind, **ids, "t": t0, "wall": 1000.0 + t0}
    if lost:
        start["lost"] = True
    lines = [start]
    if t1 is not None:
        lines.append({"ev": "end", "kind": kind, **ids, "t": t1, "wall": 1000.0 + t1,
                      "commit": None, "lost": lost})  # fmt: skip
    return lines


def _child_lines(call_id: str, seg: int, token: int, times: list[float], pid: int = 1,
                 member: str = "m") -> list[Record]:  # fmt: skip
    return [{"ev": "child", "call": call_id, "segment": seg, "token": token, "member": member,
             "pid": 900 + pid, "parent": pid, "n": n, "t": t, "wall": 1000.0 + t}
            for n, t in enumerate(times)]  # fmt: skip


def _child_call(seg: int, token: int, t0: float, t1: float | None, call_id: str,
                **kw: Any) -> list[Record]:  # fmt: skip
    lines = _call(seg, token, t0, t1, **kw)
    for line in lines:
        line["call"] = call_id
    lines[0]["child"] = 1.0
    return lines


def test_a_hook_overlapping_another_token_is_reported(tmp_path: Path) -> None:
    # a's on_release (token 10) runs on after b acquired and worked (token 20): the hook
    # ran outside the fence. It commits nothing, so no fence excuses it.
    _write(tmp_path, "a", 1, _call(0, 10, 1.0, 1.1, read=None, member="a"),
           _hook(0, 10, 1.2, 2.0, member="a"))  # fmt: skip
    _write(tmp_path, "b", 2, _hook(0, 20, 1.5, 1.6, kind="on_acquire", pid=2, member="b"),
           _call(0, 20, 1.7, 1.8, read=1, pid=2, member="b"))  # fmt: skip
    violations = check(tmp_path, {0: 2}, segments=1)
    assert [v.kind for v in violations] == ["overlap"]  # one incident: a's stale hook
    assert "[on_release member a" in violations[0].detail
    assert "beside 2 run(s), first [on_acquire member b" in violations[0].detail
    assert check_history(load_calls(tmp_path), allow_fenced=True)  # the plain checker too
    # In order (release before the next acquire), the same hooks are a clean handoff, and
    # hooks take no part in the checkpoint rules.
    other = tmp_path / "ordered"
    _write(other, "a", 1, _call(0, 10, 1.0, 1.1, read=None, member="a"),
           _hook(0, 10, 1.2, 1.4, member="a"))  # fmt: skip
    _write(other, "b", 2, _hook(0, 20, 1.5, 1.6, kind="on_acquire", pid=2, member="b"),
           _call(0, 20, 1.7, 1.8, read=1, pid=2, member="b"))  # fmt: skip
    assert check(other, {0: 2}, segments=1) == []
    counts = summarize(load_calls(other))
    assert (counts["calls"], counts["hooks"], counts["hooks_cut_short"]) == (2, 2, 0)


def test_a_hook_cut_short_counts_from_its_start_and_a_hook_told_lost_not_at_all(
    tmp_path: Path,
) -> None:
    _write(tmp_path, "a", 1, _hook(0, 10, 1.0, None, member="a"),  # killed mid-hook
           _hook(1, 11, 1.3, 1.35, member="a", lost=True))  # told: did nothing  # fmt: skip
    _write(tmp_path, "b", 2, _call(0, 20, 1.1, 1.2, read=None, pid=2, member="b"),
           _call(1, 21, 1.0, 1.5, read=None, pid=2, member="b"))  # fmt: skip
    assert check(tmp_path, {0: 1, 1: 1}, segments=2) == []
    _write(tmp_path, "c", 3, _hook(1, 32, 1.2, None, pid=3, member="c"))  # starts inside b's
    assert _found(check(tmp_path, {0: 1, 1: 1}, segments=2)) == {("overlap", 1)}


def test_a_child_process_that_outlives_its_call_extends_it(tmp_path: Path) -> None:
    # a's call (token 10) was killed at once (no end line), but its child kept writing
    # until 1.6, after b's call (token 20) started at 1.3: an overlap, even though the
    # call itself counts only at its start.
    _write(tmp_path, "a", 1, _child_call(0, 10, 1.0, None, "1.1", member="a"))
    _write(tmp_path, "a-1-child-901", 901, _child_lines("1.1", 0, 10, [1.0, 1.2, 1.4, 1.6]))
    _write(tmp_path, "b", 2, _call(0, 20, 1.3, 1.4, read=None, pid=2, member="b"))
    violations = check(tmp_path, {0: 1}, segments=1)
    assert _found(violations) == {("overlap", 0)}
    assert "child last wrote 1.600000" in violations[0].detail
    [killed] = [c for c in load_calls(tmp_path) if c.token == 10]
    assert (killed.own_end, killed.effective_end) == (1.0, 1.6)
    # The same call whose child died with it (last write 1.2, before b started) is clean.
    clean = tmp_path / "clean"
    _write(clean, "a", 1, _child_call(0, 10, 1.0, None, "1.1", member="a"))
    _write(clean, "a-1-child-901", 901, _child_lines("1.1", 0, 10, [1.0, 1.2]))
    _write(clean, "b", 2, _call(0, 20, 1.3, 1.4, read=None, pid=2, member="b"))
    assert check(clean, {0: 1}, segments=1) == []
    counts = summarize(load_calls(clean))
    assert (counts["child_calls"], counts["child_calls_cut_short"]) == (1, 1)


def test_a_fenced_calls_child_writes_still_count(tmp_path: Path) -> None:
    # A fenced-out call is excused for its own work (its commit was refused), not for
    # what its child wrote meanwhile: the child's writes are not fenced.
    _write(tmp_path, "a", 1, _child_call(0, 10, 1.0, 2.0, "1.1", read=None, commit="lost",
                                         member="a"))  # fmt: skip
    _write(tmp_path, "a-1-child-901", 901, _child_lines("1.1", 0, 10, [1.0, 1.5, 1.9]))
    _write(tmp_path, "b", 2, _call(0, 20, 1.6, 1.7, read=None, pid=2, member="b"))
    assert _found(check(tmp_path, {0: 1}, segments=1)) == {("overlap", 0)}
    plain = tmp_path / "plain"  # without the child, the fence excuses the call
    _write(plain, "a", 1, _call(0, 10, 1.0, 2.0, read=None, commit="lost", member="a"))
    _write(plain, "b", 2, _call(0, 20, 1.6, 1.7, read=None, pid=2, member="b"))
    assert check(plain, {0: 1}, segments=1) == []


def test_an_overlap_is_excused_only_by_a_pause_the_old_side_woke_from_just_before(
    tmp_path: Path,
) -> None:
    # a is SIGSTOPped 0.1 s into its on_release (token 10) from 1.1 to 6.1; b acquires
    # meanwhile (token 20). a's hook ends 0.3 s after SIGCONT: the documented limit of
    # unfenced work (the watchdog needs half a margin of awake time), excused.
    _write(tmp_path, "a", 1, _hook(0, 10, 1.0, 6.4, member="a"))
    _write(tmp_path, "b", 2, _call(0, 20, 4.5, 4.6, read=None, pid=2, member="b"),
           _call(0, 20, 6.2, 6.3, read=1, pid=2, member="b"))  # fmt: skip
    pauses = {1: [(1.1, 6.1)]}
    excused: list[Violation] = []
    assert check(tmp_path, {0: 2}, segments=1, pauses=pauses, grace=0.8, excused=excused) == []
    assert len(excused) == 1 and "excused: pid 1 was frozen" in excused[0].detail
    assert _found(check(tmp_path, {0: 2}, segments=1)) == {("overlap", 0)}  # no pause known
    # Over 1.2 s after SIGCONT: it ran on beside b (a watchdog that did not cover it).
    assert _found(check(tmp_path, {0: 2}, segments=1, pauses=pauses, grace=0.2)) == {("overlap", 0)}
    # A pause that began after b started does not explain working beside b while awake.
    late = {1: [(4.55, 6.1)]}
    assert _found(check(tmp_path, {0: 2}, segments=1, pauses=late, grace=0.8)) == {("overlap", 0)}
    # Another process's pause explains nothing.
    assert _found(check(tmp_path, {0: 2}, segments=1, pauses={2: [(1.1, 6.1)]}, grace=0.8)) == {
        ("overlap", 0)
    }


def test_a_pause_between_the_deadline_check_and_the_start_line_is_excused_alike(
    tmp_path: Path,
) -> None:
    # The 10-minute cluster run: a is frozen 1.1..6.1 after its runner passed the final
    # deadline check of an on_acquire but before the hook's first line; b acquires at
    # 4.5 (token 20); a's hook runs 6.102..6.104, right after SIGCONT, under token 10.
    _write(tmp_path, "a", 1, _hook(0, 10, 6.102, 6.104, member="a"))
    _write(tmp_path, "b", 2, _hook(0, 20, 4.5, 6.3, member="b"))
    pauses = {1: [(1.1, 6.1)]}
    excused: list[Violation] = []
    assert check(tmp_path, {0: 0}, segments=1, pauses=pauses, grace=0.8, excused=excused) == []
    assert len(excused) == 1, excused
    # Without the pause: an overlap and a token regression.
    assert _found(check(tmp_path, {0: 0}, segments=1)) == {("overlap", 0), ("token_regression", 0)}
    # Started long after the thaw: nothing froze it between check and start.
    late = tmp_path / "late"
    _write(late, "a", 1, _hook(0, 10, 6.2 + 1.0, 7.25, member="a"))
    _write(late, "b", 2, _hook(0, 20, 4.5, 7.5, member="b"))
    assert _found(check(late, {0: 0}, segments=1, pauses=pauses, grace=0.8)) == {
        ("overlap", 0), ("token_regression", 0)
    }  # fmt: skip
    # Frozen only after b started: awake beside b before the pause, not excused.
    assert _found(check(tmp_path, {0: 0}, segments=1, pauses={1: [(4.6, 6.1)]}, grace=0.8)) == {
        ("overlap", 0), ("token_regression", 0)
    }  # fmt: skip


def test_a_pause_never_excuses_a_child(tmp_path: Path) -> None:
    _write(tmp_path, "a", 1, _child_call(0, 10, 1.0, None, "1.1", member="a"))
    _write(tmp_path, "a-1-child-901", 901, _child_lines("1.1", 0, 10, [1.0, 5.0, 6.2]))
    _write(tmp_path, "b", 2, _call(0, 20, 4.5, 4.6, read=None, pid=2, member="b"))
    found = check(tmp_path, {0: 1}, segments=1, pauses={1: [(1.1, 6.1)]}, grace=0.8)
    assert _found(found) == {("overlap", 0)}


@dataclass
class _HookCtx:
    segment: int
    token: int
    member_id: str
    lost: bool = False
    stop_reason: str | None = None


def test_the_recorder_class_records_its_hooks_slow_on_a_trigger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, slow = tmp_path / "ledger", tmp_path / "slow"
    slow.mkdir()
    monkeypatch.setenv(recording.LEDGER_ENV, str(ledger))
    monkeypatch.setenv(recording.CALL_SECONDS_ENV, "0.001")
    monkeypatch.setenv(recording.SLOW_HOOK_DIR_ENV, str(slow))
    handler = recording.Recorder()
    store: dict[int, Any] = {}
    try:
        handler.on_acquire(_HookCtx(0, 10, "m1"))  # type: ignore[arg-type]
        handler.handle(_Ctx(segment=0, token=10, member_id="m1", store=store))  # type: ignore[arg-type]
        (slow / "m1").write_text("0.2\n")
        handler.on_release(_HookCtx(0, 10, "m1", stop_reason="handoff"))  # type: ignore[arg-type]
        handler.on_release(_HookCtx(0, 10, "m1", lost=True, stop_reason="lost"))  # type: ignore[arg-type]
    finally:
        recording.close_ledgers()
    lines = [json.loads(x) for x in (ledger / f"m1-{os.getpid()}.jsonl").read_text().splitlines()]
    assert [(r["ev"], r.get("kind")) for r in lines] == [
        ("start", "on_acquire"), ("end", "on_acquire"), ("start", None), ("end", None),
        ("start", "on_release"), ("end", "on_release"), ("start", "on_release"),
        ("end", "on_release"),
    ]  # fmt: skip
    slow_start, slow_end, lost_start, lost_end = lines[4:]
    assert slow_start["slow"] == 0.2 and slow_start["reason"] == "handoff"
    assert slow_end["t"] - slow_start["t"] >= 0.2
    assert lost_start["lost"] is True and lost_end["t"] - lost_start["t"] < 0.2  # no work
    calls = load_calls(ledger)
    assert [(c.kind, c.told_lost) for c in calls] == [
        ("on_acquire", False), ("call", False), ("on_release", False), ("on_release", True)
    ]  # fmt: skip
    assert check(ledger, store, segments=1) == []


def test_child_process_work_writes_its_own_ledger_and_outlives_a_killed_worker(
    tmp_path: Path,
) -> None:
    # A worker stand-in runs one call with 1.5 s of child work and kills itself (SIGKILL)
    # 0.3 s in: the child goes on writing, and the call's effective end follows it.
    script = (
        "import os, signal, threading, time\n"
        "from types import SimpleNamespace as NS\n"
        "from tests.support import recording\n"
        "ctx = NS(segment=3, token=30, member_id='w', checkpoint=None,\n"
        "         commit=lambda v: None, stopping=threading.Event())\n"
        "threading.Thread(target=recording.handle, args=(ctx,), daemon=True).start()\n"
        "time.sleep(0.3)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        recording.LEDGER_ENV: str(tmp_path),
        recording.CHILD_SECONDS_ENV: "1.5",
    }
    import subprocess
    import sys
    import time

    result = subprocess.run([sys.executable, "-c", script], env=env, timeout=60)
    assert result.returncode == -9
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:  # the orphaned child finishes by itself
        done = [p for p in tmp_path.glob("w-*-child-*.jsonl") if '"done"' in p.read_text()]
        if done:
            break
        time.sleep(0.1)
    [call] = load_calls(tmp_path)
    assert call.end is None and call.call_id is not None and call.child_last is not None
    assert call.child_last - call.start >= 1.4  # its writes went on after its worker died
