"""The fleet spec (`<root>/spec`): its segment count and resize history, pure (no I/O).

`{"segments": S}` is all an older reader looks at, so it stays where it is; a resize
(`fleet resize`, fleet/coord/resize.py) adds `previous` (the counts the fleet ran with
before, most recent last) and `resized_at` (wall-clock seconds). The history is what lets
a worker still configured with an old count, e.g. one `fleet up --segments 64` respawns
after a resize to 32, join with the current count and a warning instead of refusing to
start. Fields this version does not know are kept through a resize.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The bound of the `segments` setting (fleet/config.py validates the same range; a test
# keeps the two in step): owner and checkpoint keys carry the segment in 5 digits.
MAX_SEGMENTS = 100000
# How many earlier counts a spec remembers: enough for any config still in use.
HISTORY = 16


class BadSpec(ValueError):
    """The spec key holds something that is not a fleet spec."""


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEGMENTS


@dataclass(frozen=True)
class Spec:
    segments: int
    previous: tuple[int, ...] = ()
    resized_at: float | None = None
    # Fields of a later version, carried through a resize unchanged.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)


def parse(raw: bytes) -> Spec:
    """The spec in `raw`; `BadSpec` if it has no valid `segments`. A malformed history
    entry is skipped (the count is what matters; the history only helps)."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadSpec(f"not JSON: {raw[:80]!r}") from None
    if not isinstance(data, dict) or not _count(data.get("segments")):
        raise BadSpec(f"no segment count from 1 to {MAX_SEGMENTS}: {raw[:80]!r}")
    previous = data.get("previous")
    history = tuple(c for c in previous if _count(c)) if isinstance(previous, list) else ()
    when = data.get("resized_at")
    if isinstance(when, bool) or not isinstance(when, int | float):
        when = None
    known = {"segments", "previous", "resized_at"}
    return Spec(
        segments=data["segments"],
        previous=history,
        resized_at=None if when is None else float(when),
        extra={k: v for k, v in data.items() if k not in known},
    )


def encode(spec: Spec) -> bytes:
    """The JSON of `spec`, `segments` first; a spec never resized is exactly
    `{"segments": S}`, as the first member writes it."""
    data: dict[str, Any] = {"segments": spec.segments}
    if spec.previous:
        data["previous"] = list(spec.previous)
    if spec.resized_at is not None:
        data["resized_at"] = spec.resized_at
    for key, value in spec.extra.items():
        data.setdefault(key, value)
    return json.dumps(data).encode()


def resized(spec: Spec, segments: int, now: float) -> Spec:
    """`spec` changed to `segments`: the old count joins the history (once, as its most
    recent entry; the history keeps the last HISTORY distinct counts)."""
    if not _count(segments):
        raise ValueError(f"segments must be an integer from 1 to {MAX_SEGMENTS}, got {segments!r}")
    history = [c for c in spec.previous if c != spec.segments] + [spec.segments]
    return Spec(segments, tuple(history[-HISTORY:]), round(now, 3), spec.extra)


@dataclass(frozen=True)
class Adopted:
    """What a starting worker runs with: the fleet's count, and a warning when its own
    configuration names a count the fleet was resized from."""

    segments: int
    warning: str | None = None


def adopt(spec: Spec, configured: int, explicit: bool, fleet: str) -> Adopted | None:
    """The count a worker configured with `configured` (`explicit`: set on purpose, not
    the default) starts with; None when it must refuse (a count this fleet never ran with:
    probably another fleet's configuration)."""
    if not explicit or configured == spec.segments:
        return Adopted(spec.segments)
    if configured in spec.previous:
        return Adopted(
            spec.segments,
            f"fleet {fleet!r} was resized from {configured} to {spec.segments} "
            "(fleet resize); update segments in your config",
        )
    return None
