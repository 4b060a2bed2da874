"""Percentiles, summaries and markdown tables shared by the benchmarks. Pure: no I/O.

Two ranks: `nearest_rank` (a sample that was actually measured: the smallest with at
least a share q of all samples at or below it; with 20 samples p99 is the maximum) for
everything timed in a fleet, and `interpolated` (numpy's default) kept for the
reference runs of handoff.py that were published with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Rank = Callable[[Sequence[float], float], float]  # (values, q) -> the q-quantile
Quantiles = Sequence[tuple[str, float]]  # (name, q): ("median", 0.5) -> "median_ms"
QUANTILES: Quantiles = (("median", 0.5), ("p90", 0.9), ("p99", 0.99))


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The smallest value with at least q of all values at or below it (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def interpolated(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def ms_between(start: float | None, end: float | None) -> float | None:
    """`end - start` in ms, or None when either end was not observed."""
    return None if start is None or end is None else ms(end - start)


def summarize(
    values: Iterable[float | None], rank: Rank = nearest_rank, quantiles: Quantiles = QUANTILES
) -> dict[str, Any]:
    """n, the `quantiles` (as `<name>_ms`) and max of the values present, to 0.1 ms."""
    present = [v for v in values if v is not None]
    if not present:
        return {"n": 0, **{f"{name}_ms": None for name, _ in quantiles}, "max_ms": None}
    return {
        "n": len(present),
        **{f"{name}_ms": round(rank(present, q), 1) for name, q in quantiles},
        "max_ms": round(max(present), 1),
    }


def summarize_all(
    columns: dict[str, list[float | None]],
    rank: Rank = nearest_rank,
    quantiles: Quantiles = QUANTILES,
) -> dict[str, dict[str, Any]]:
    return {key: summarize(values, rank, quantiles) for key, values in columns.items()}


def period_summary(seconds: Sequence[float], rank: Rank) -> dict[str, float | None]:
    """Median and p90 in ms, to 0.01 ms, of read periods given in seconds (None if none)."""
    values = [s * 1000.0 for s in seconds]
    if not values:
        return {"median": None, "p90": None}
    return {"median": round(rank(values, 0.5), 2), "p90": round(rank(values, 0.9), 2)}


def cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def summary_table(
    metrics: Sequence[tuple[str, str, str]],
    summary: dict[str, Any],
    quantiles: Quantiles = QUANTILES,
) -> list[str]:
    """The markdown table of `summarize` results, one row per (key, label, what is timed)."""
    names = [name for name, _ in quantiles] + ["max"]
    lines = [
        "| metric | n | " + "".join(f"{name} ms | " for name in names) + "timed |",
        "| --- | ---: | " + "---: | " * len(names) + "--- |",
    ]
    for key, label, timed in metrics:
        s = summary.get(key)
        if s is None:
            continue
        cells = "".join(f"{cell(s[f'{name}_ms'])} | " for name in names)
        lines.append(f"| {label} | {s['n']} | {cells}{timed} |")
    return lines


def rank_note(n: int) -> str:
    """What p90 and p99 mean for n nearest-rank samples, for the text under a table."""
    if n <= 0:
        return "no samples"
    return (
        f"nearest-rank percentiles: with {n} samples p90 is the sample of rank "
        f"{max(1, math.ceil(0.9 * n))} and p99 the one of rank {max(1, math.ceil(0.99 * n))}"
    )
