"""The steps of a handover, read from the stamped events of an `observe.Observer`.

A member's segments change hands in the same order whatever made it go (kill -9 under
`fleet up`, kill -9 against the TTL, SIGTERM, `fleet scale` down): its member key is
deleted (lease revoked or expired, or the graceful leave), the leader writes a new
assignment, the old owner keys are deleted (released, or with the lease), the new
owners acquire, and each new owner's first call runs (seen as its first checkpoint
commit: the demo handler commits at the end of every call, one etcd round trip after it
starts). `handover` returns when each of those arrived, `STEPS` names them for tables.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from observe import Observer
from stats import ms_between

FIRST_CALL_TIMEOUT = 15.0

# (stamp, label, what the time since the trigger ends at)
STEPS: list[tuple[str, str, str]] = [
    ("gone", "member key deleted", "its member key deleted (revoke, expiry or leave)"),
    ("assignment", "assignment written", "the leader's next assignment arrives"),
    ("released", "released", "the last of its owner keys deleted"),
    ("first_acquired", "first acquired", "the first of its segments acquired by another"),
    ("acquired", "all acquired", "every one of its segments owned by another member"),
    ("first_call", "first calls", "every one of them had its first call (commit seen)"),
]


def handover(
    obs: Observer,
    t0: float,
    victim: str,
    owned: Sequence[int],
    acquired_at: float,
    *,
    first_call_timeout: float = FIRST_CALL_TIMEOUT,
) -> dict[str, float | None]:
    """time.time() of each step of `victim` handing `owned` over after `t0` (None: not seen).

    Waits up to `first_call_timeout` for the first commit of every new ownership."""
    keys = obs.keys
    events = obs.events_since(t0)
    owner_keys = {keys.owner(s) for s in owned}
    gone = next((e.at for e in events if e.kind == "delete" and e.key == keys.member(victim)), None)
    assignment = next(
        (
            e.at
            for e in events
            if e.key == keys.assignment and e.kind == "put" and (gone is None or e.at >= gone)
        ),
        None,
    )
    releases = [
        e.at for e in events if e.kind == "delete" and e.key in owner_keys and e.at <= acquired_at
    ]
    acquires = [
        e.at
        for e in events
        if e.kind == "put" and e.key in owner_keys and e.create_revision == e.revision
    ]
    with obs.lock:
        tokens = {s: obs.owner_token[s] for s in owned if s in obs.owner_token}
    deadline = time.monotonic() + first_call_timeout
    calls = obs.first_commits(tokens)
    while len(calls) < len(tokens) and time.monotonic() < deadline:
        time.sleep(0.01)
        calls = obs.first_commits(tokens)
    return {
        "gone": gone,
        "assignment": assignment,
        "released": max(releases, default=None),
        "first_acquired": min(acquires, default=None),
        "acquired": acquired_at,
        "first_call": max(calls.values()) if len(calls) == len(tokens) and calls else None,
    }


def since(t0: float, stamps: dict[str, float | None], prefix: str = "") -> dict[str, Any]:
    """Each stamp as `<prefix><name>_ms` after `t0`."""
    return {f"{prefix}{name}_ms": ms_between(t0, at) for name, at in stamps.items()}


def step_deltas(row: dict[str, Any], order: Sequence[str]) -> dict[str, float | None]:
    """The time of each step after the previous one, from a row of `<name>_ms` values:
    `<a>-><b>` for consecutive names of `order` (None when either was not seen)."""
    out: dict[str, float | None] = {}
    for a, b in zip(order, order[1:], strict=False):
        va, vb = row.get(f"{a}_ms"), row.get(f"{b}_ms")
        out[f"{a}->{b}"] = None if va is None or vb is None else round(vb - va, 1)
    return out


def owned_by_others(victim: str, owned: Sequence[int]) -> Any:
    """A `wait` condition: every segment in `owned` has an owner other than `victim`."""

    def done(o: Observer) -> bool:
        return all(o.owner.get(s) not in (None, victim) for s in owned)

    return done
