"""One supervisor slot (worker ``i`` of ``fleet up``) as a pure state machine.

The states follow supervisord (STARTING, BACKOFF, FATAL, ...) because operators already
know them, and because a crash-looping worker must neither spin the CPU nor give up
forever: fast crashes back off exponentially, repeated ones park the slot in FATAL,
and FATAL is retried after a cool-down since the cause (etcd down, disk full) is often
transient. A configuration error (exit 2) will not fix itself, so it goes to FATAL at
once instead of burning the crash budget.

Everything here is pure so the supervisor loop stays thin and every policy decision is
testable without processes or clocks: callers pass ``now`` (monotonic seconds) and a
``random.Random`` for the jitter, which spreads respawns of slots that died together
(e.g. after an etcd outage) so they do not stampede the cluster in lockstep.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "RespawnPolicy",
    "all_refused_config",
    "Slot",
    "State",
    "as_row",
    "describe_exit",
    "due",
    "exited",
    "heartbeat",
    "heartbeat_overdue",
    "next_step",
    "ready",
    "spawn_failed",
    "spawned",
    "stopping",
]


class State(StrEnum):
    """A ``str`` subclass, so rows serialise as-is and compare equal to their names."""

    STARTING = "STARTING"
    READY = "READY"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"


RUNNING = frozenset({State.STARTING, State.READY, State.STOPPING})
WAITING = frozenset({State.BACKOFF, State.FATAL})


@dataclass(frozen=True)
class RespawnPolicy:
    base: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.2
    stable_after: float = 60.0
    crash_window: float = 60.0
    crash_limit: int = 5
    cooldown: float = 300.0
    config_error_code: int = 2
    etcd_unreachable_code: int = 3
    lease_lost_code: int = 4


@dataclass
class Slot:
    index: int
    state: State = State.STOPPED
    pid: int | None = None
    spawned_at: float | None = None
    ready_at: float | None = None
    last_heartbeat: float | None = None
    lease: int | None = None
    restarts: int = 0
    failures: int = 0
    recent_exits: list[float] = field(default_factory=list)
    last_exit: str | None = None
    next_start: float | None = None
    fatal_reason: str | None = None
    owned: int = 0
    assigned: int = 0
    stop_requested: bool = False
    # Why a deliberate stop was asked for when it is a recycle (RSS limit): such a stop
    # of a young child counts as a failure, or a limit below a fresh worker's size would
    # recycle it every few seconds forever.
    recycle_reason: str | None = None

    @property
    def running(self) -> bool:
        """A child process exists (it may be on its way out) and needs reaping."""
        return self.pid is not None and self.state in RUNNING


def spawned(slot: Slot, pid: int, now: float) -> None:
    """Forget everything the previous child reported: it belonged to a dead process.

    ``spawned_at`` surviving the previous exit is what tells a respawn from a first
    start, so ``restarts`` counts only the former.
    """
    if slot.spawned_at is not None:
        slot.restarts += 1
    slot.state, slot.pid, slot.spawned_at = State.STARTING, pid, now
    slot.ready_at = slot.last_heartbeat = slot.lease = None
    slot.owned = slot.assigned = 0
    slot.next_start = slot.fatal_reason = None
    slot.stop_requested = False
    slot.recycle_reason = None


def ready(slot: Slot, lease: int, now: float) -> None:
    """Record the lease even when stopping: the supervisor must revoke it on exit."""
    if slot.state is State.STARTING:
        slot.state = State.READY
    if slot.ready_at is None:
        slot.ready_at = now
    slot.lease, slot.last_heartbeat = lease, now


def heartbeat(
    slot: Slot, now: float, owned: int | None = None, assigned: int | None = None
) -> None:
    """Counts are kept so a rolling restart can wait until the new child owns its share."""
    slot.last_heartbeat = now
    if owned is not None:
        slot.owned = owned
    if assigned is not None:
        slot.assigned = assigned


def stopping(slot: Slot, recycle: str | None = None) -> State:
    """Mark a deliberate stop so the coming exit is not mistaken for a crash.

    A slot with no child (BACKOFF, FATAL) has nothing to signal and stops at once.
    `recycle` names why a running child is replaced (e.g. its RSS), see `exited`.
    """
    if recycle is not None and slot.pid is not None:
        slot.recycle_reason = recycle
    if slot.pid is None:
        slot.state, slot.next_start, slot.stop_requested = State.STOPPED, None, False
        slot.fatal_reason = None
    else:
        slot.state, slot.stop_requested = State.STOPPING, True
    return slot.state


def describe_exit(
    returncode: int, policy: RespawnPolicy, *, stop_requested: bool = False, oom: bool = False
) -> str:
    """What `ps` and the log say of an exit. A SIGKILL is called an OOM kill only when
    the kernel says so (`oom`, from the cgroup's oom_kill counter): a user's `kill -9`
    is not one."""
    if returncode >= 0:
        note = {
            policy.config_error_code: " (configuration error)",
            policy.etcd_unreachable_code: " (etcd unreachable)",
            policy.lease_lost_code: " (lease lost with a call running)",
        }.get(returncode, "")
        return f"exit {returncode}{note}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"
    if name == "SIGKILL" and not stop_requested:
        return "killed by SIGKILL" + (" (the kernel's OOM killer)" if oom else "")
    return f"signal {name}"


def _fatal(slot: Slot, reason: str, now: float, policy: RespawnPolicy) -> State:
    """Clearing the exit history gives the post-cool-down retry a fresh crash budget."""
    slot.state, slot.fatal_reason = State.FATAL, reason
    slot.next_start = now + policy.cooldown
    slot.recent_exits.clear()
    return slot.state


def exited(
    slot: Slot,
    returncode: int,
    now: float,
    policy: RespawnPolicy,
    rng: random.Random,
    *,
    oom: bool = False,
) -> State:
    """Decide what the death of the slot's child means, and when to try again."""
    slot.last_exit = describe_exit(
        returncode, policy, stop_requested=slot.stop_requested, oom=oom
    )
    slot.pid = None
    lived = now - slot.spawned_at if slot.spawned_at is not None else 0.0
    recycle, slot.recycle_reason = slot.recycle_reason, None
    if recycle is not None:
        slot.last_exit += f" (recycled: {recycle})"
    if slot.stop_requested and (recycle is None or lived >= policy.stable_after):
        slot.state, slot.next_start, slot.stop_requested = State.STOPPED, None, False
        return slot.state
    slot.stop_requested = False
    if returncode == policy.config_error_code:
        return _fatal(slot, f"configuration error (exit {policy.config_error_code})", now, policy)
    if returncode in (policy.etcd_unreachable_code, policy.lease_lost_code):
        return _waiting_for_etcd(slot, now, policy, rng)
    return _failure(slot, now, lived, policy, rng)


def _waiting_for_etcd(
    slot: Slot, now: float, policy: RespawnPolicy, rng: random.Random
) -> State:
    """etcd unreachable (exit 3) says nothing about the worker: it is not a crash, and
    counting it would turn a one-minute etcd outage into FATAL slots for the whole
    cool-down. Back off (capped) and try again, never FATAL. A lease lost with a call
    still running (exit 4: etcd too slow to keep the lease, issue 11) is the same: a slow
    etcd must not become a fleet of FATAL slots."""
    return _backoff(slot, now, policy, rng)


def spawn_failed(
    slot: Slot, error: str, now: float, policy: RespawnPolicy, rng: random.Random
) -> State:
    """A child that could not even be started (EAGAIN, ENOMEM from fork) is a failure
    like a crash at once: back off, and FATAL if it keeps happening."""
    slot.last_exit = f"spawn failed: {error}"
    slot.pid = None
    return _failure(slot, now, 0.0, policy, rng)


def _failure(
    slot: Slot, now: float, lived: float, policy: RespawnPolicy, rng: random.Random
) -> State:
    slot.recent_exits = [t for t in slot.recent_exits if now - t <= policy.crash_window]
    slot.recent_exits.append(now)
    if len(slot.recent_exits) >= policy.crash_limit:
        count = len(slot.recent_exits)
        return _fatal(slot, f"{count} exits within {policy.crash_window:g}s", now, policy)
    if lived >= policy.stable_after:
        slot.failures = 0
    return _backoff(slot, now, policy, rng)


def _backoff(slot: Slot, now: float, policy: RespawnPolicy, rng: random.Random) -> State:
    delay = min(policy.cap, policy.base * policy.factor ** min(slot.failures, 64))
    delay *= 1.0 + rng.uniform(-policy.jitter, policy.jitter)
    slot.failures += 1
    slot.state, slot.next_start = State.BACKOFF, now + delay
    return slot.state


def due(slot: Slot, now: float) -> bool:
    return slot.state in WAITING and slot.next_start is not None and now >= slot.next_start


def heartbeat_overdue(
    slot: Slot, now: float, heartbeat_timeout: float, startup_timeout: float
) -> str | None:
    """A hung child keeps its lease and segments; a reason here means kill it."""
    if slot.state is State.READY:
        last = slot.last_heartbeat if slot.last_heartbeat is not None else slot.ready_at
        if last is not None and now - last > heartbeat_timeout:
            return f"no heartbeat for {now - last:.1f}s"
    elif slot.state is State.STARTING and slot.spawned_at is not None:
        started = now - slot.spawned_at
        return f"not ready after {started:.1f}s" if started > startup_timeout else None
    return None


def _age(since: float | None, now: float) -> float | None:
    return None if since is None else round(max(0.0, now - since), 1)


def as_row(slot: Slot, now: float) -> dict[str, Any]:
    """One ``fleet ps --json`` row; live-child fields are None when there is no child."""
    live = slot.running
    wait = slot.next_start if slot.state in WAITING else None
    return {
        "slot": slot.index,
        "state": slot.state.value,
        "pid": slot.pid,
        "uptime": _age(slot.spawned_at, now) if live else None,
        "restarts": slot.restarts,
        "last_exit": slot.last_exit,
        "heartbeat_age": _age(slot.last_heartbeat, now) if live else None,
        "lease": slot.lease if live else None,
        "fatal_reason": slot.fatal_reason if slot.state is State.FATAL else None,
        "next_start_in": None if wait is None else round(max(0.0, wait - now), 1),
    }


def next_step(slot: Slot, state: State, now: float) -> str:
    """What happens next to a slot whose child just died, for its log line."""
    if state is State.FATAL:
        return f"FATAL: {slot.fatal_reason}"
    return f"respawn in {max(0.0, (slot.next_start or 0) - now):.1f}s"


def all_refused_config(live: list[Slot], policy: RespawnPolicy) -> bool:
    """Every slot is FATAL on a configuration error: a respawn will not fix that."""
    code = policy.config_error_code
    return bool(live) and all(
        s.state is State.FATAL and bool(s.last_exit) and str(s.last_exit).startswith(f"exit {code}")
        for s in live
    )
