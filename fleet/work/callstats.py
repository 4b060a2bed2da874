"""One worker's handler calls, counted for its periodic summary line.

Why not one line per call: at 1,024 segments and a 1 s interval that is a thousand
lines a second through the supervisor's pipe. Runners `record` every `handle` call
(thread-safe, O(1)); the worker's main loop `take`s the totals once per summary period
and prints one line: calls, errors, p99 call time.

The p99 comes from a bounded reservoir (`SAMPLES` durations per period, uniformly
sampled), so the memory of a period does not grow with its calls.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

SAMPLES = 2048


@dataclass(frozen=True)
class Period:
    """What `take` returns: the calls since the previous `take`."""

    calls: int
    errors: int
    p99: float | None  # seconds; None without calls


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile `q` (0..1) of a non-empty sorted list."""
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


class CallStats:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._lock = threading.Lock()
        self._rng = rng or random.Random()
        self._calls = 0
        self._errors = 0
        self._samples: list[float] = []

    def record(self, seconds: float, ok: bool) -> None:
        """One finished `handle` call (reservoir sampling keeps SAMPLES of them)."""
        with self._lock:
            self._calls += 1
            if not ok:
                self._errors += 1
            if len(self._samples) < SAMPLES:
                self._samples.append(seconds)
            else:
                slot = self._rng.randrange(self._calls)
                if slot < SAMPLES:
                    self._samples[slot] = seconds

    def take(self) -> Period:
        """The period since the last `take`, and start a new one."""
        with self._lock:
            calls, errors, samples = self._calls, self._errors, self._samples
            self._calls, self._errors, self._samples = 0, 0, []
        p99 = percentile(sorted(samples), 0.99) if samples else None
        return Period(calls, errors, p99)
