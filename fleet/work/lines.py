"""The worker's lifecycle lines, pure: compact segment ranges, decisions, the summary.

Why: one line per segment acquired or released, and one per call, made `fleet up
--workers 8` print 1,669 lines in its first 25 s (issue 9). A decision is one line
(`acquired 8 segments: 0-7 (token 13)`), the calls one summary line per period. The
range text parses back (`parse_ranges`), so a test or a script can still tell which
segments a line names.
"""

from __future__ import annotations

from collections.abc import Iterable

from fleet.logs import plural
from fleet.work.callstats import Period

# Ranges shown in one decision line; the rest is counted (`… (+N more)`), so a line
# stays short even when a thousand scattered segments move at once.
RANGES_SHOWN = 32


def _runs(values: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, distinct values as maximal runs of consecutive integers (first, last)."""
    runs: list[tuple[int, int]] = []
    for v in sorted(set(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def format_ranges(values: Iterable[int], limit: int | None = None) -> str:
    """`0-7, 9, 12-14`: the fewest ranges, ascending; with `limit`, at most that many
    ranges, then ` … (+N more)` counting the values left out."""
    runs = _runs(values)
    shown = runs if limit is None else runs[:limit]
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in shown)
    left = sum(b - a + 1 for a, b in runs[len(shown) :])
    return f"{text} … (+{left} more)" if left else text


def parse_ranges(text: str) -> set[int]:
    """The values of a `format_ranges` text (without a `… (+N more)` tail); ValueError
    for anything else."""
    if not text:
        return set()
    values: set[int] = set()
    for item in text.split(", "):
        first, sep, last = item.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"not a segment range: {item!r}")
        lo, hi = int(first), int(last) if sep else int(first)
        if lo >= hi and sep:
            raise ValueError(f"not a segment range: {item!r}")
        values.update(range(lo, hi + 1))
    return values


_plural = plural


def decision_line(verb: str, held: Iterable[tuple[int, int]], note: str = "") -> str:
    """`acquired 8 segments: 0-7 (tokens 13-20)` for (segment, token) pairs: one line
    per decision step or burst of runner exits, whatever the number of segments."""
    pairs = list(held)
    segments = {s for s, _ in pairs}
    tokens = sorted({t for _, t in pairs})
    if len(tokens) == 1:
        token = f"token {tokens[0]}"
    else:
        token = f"tokens {tokens[0]}-{tokens[-1]}" if tokens else "no token"
    extra = f", {note}" if note else ""
    ranges = format_ranges(segments, RANGES_SHOWN)
    return f"{verb} {_plural(len(segments), 'segment')}: {ranges} ({token}{extra})"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000.0
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 10:
        return f"{ms:.1f} ms"
    return f"{ms:,.0f} ms"


def summary_line(period: Period, seconds: float, owned: int) -> str:
    """`last 60s: 3,840 calls, 2 errors, p99 12 ms, 8 segments owned`."""
    return (
        f"last {seconds:.0f}s: {_plural(period.calls, 'call')}, "
        f"{_plural(period.errors, 'error')}, p99 {_ms(period.p99)}, "
        f"{_plural(owned, 'segment')} owned"
    )


def shedding_note(stretch: float) -> str:
    """Appended to the summary line while etcd is slow (backpressure.py)."""
    return f", shedding load: calls spaced {stretch:.1f}x the interval (etcd slow)"


class Exits:
    """Runner exits not logged yet. A handoff stops many runners at once and each posts
    its own exit, a few milliseconds apart: they are held until no stopped runner is
    still to report (`waiting` False) or the oldest has waited `patience` seconds, then
    logged as one line per kind (released, dropped)."""

    def __init__(self, patience: float = 1.0) -> None:
        self.patience = patience
        self._held: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        self._since: float | None = None

    def add(self, segment: int, token: int, *, released: bool, now: float) -> None:
        self._held[released].append((segment, token))
        if self._since is None:
            self._since = now

    @property
    def pending(self) -> bool:
        return self._since is not None

    def take(self, now: float, waiting: bool) -> list[str]:
        """The lines that are due now (and forget them)."""
        if self._since is None or (waiting and now < self._since + self.patience):
            return []
        out = [
            decision_line(verb, self._held[kind])
            for kind, verb in ((True, "released"), (False, "dropped"))
            if self._held[kind]
        ]
        self._held = {True: [], False: []}
        self._since = None
        return out
