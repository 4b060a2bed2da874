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

    @property
    def effective_end(self) -> float:
        """End of the interval for overlap checks: a call cut short ends where it began."""
        return self.end if self.end is not None else self.start

    def describe(self) -> str:
        """Short form for violation messages."""
        end = f"{self.end:.6f}" if self.end is not None else "never (process died)"
        return (
            f"[member {self.member} pid {self.pid} token {self.token} "
            f"{self.start:.6f}..{end} commit={self.commit}]"
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
    """All calls recorded under `ledger_dir` (every ``*.jsonl``), sorted by start time.

    Start and end lines are paired per (pid, segment, token) in file order (first
    open start gets the next end); a start left without an end gets ``end=None``.
    """
    calls: list[Call] = []
    for path in sorted(Path(ledger_dir).glob("*.jsonl")):
        open_starts: dict[tuple[int, int, int], deque[dict[str, Any]]] = defaultdict(deque)
        for rec in _read_records(path):
            key = (int(rec["pid"]), int(rec["segment"]), int(rec["token"]))
            if rec["ev"] == "start":
                open_starts[key].append(rec)
            elif rec["ev"] == "end":
                if not open_starts[key]:
                    raise ValueError(f"{path}: end without start: {rec!r}")
                start = open_starts[key].popleft()
                commit = str(rec["commit"])
                # A successful commit proves the work ended no later than `work_end`
                # (a freeze after it must not read as an overlap); otherwise the end
                # line's own time is the end.
                end = rec.get("work_end", rec["t"]) if commit == "ok" else rec["t"]
                read = rec.get("checkpoint_read")
                calls.append(_call(start, end=float(end), commit=commit, checkpoint_read=read))
            else:
                raise ValueError(f"{path}: unknown event {rec['ev']!r}")
        for pending in open_starts.values():
            calls.extend(_call(start, end=None, commit=None) for start in pending)
    calls.sort(key=lambda c: (c.start, c.pid))
    return calls


def _call(
    start: dict[str, Any], end: float | None, commit: str | None, checkpoint_read: Any = None
) -> Call:
    return Call(
        segment=int(start["segment"]),
        token=int(start["token"]),
        member=str(start["member"]),
        pid=int(start["pid"]),
        start=float(start["t"]),
        end=end,
        commit=commit,
        checkpoint_read=checkpoint_read,
    )


def check_history(calls: list[Call], *, allow_fenced: bool = False) -> list[str]:
    """Human-readable violations of (a) and (b) above; empty means the history is safe."""
    by_segment: dict[int, list[Call]] = defaultdict(list)
    for call in calls:
        if allow_fenced and call.commit == "lost":
            continue
        by_segment[call.segment].append(call)

    violations: list[str] = []
    for segment in sorted(by_segment):
        seg_calls = sorted(by_segment[segment], key=lambda c: (c.start, c.effective_end))
        # (a) sweep in start order, keeping the calls still running at each start.
        active: list[Call] = []
        for call in seg_calls:
            active = [a for a in active if a.effective_end > call.start]
            for other in active:
                if other.token != call.token:
                    violations.append(
                        f"segment {segment}: overlapping calls under different tokens: "
                        f"{other.describe()} and {call.describe()}"
                    )
            active.append(call)
        # (b) token never decreases in start order.
        highest: Call | None = None
        for call in seg_calls:
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
    assert len(calls) >= min_calls, (
        f"expected at least {min_calls} handler calls in {ledger_dir}, found {len(calls)}"
    )
    return calls
