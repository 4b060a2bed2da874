"""Polling with a deadline: the one way tests wait for something to become true.

Distributed behaviour (elections, handoffs, lease expiry) converges at a time no
test can predict, so tests poll a condition instead of sleeping a guessed amount.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy.

    Returns that truthy value (so a predicate can return what it found). An
    exception from the predicate counts as "not yet" (the cluster may simply not be
    there yet) and is retried; if the last attempt before the timeout raised, that
    exception is re-raised with `message` attached as a note, so the real cause is
    not hidden behind a generic timeout.

    Raises:
        AssertionError: timed out; names `message`, the timeout and the last value seen.
    """
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        last_exc: BaseException | None = None
        value: T | None = None
        try:
            value = predicate()
        except Exception as exc:  # retried on purpose; re-raised at the end
            last_exc = exc
        else:
            if value:
                return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or getattr(predicate, "__name__", repr(predicate))
            if last_exc is not None:
                last_exc.add_note(
                    f"wait_until: {what}: still raising after {timeout:.1f}s ({attempts} attempts)"
                )
                raise last_exc
            raise AssertionError(
                f"wait_until timed out after {timeout:.1f}s ({attempts} attempts): {what}; "
                f"last value: {value!r}"
            )
        time.sleep(min(interval, remaining))
