"""Failing segments in etcd: the record, its JSON, the guarded write, the human line.

A handler that fails on every call must be visible from etcd alone (`fleet status` runs
against a multi-host fleet with no supervisor), so each worker publishes the segments
whose last call failed to one key bound to its lease, `health/<member-id>`:

    {"failing": {"12": {"errors": 57, "total_errors": 60, "last_error": "ValueError: boom",
                        "last_success": 1767225600.5, "since": 1767225542.0}},
     "count": 1, "updated": 1767225603.1}

`errors` counts the calls that failed in a row (a success resets it), `total_errors`
every failed call of this ownership, `last_success` and `since` (the first failure of the
current run of errors) are epoch seconds, `last_success` null when no call of this
ownership ever succeeded. `count` is the number of failing segments, which may exceed
the ones listed (at most `MAX_LISTED`). When nothing fails any more the worker writes
`{"failing": {}, "count": 0, ...}`: it does not delete the key, because a key of its
lease deleted is what tells a worker its lease is gone (DESIGN.md, protocol step 7).

How often a worker writes is decided in fleet/work/health.py. Nothing here imports the
etcd client at module level, so `fleet ps` can render the lines without loading gRPC.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleet.coord.keys import Keys

if TYPE_CHECKING:
    from fleet.coord.etcd import Etcd

# Failing segments listed in one member's key (`count` has them all): every member's watch
# receives every write, so the value stays small (21 KB at most, with 200-character errors).
MAX_LISTED = 64
ERROR_TEXT_MAX = 200
WRITE_TIMEOUT = 1.0  # the write is made from the worker's main loop: never hold it long


@dataclass(frozen=True)
class Failing:
    """One segment whose last call failed, as the runner saw it."""

    segment: int
    errors: int  # failed calls in a row
    total_errors: int  # failed calls of this ownership
    last_error: str  # "ValueError: boom" (one line, at most ERROR_TEXT_MAX characters)
    last_success: float | None  # epoch seconds; None: never, in this ownership
    since: float | None  # epoch seconds of the first failure of this run of errors

    def to_json(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "errors": self.errors,
            "total_errors": self.total_errors,
            "last_error": self.last_error,
            "last_success": self.last_success,
            "since": self.since,
        }

    @classmethod
    def from_json(cls, data: object, segment: int | None = None) -> Failing | None:
        """The record in `data`, or None when it does not have the expected shape (it
        comes from another process, maybe another version of fleet: never trusted)."""
        if not isinstance(data, dict):
            return None
        seg = data.get("segment") if segment is None else segment
        errors, total = data.get("errors"), data.get("total_errors", data.get("errors"))
        text = data.get("last_error")
        if not (_count(seg) is not None and _count(errors) and _count(total) is not None):
            return None
        if not isinstance(text, str):
            return None
        last_success, since = _epoch(data.get("last_success")), _epoch(data.get("since"))
        if last_success is False or since is False:
            return None
        assert isinstance(seg, int) and isinstance(errors, int) and isinstance(total, int)
        return cls(
            segment=seg,
            errors=errors,
            total_errors=max(total, errors),
            last_error=one_line(text),
            last_success=last_success,
            since=since,
        )


def _count(value: object) -> int | None:
    """A non-negative int (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _epoch(value: object) -> float | None | bool:
    """An epoch time or None; False for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return float(value)


def one_line(text: str, limit: int = ERROR_TEXT_MAX) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def error_text(exc: BaseException, hook: str = "handle") -> str:
    """`ValueError: boom` for a failed `handle`, `on_acquire: ValueError: boom` for a hook."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - user code: a __str__ that raises
        message = "<unprintable>"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return one_line(text if hook == "handle" else f"{hook}: {text}")


# -- the key's value ---------------------------------------------------------------------


def encode(
    failing: list[Failing], updated: float, shedding: dict[str, float] | None = None
) -> bytes:
    """The value of `health/<member-id>`: at most MAX_LISTED segments, the full count;
    `shedding` ({"stretch", "p99_ms", "since"}) while the worker sheds load because etcd
    is slow (fleet/work/backpressure.py)."""
    listed = sorted(failing, key=lambda f: f.segment)[:MAX_LISTED]
    body: dict[str, Any] = {
        "failing": {
            str(f.segment): {k: v for k, v in f.to_json().items() if k != "segment"}
            for f in listed
        },
        "count": len(failing),
        "updated": updated,
    }
    if shedding:
        body["shedding"] = shedding
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Health:
    """One member's published failing segments (what `fleet status` reads)."""

    failing: list[Failing]
    count: int  # failing segments, including any not listed
    updated: float | None
    shedding: dict[str, float] | None = None  # see `encode`


SHEDDING_FIELDS = ("stretch", "p99_ms", "since")


def _shedding(data: object) -> dict[str, float] | None:
    """The shedding record if it has the expected shape, else None (never trusted)."""
    if not isinstance(data, dict):
        return None
    record: dict[str, float] = {}
    for key in SHEDDING_FIELDS:
        value = _epoch(data.get(key))
        if not isinstance(value, float):
            return None
        record[key] = value
    return record


def decode(raw: bytes) -> Health:
    """The value of a health key; anything malformed reads as nothing failing."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return Health([], 0, None)
    if not isinstance(data, dict) or not isinstance(data.get("failing"), dict):
        return Health([], 0, None)
    failing = []
    for seg, entry in data["failing"].items():
        if isinstance(seg, str) and seg.isdigit():
            record = Failing.from_json(entry, segment=int(seg))
            if record is not None:
                failing.append(record)
    failing.sort(key=lambda f: f.segment)
    count = _count(data.get("count"))
    updated = _epoch(data.get("updated"))
    return Health(
        failing,
        max(count or 0, len(failing)),
        updated if isinstance(updated, float) else None,
        _shedding(data.get("shedding")),
    )


# -- etcd --------------------------------------------------------------------------------


def publish(etcd: Etcd, keys: Keys, member_id: str, lease: int, value: bytes) -> bool:
    """Write our health key, bound to our lease, only while our member record is ours
    (the guard of every member write: a worker that lost its record writes nothing).
    False when the guard failed; raises the etcd errors (the caller logs and retries)."""
    from fleet.coord.etcd import Compare, Put

    res = etcd.txn(
        [Compare(keys.member(member_id), "lease", lease)],
        [Put(keys.health_of(member_id), value, lease)],
        timeout=WRITE_TIMEOUT,
    )
    return res.succeeded


# -- the human line ----------------------------------------------------------------------


def ago(seconds: float) -> str:
    """`5s`, `2m`, `3h`, `4d`."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def when(epoch: float | None, now: float | None = None) -> str:
    """`never`, or `12:03:04 (2m ago)` (local time)."""
    if epoch is None:
        return "never"
    now = time.time() if now is None else now
    return f"{time.strftime('%H:%M:%S', time.localtime(epoch))} ({ago(now - epoch)} ago)"


def describe(failing: Failing, now: float | None = None) -> str:
    """`57 errors, last ValueError: boom, last success never`."""
    errors = "1 error" if failing.errors == 1 else f"{failing.errors} errors"
    return f"{errors}, last {failing.last_error}, last success {when(failing.last_success, now)}"


def failing_lines(
    who: str, listed: list[Failing], count: int, now: float | None = None
) -> list[str]:
    """`  w3 segment 12: 57 errors, ...` per listed segment, and a line for the rest."""
    lines = [f"  {who} segment {f.segment}: {describe(f, now)}" for f in listed]
    if count > len(listed):
        lines.append(f"  {who}: {count - len(listed)} more failing segments")
    return lines
