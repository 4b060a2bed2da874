"""Check the safety properties from the ledgers written by `tests.support.recording`.

Two properties, per segment, over all processes:

(a) mutual exclusion: no two calls under different tokens overlap in time. A call
    whose process died mid-call (start line, no end line) is taken to end at its
    start, which is conservative only in that the process provably stopped acting
    by its death and we do not know when that was; the worker protocol makes a
    stale owner stop before a new owner starts, so any overlap is a real bug.
(b) monotonic tokens: ordered by call start, a segment's token never decreases
    (a lower token after a higher one means an old owner worked after a new one).

With ``allow_fenced=True`` calls whose commit was rejected (``"lost"``) are left out
of both checks: the fencing token did its job, so their effects never landed. That
is the right mode for tests that pause a worker (SIGSTOP) past its lease.

Hooks (``on_acquire``/``on_release`` of `tests.support.recording.Recorder`, lines with
``"kind"``) are work under their token like calls, from their start line to their end
line (to their start if the process died): they commit nothing, so no fence excuses
them, except a hook told at its start that the ownership was gone (``"lost"``), which
did nothing. A call that worked in a child process (``"child"`` lines naming its
``"call"`` id) worked until the child's last write, whatever became of the call: the
child's writes are not fenced, and a child outlives a worker killed mid-call unless its
process group is killed, so they count even for a fenced-out call.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_REPORTED = 50


@dataclass(frozen=True)
class Call:
    """One handler call, from its start line and (if the process lived) its end line."""

    segment: int
    token: int
    member: str
    pid: int
    start: float
    end: float | None
    commit: str | None
    # What the handler read as the segment's checkpoint (`ctx.checkpoint`), from the end
    # line; None for an absent checkpoint and for a call without an end line.
    checkpoint_read: Any = None
    kind: str = "call"  # or a hook's name ("on_acquire", "on_release")
    # Time of the last ledger write of the call's child process(es), if it had any.
    child_last: float | None = None
    told_lost: bool = False  # a hook told at its start that the ownership was gone
    call_id: str | None = None

    @property
    def is_hook(self) -> bool:
        return self.kind != "call"

    @property
    def own_end(self) -> float:
        """End of the call's own work: a call cut short ends where it began."""
        return self.end if self.end is not None else self.start

    @property
    def effective_end(self) -> float:
        """End of the interval for overlap checks: its own end or its child's last write."""
        if self.child_last is not None:
            return max(self.own_end, self.child_last)
        return self.own_end

    def counted(self, allow_fenced: bool) -> tuple[float, float] | None:
        """The interval the mutual-exclusion checks count (None: left out altogether).

        A fenced-out call's own work is excused (its commit was refused), its child's
        writes are not; a hook told it had lost the segment did nothing.
        """
        if self.told_lost:
            return None
        if allow_fenced and self.commit == "lost":
            if self.child_last is None:
                return None
            return (self.start, max(self.start, self.child_last))
        return (self.start, self.effective_end)

    def describe(self) -> str:
        """Short form for violation messages."""
        end = f"{self.end:.6f}" if self.end is not None else "never (process died)"
        what = "" if self.kind == "call" else f"{self.kind} "
        child = ""
        if self.child_last is not None:
            child = f" child last wrote {self.child_last:.6f}"
        outcome = f" commit={self.commit}" if not self.is_hook else ""
        if self.told_lost:
            outcome = " told lost"
        return (
            f"[{what}member {self.member} pid {self.pid} token {self.token} "
            f"{self.start:.6f}..{end}{outcome}{child}]"
        )


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Parse one ledger; a torn final line (process killed mid-write) is ignored."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: corrupt ledger line: {line!r}") from None
    return records


