"""The invariant checker of a chaos run: a Jepsen-style check of a recorded history.

Input: the ledgers written by `tests.support.recording` (one start line and, if the
process lived, one end line per handler call) and the final checkpoint of every
segment, read from etcd once every worker has stopped. Output: a list of
`Violation`s, empty for a correct history.

The recording handler reads ``ctx.checkpoint`` (``checkpoint_read``), works, then
commits ``checkpoint_read + 1`` (an absent checkpoint reads as 0), so a segment's
checkpoint is a counter of applied increments and every call names the increment it
tried to apply. Five invariants, per segment:

overlap
    No two calls under different tokens work at the same time. Same notion as
    `tests.support.checker.check_history`: a call runs from its start line to
    ``work_end`` for an ``"ok"`` commit (the commit landed before any later owner could
    exist, so a freeze after it is harmless), to its end line otherwise, and to its own
    start when it has no end line (the process died; we cannot know when, only that it
    stopped acting). Calls whose commit was ``"lost"`` are left out: the fence did its
    job, whatever they did was refused.
token_regression
    Ordered by start, a segment's tokens never decrease ("lost" calls left out, as above).
double_apply
    Two ``"ok"`` commits of the same increment (same ``checkpoint_read``).
lost_commit
    An ``"ok"`` commit whose value is above the final checkpoint: an acknowledged
    increment the final state does not reflect (the state went backwards).
phantom_commit
    A final checkpoint that the calls cannot explain.

What a correct history looks like (why there are no false positives)
---------------------------------------------------------------------
1. Ownerships of a segment are totally ordered by token. A commit is a txn guarded by
   ``create_revision(owners/<seg>) == token``, so it can only land while that owner key
   exists, that is before the next owner's acquire; the acquire reads the checkpoint in
   the same txn. So every owner starts from the latest landed value.
2. Within one ownership calls run one at a time. ``ctx.checkpoint`` starts at the
   acquired value and moves only on an acknowledged (``"ok"``) commit. A commit that
   landed without being acknowledged leaves etcd one ahead of ``ctx.checkpoint``, and
   the next call of the same ownership writes that same value again. So etcd always
   holds ``ctx.checkpoint`` or ``ctx.checkpoint + 1``, and every put that lands writes
   the current value or the current value + 1.

Hence the landed values of a segment climb from 0 to the final value one step at a
time (with repeats, never down). From this:

- every "ok" value is <= final (else: ``lost_commit``);
- "ok" values strictly increase in ownership order (a new owner reads at least every
  value acknowledged before it), so no two "ok" commits share a ``checkpoint_read``
  (else: ``double_apply``). Repeats of a value come only from unacknowledged puts;
- every value 1..final was written by a put that landed, and each call makes at most one
  put value (a commit's retries re-put the same bytes). A put may have landed for:
  an ``"ok"`` call (certainly; value known), an ``"error"`` call (maybe: the commit
  raised; value known), a ``"lost"`` call (maybe, see below; value known) and an
  unterminated call (maybe: the process can die after its commit landed and before the
  end line; the value is unknown, since ``checkpoint_read`` is on the end line). So the
  values in 1..final that no ok/error/lost call wrote must number at most the
  unterminated calls (else: ``phantom_commit``). This is stronger than, and implies,
  ``final <= ok + error + lost + unterminated``.

"lost" is ambiguous too: `fleet.work.runner.SegmentRunner._commit` retries an unavailable
etcd (timeouts included) and turns an exhausted retry, or one failed attempt once the
segment is stopping, into ``False``, i.e. ``LostOwnership``, recorded as ``"lost"``. A
timed-out attempt may have been applied; an applied attempt whose reply was lost can
also be followed by a retry that fails its compare. Such a value is legitimate (it landed
while its token was valid), so a "lost" call may explain a value, though it is excluded
from the overlap and token checks.

The count rules of the brief are implied and not reported twice: ``final < number of ok
commits`` happens only when two ok commits share a value (reported as ``double_apply``)
or one is above final (``lost_commit``); "ok values not all distinct" is exactly
``double_apply``. A guard still reports ``lost_commit`` if final is below the number of
distinct ok values with no ok value above it (only possible with non-positive reads).

A worker restarted in-process keeps its pid, so its calls share a ledger file with the
earlier session's; they pair by (pid, segment, token) and the new session's tokens are
new, and its acquire re-reads the checkpoint, so every rule above holds across restarts.

Preconditions: checkpoints are absent when the run starts (a fresh etcd or fleet name);
the final checkpoints are read after every worker has stopped (no commit in flight);
every process's ledger is in ``ledger_dir``; only the recording handler writes
checkpoints. A segment missing from ``final_checkpoints`` counts as absent (0).

Hooks and child processes (see `tests.support.checker`): a hook (``on_acquire`` /
``on_release``) is work under its token from its start line to its end line, and no
fence excuses it; a call that worked in a child process worked until the child's last
write, even if its commit was fenced out (the child's writes are not fenced). Hooks
commit nothing and take no part in the checkpoint rules.

Pauses. A process frozen (SIGSTOP) in the middle of a call or hook for longer than its
lease wakes up after a new owner may have started, and the watchdog only kills it after
half a safety margin of awake time: until then the old work runs on. That is the
documented limit of unfenced work (docs/safety.md), not a bug, and a call's fence
excuses it already (its commit is refused); a hook has no fence. So `check` takes the
pauses the run injected (pid -> [(stopped_at, continued_at)]) and a grace: an overlap
whose older-token side was frozen before the newer one started and ended (its last
write, or its end line) within `grace` of being continued is *excused*, reported apart
from the violations. Anything that ran on longer after the thaw (a hook the watchdog did
not cover, a child) stays a violation.

The same pause can fall between a call's final deadline check and its start line: the
call's first line then comes right after the SIGCONT, under a token a newer owner has
already replaced (found by the 10-minute cluster run: an `on_acquire` 2 ms long, 1.8 s
after the new owner's). It is excused on the same terms: frozen before the newer one
started, started and over within `grace` of the SIGCONT. A call that the thaw let run
on longer stays a violation. (The supervisor never continues a frozen worker itself:
it kills it with SIGKILL, fleet/supervise/murder.py; only the chaos run's own
SIGCONT thaws one.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.checker import Call, load_calls

KINDS = ("overlap", "token_regression", "double_apply", "lost_commit", "phantom_commit")
MAX_LISTED = 5  # calls or values named in one violation's detail
Pauses = Mapping[int, Sequence[tuple[float, float]]]  # pid -> [(stopped_at, continued_at)]


@dataclass(frozen=True)
class Violation:
    """One broken invariant of one segment."""

    kind: str  # one of KINDS
    segment: int
    detail: str  # human-readable, names the calls/values involved

    def __str__(self) -> str:
        return f"segment {self.segment}: {self.kind}: {self.detail}"


def check(
    ledger_dir: Path,
    final_checkpoints: Mapping[int, Any],
    *,
    segments: int,
    pauses: Pauses | None = None,
    grace: float = 0.0,
    excused: list[Violation] | None = None,
) -> list[Violation]:
    """Every violation in the ledgers under `ledger_dir` given the final checkpoints.

    `final_checkpoints` maps segment -> decoded checkpoint value (None or missing for an
    absent one), as `fleet status --json` reports it. Violations come sorted by segment,
    then in the order of KINDS. Raises ValueError for a ledger or checkpoint naming a
    segment outside ``0..segments-1`` (a malformed input, not a history). Overlaps that
    `pauses` and `grace` explain (see the module docstring) go to `excused` instead.
    """
    return check_calls(
        load_calls(Path(ledger_dir)), final_checkpoints, segments=segments,
        pauses=pauses, grace=grace, excused=excused,
    )  # fmt: skip


def check_calls(
    calls: Iterable[Call],
    final_checkpoints: Mapping[int, Any],
    *,
    segments: int,
    pauses: Pauses | None = None,
    grace: float = 0.0,
    excused: list[Violation] | None = None,
) -> list[Violation]:
    """`check` on calls already loaded with `tests.support.checker.load_calls`."""
    if segments < 0:
        raise ValueError(f"segments must be >= 0, got {segments}")
    by_segment: dict[int, list[Call]] = defaultdict(list)
    for call in calls:
        if not 0 <= call.segment < segments:
            raise ValueError(
                f"ledger call on segment {call.segment}, outside 0..{segments - 1}: "
                f"{call.describe()}"
            )
        by_segment[call.segment].append(call)
    for segment, value in final_checkpoints.items():
        if value is not None and not 0 <= segment < segments:
            raise ValueError(
                f"final checkpoint {value!r} for segment {segment}, outside 0..{segments - 1}"
            )

    violations: list[Violation] = []
    for segment in range(segments):
        seg_calls = sorted(by_segment.get(segment, []), key=lambda c: (c.start, c.effective_end))
        found, pardoned = _mutual_exclusion(segment, seg_calls, pauses or {}, grace)
        violations += found
        if excused is not None:
            excused += pardoned
        violations += _values(
            segment, [c for c in seg_calls if not c.is_hook], final_checkpoints.get(segment)
        )
    violations.sort(key=lambda v: (v.segment, KINDS.index(v.kind)))
    return violations


def summarize(calls: list[Call]) -> dict[str, int]:
    """Counts of a history, for reports: calls and how their commits ended (hooks and
    child-process calls, when there are any, apart)."""
    handled = [c for c in calls if not c.is_hook]
    hooks = [c for c in calls if c.is_hook]
    counts = {
        "calls": len(handled),
        "ok_commits": sum(c.commit == "ok" for c in handled),
        "lost_commits": sum(c.commit == "lost" for c in handled),
        "error_commits": sum(c.commit == "error" for c in handled),
        "unterminated": sum(c.commit is None for c in handled),
    }
    if hooks:
        counts["hooks"] = len(hooks)
        counts["hooks_cut_short"] = sum(c.end is None for c in hooks)
        counts["hooks_told_lost"] = sum(c.told_lost for c in hooks)
    children = [c for c in handled if c.call_id is not None]
    if children:
        counts["child_calls"] = len(children)
        counts["child_calls_cut_short"] = sum(c.end is None for c in children)
    return counts


# -- overlap and token order -------------------------------------------------------------


def _mutual_exclusion(
    segment: int, seg_calls: list[Call], pauses: Pauses, grace: float
) -> tuple[list[Violation], list[Violation]]:
    """Overlap and token_regression over the work not fenced out, sorted by start; and
    the overlaps a pause excuses."""
    counted: list[tuple[Call, float]] = []
    for c in seg_calls:
        span = c.counted(allow_fenced=True)
        if span is not None:
            counted.append((c, span[1]))
    counted.sort(key=lambda ce: (ce[0].start, ce[1]))
    # Overlapping pairs, grouped by the older-token side: one incident per stale run.
    pairs: dict[int, tuple[Call, float, list[Call]]] = {}
    active: list[tuple[Call, float]] = []
    for call, end in counted:
        active = [(a, a_end) for a, a_end in active if a_end > call.start]
        for other, other_end in active:
            if other.token != call.token:
                older, older_end, newer = (
                    (other, other_end, call) if other.token < call.token else (call, end, other)
                )
                pairs.setdefault(id(older), (older, older_end, []))[2].append(newer)
        active.append((call, end))
    found: list[Violation] = []
    excused: list[Violation] = []
    for older, older_end, newers in sorted(pairs.values(), key=lambda p: p[0].start):
        newers.sort(key=lambda c: c.start)
        tokens = sorted({c.token for c in newers})
        detail = (
            f"calls under tokens {older.token} and {', '.join(map(str, tokens))} worked at "
            f"the same time: {older.describe()} beside {len(newers)} run(s), first "
            f"{newers[0].describe()}"
        )
        if len(newers) > 1:
            detail += f", last {newers[-1].describe()}"
        pauses_ok = [_pause_explaining(older, older_end, n, pauses, grace) for n in newers]
        pause = pauses_ok[0] if all(p is not None for p in pauses_ok) else None
        if pause is None:
            found.append(Violation("overlap", segment, detail))
        else:
            excused.append(
                Violation(
                    "overlap",
                    segment,
                    f"{detail}; excused: pid {older.pid} was frozen {pause[0]:.6f}.."
                    f"{pause[1]:.6f} and stopped {older_end - pause[1]:.3f} s after SIGCONT",
                )
            )
    highest: Call | None = None
    for call, end in counted:
        if (
            highest is not None
            and call.token < highest.token
            and _pause_explaining(call, end, highest, pauses, grace) is None
        ):
            found.append(
                Violation(
                    "token_regression",
                    segment,
                    f"token went down from {highest.token} to {call.token}: "
                    f"{highest.describe()} then {call.describe()}",
                )
            )
        if highest is None or call.token > highest.token:
            highest = call
    return found, excused


def _pause_explaining(
    older: Call, older_end: float, newer: Call, pauses: Pauses, grace: float
) -> tuple[float, float] | None:
    """The pause of `older`'s process that excuses its overlap with `newer`, if any.

    It must have begun before `newer` started (so `older` did not work beside `newer`
    while awake), and `older` must be over within `grace` of the SIGCONT. It began
    either during `older`, or before it, when `older` started within `grace` after the
    SIGCONT: frozen between its final deadline check and its first line. (Its check
    passed before the freeze: any check after the thaw sees the deadline gone, since
    the lease, which that deadline undercuts, had to end before `newer` could start.)
    A child's writes are never excused: the child was not frozen.
    """
    if older.child_last is not None and older.child_last >= newer.start:
        return None
    for stopped, continued in pauses.get(older.pid, ()):
        if stopped > newer.start or older_end > continued + grace:
            continue
        during = older.start <= stopped
        right_after = stopped < older.start and continued <= older.start <= continued + grace
        if during or right_after:
            return (stopped, continued)
    return None


# -- checkpoint values -------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value(call: Call) -> int | None:
    """The value the call committed or tried to (checkpoint_read + 1); None if unknown."""
    if call.commit is None:
        return None  # no end line: checkpoint_read was never recorded
    read = call.checkpoint_read
    if read is None:
        return 1
    return read + 1 if _is_int(read) else None


def _read(call: Call) -> str:
    return "absent" if call.checkpoint_read is None else repr(call.checkpoint_read)


def _listed(items: list[str]) -> str:
    extra = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + extra


def _values(segment: int, seg_calls: list[Call], final_raw: Any) -> list[Violation]:
    """double_apply, lost_commit and phantom_commit of one segment."""
    found: list[Violation] = []
    ok_by_value: dict[int, list[Call]] = defaultdict(list)
    maybe_values: set[int] = set()  # values of error/lost calls: they may have landed
    unterminated = 0
    for call in seg_calls:
        value = _value(call)
        if call.commit is None:
            unterminated += 1
        elif value is None:
            continue  # an unreadable checkpoint_read: the handler could not commit from it
        elif call.commit == "ok":
            ok_by_value[value].append(call)
        else:
            maybe_values.add(value)

    for value in sorted(ok_by_value):
        same = ok_by_value[value]
        if len(same) > 1:
            found.append(
                Violation(
                    "double_apply",
                    segment,
                    f"increment from {_read(same[0])} to {value} acknowledged {len(same)} "
                    f"times (the final state can reflect it only once): "
                    + _listed([c.describe() for c in same]),
                )
            )

    if final_raw is None:
        final = 0
    elif _is_int(final_raw) and final_raw >= 0:
        final = final_raw
    else:
        found.append(
            Violation(
                "phantom_commit",
                segment,
                f"final checkpoint {final_raw!r} is not a count the handler could have "
                f"committed (it commits checkpoint_read + 1 from 0)",
            )
        )
        return found

    above = [(v, c) for v in sorted(ok_by_value) if v > final for c in ok_by_value[v]]
    if above:
        found.append(
            Violation(
                "lost_commit",
                segment,
                f"{len(above)} acknowledged commit(s) above the final checkpoint "
                f"{final_raw!r}: "
                + _listed([f"{v} (read {_read(c)}) by {c.describe()}" for v, c in above]),
            )
        )
    elif final < len(ok_by_value):
        found.append(
            Violation(
                "lost_commit",
                segment,
                f"final checkpoint {final_raw!r} is below the {len(ok_by_value)} distinct "
                f"acknowledged commits {sorted(ok_by_value)}",
            )
        )

    explained = {v for v in set(ok_by_value) | maybe_values if 1 <= v <= final}
    missing = final - len(explained)
    if missing > unterminated:
        unexplained: list[str] = []
        value = 0
        while len(unexplained) <= MAX_LISTED and value < final:
            value += 1
            if value not in explained:
                unexplained.append(str(value))
        shown = ", ".join(unexplained[:MAX_LISTED]) + (" ..." if missing > MAX_LISTED else "")
        found.append(
            Violation(
                "phantom_commit",
                segment,
                f"final checkpoint {final} needs every value 1..{final} committed, but "
                f"{missing} of them ({shown}) were committed by no call and only "
                f"{unterminated} unterminated call(s) could have committed one each "
                f"({len(ok_by_value)} ok values, {len(maybe_values)} error/lost values)",
            )
        )
    return found