def load_calls(ledger_dir: Path) -> list[Call]:
    """All calls and hooks recorded under `ledger_dir` (every ``*.jsonl``), by start time.

    Start and end lines are paired per (pid, segment, token, kind) in file order (first
    open start gets the next end); a start left without an end gets ``end=None``. Child
    lines (``"ev": "child"``, in the child processes' ``*-child-*.jsonl`` files) give
    their call, named by ``"call"``, its ``child_last``.
    """
    paths = sorted(Path(ledger_dir).glob("*.jsonl"))
    # Child processes write files of their own (``...-child-<pid>.jsonl``): read those
    # first, so that each worker file is read once and let go (a long run's ledgers do
    # not fit in memory as parsed lines).
    child_paths = [p for p in paths if "-child-" in p.name]
    child_last: dict[str, float] = {}
    for path in child_paths:
        for rec in _read_records(path):
            if rec["ev"] == "child":
                call_id, t = str(rec["call"]), float(rec["t"])
                child_last[call_id] = max(t, child_last.get(call_id, t))
    calls: list[Call] = []
    for path in paths:
        if path in child_paths:
            continue
        open_starts: dict[tuple[int, int, int, str], deque[dict[str, Any]]] = defaultdict(deque)
        for rec in _read_records(path):
            if rec["ev"] == "child":
                continue
            key = (int(rec["pid"]), int(rec["segment"]), int(rec["token"]), _kind(rec))
            if rec["ev"] == "start":
                open_starts[key].append(rec)
            elif rec["ev"] == "end":
                if not open_starts[key]:
                    raise ValueError(f"{path}: end without start: {rec!r}")
                start = open_starts[key].popleft()
                if key[3] != "call":
                    calls.append(_call(start, end=float(rec["t"]), commit=None))
                    continue
                commit = str(rec["commit"])
                # A successful commit proves the work ended no later than `work_end`
                # (a freeze after it must not read as an overlap); otherwise the end
                # line's own time is the end.
                end = rec.get("work_end", rec["t"]) if commit == "ok" else rec["t"]
                read = rec.get("checkpoint_read")
                calls.append(
                    _call(
                        start,
                        end=float(end),
                        commit=commit,
                        checkpoint_read=read,
                        child_last=child_last,
                    )  # fmt: skip
                )
            else:
                raise ValueError(f"{path}: unknown event {rec['ev']!r}")
        for pending in open_starts.values():
            calls.extend(
                _call(start, end=None, commit=None, child_last=child_last) for start in pending
            )
    calls.sort(key=lambda c: (c.start, c.pid))
    return calls


def _kind(rec: dict[str, Any]) -> str:
    return str(rec.get("kind") or "call")


def _call(
    start: dict[str, Any],
    end: float | None,
    commit: str | None,
    checkpoint_read: Any = None,
    child_last: dict[str, float] | None = None,
) -> Call:
    call_id = start.get("call")
    return Call(
        segment=int(start["segment"]),
        token=int(start["token"]),
        member=str(start["member"]),
        pid=int(start["pid"]),
        start=float(start["t"]),
        end=end,
        commit=commit,
        checkpoint_read=checkpoint_read,
        kind=_kind(start),
        child_last=(child_last or {}).get(str(call_id)) if call_id is not None else None,
        told_lost=bool(start.get("lost")),
        call_id=str(call_id) if call_id is not None else None,
    )


def check_history(calls: list[Call], *, allow_fenced: bool = False) -> list[str]:
    """Human-readable violations of (a) and (b) above; empty means the history is safe."""
    by_segment: dict[int, list[tuple[Call, float]]] = defaultdict(list)
    for call in calls:
        span = call.counted(allow_fenced)
        if span is not None:
            by_segment[call.segment].append((call, span[1]))

    violations: list[str] = []
    for segment in sorted(by_segment):
        seg = sorted(by_segment[segment], key=lambda ce: (ce[0].start, ce[1]))
        # (a) sweep in start order, keeping the calls still running at each start.
        active: list[tuple[Call, float]] = []
        for call, end in seg:
            active = [(a, a_end) for a, a_end in active if a_end > call.start]
            for other, _ in active:
                if other.token != call.token:
                    violations.append(
                        f"segment {segment}: overlapping calls under different tokens: "
                        f"{other.describe()} and {call.describe()}"
                    )
            active.append((call, end))
        # (b) token never decreases in start order.
        highest: Call | None = None
        for call, _ in seg:
            if highest is not None and call.token < highest.token:
                violations.append(
                    f"segment {segment}: token went down from {highest.token} to "
                    f"{call.token}: {highest.describe()} then {call.describe()}"
                )
            if highest is None or call.token > highest.token:
                highest = call
    return violations


def assert_history_ok(
    ledger_dir: Path, allow_fenced: bool = False, min_calls: int = 1
) -> list[Call]:
    """Assert the ledgers show a safe history with at least `min_calls` calls.

    Returns the calls, for further test-specific assertions.
    """
    calls = load_calls(ledger_dir)
    violations = check_history(calls, allow_fenced=allow_fenced)
    if violations:
        shown = "\n".join(violations[:MAX_REPORTED])
        more = len(violations) - MAX_REPORTED
        extra = f"\n... and {more} more" if more > 0 else ""
        print(f"history violations in {ledger_dir}:\n{shown}{extra}")
        raise AssertionError(
            f"{len(violations)} safety violation(s) in {len(calls)} calls:\n{shown}{extra}"
        )
    handled = sum(not c.is_hook for c in calls)
    assert handled >= min_calls, (
        f"expected at least {min_calls} handler calls in {ledger_dir}, found {handled}"
    )
    return calls
