"""The chaos faults aimed at user code other than a plain call: hooks and child processes.

`slow_hook`
    The target member's `on_acquire`/`on_release` hooks become slow for a while
    (`FLEET_TEST_SLOW_HOOK_DIR`), and the fault provokes hooks: a SIGTERM of the target
    (its drain runs slow `on_release`s, its successor slow `on_acquire`s), or a kill -9 of
    another worker (the target acquires, slowly) followed by a kill -9 of the target in
    the middle of such a hook, or nothing (the other faults' handoffs). Kills, SIGTERMs,
    etcd restarts and partitions then land mid-hook.
`sigstop_in_hook`
    Makes the target's hooks very slow, waits for (or provokes, by SIGTERM) a hook, and
    SIGSTOPs the process while the hook's start line is open in the ledger, for longer
    than the lease TTL, then SIGCONTs it: the hook wakes up after a new owner may have
    started, and must not run on (the watchdog covers hooks).
`child_work`
    The target's calls do their work in a child process (`FLEET_TEST_CHILD_DIR`); once
    one is running the target is killed with SIGKILL. Its children must die with it
    (`fleet up` kills the process group before it revokes the lease): a child still
    writing when the new owner starts is an overlap in the history.

Each is a function of the `Injector` that runs it (`Injector._fault_<kind>` delegates).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from tests.chaos.faults import FaultRecord, Injector, Planned, Target

HOOK_KINDS = ("on_acquire", "on_release")
NATURAL_WAIT = 2.0  # sigstop_in_hook: how long to wait for a hook before provoking one
ATTEMPTS = 3  # targets a run's first sigstop_in_hook / child_work tries before giving up


class LedgerWatch:
    """Lines a member's processes append to their ledgers after the watch was created.

    Reads each ``<member>-<pid>.jsonl`` from where it was when the watch began (create the
    watch *before* writing a trigger file, so no line written after it is missed), and
    only what was appended since the last poll.
    """

    def __init__(self, ledger_dir: Path, member: str) -> None:
        self.dir = ledger_dir
        self._name = re.compile(re.escape(member.replace(os.sep, "_")) + r"-(\d+)\.jsonl")
        self._offsets: dict[Path, int] = {}
        for path in self._paths():
            self._offsets[path] = path.stat().st_size
        self.starts: list[dict[str, Any]] = []  # every start line seen, in order
        self.open: dict[tuple[int, int, int, str], dict[str, Any]] = {}
        self.ended: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (start, end)

    def _paths(self) -> list[Path]:
        return [p for p in self.dir.glob("*.jsonl") if self._name.fullmatch(p.name)]

    def poll(self) -> None:
        for path in self._paths():
            offset = self._offsets.get(path, 0)
            try:
                with path.open("rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except OSError:
                continue
            complete = data.rfind(b"\n") + 1  # a line being written waits for the next poll
            self._offsets[path] = offset + complete
            for line in data[:complete].splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                key = (int(rec["pid"]), int(rec["segment"]), int(rec["token"]),
                       str(rec.get("kind") or "call"))  # fmt: skip
                if rec.get("ev") == "start":
                    self.starts.append(rec)
                    self.open[key] = rec
                elif rec.get("ev") == "end" and key in self.open:
                    self.ended.append((self.open.pop(key), rec))

    def slow_hooks(self) -> list[dict[str, Any]]:
        """Start lines of slow hooks seen so far."""
        return [r for r in self.starts if r.get("kind") in HOOK_KINDS and "slow" in r]

    def open_slow_hooks(self) -> list[dict[str, Any]]:
        """Slow hooks started and not ended (their process may have died meanwhile)."""
        return [r for r in self.open.values() if r.get("kind") in HOOK_KINDS and "slow" in r]

    def child_calls(self) -> list[dict[str, Any]]:
        return [r for r in self.starts if "child" in r and not r.get("kind")]

    def end_of(self, start: dict[str, Any]) -> dict[str, Any] | None:
        return next((end for s, end in self.ended if s is start), None)


def _pid_alive(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False


def _trigger(directory: Path, member: str, seconds: float) -> Path:
    """Write the per-member trigger file atomically (a reader never sees half a number)."""
    path = directory / member.replace(os.sep, "_")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{seconds}\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _describe_hook(rec: dict[str, Any]) -> str:
    return f"{rec['kind']} of segment {rec['segment']} token {rec['token']} pid {rec['pid']}"


def _in_progress(watch: LedgerWatch, seconds: float) -> list[dict[str, Any]]:
    """Open slow hooks that can still be running: process alive and time not yet up."""
    watch.poll()
    now = time.monotonic()
    return [
        h
        for h in watch.open_slow_hooks()
        if now < float(h["t"]) + seconds + 0.5 and _pid_alive(int(h["pid"]))
    ]


def slow_hook(inj: Injector, planned: Planned, record: FaultRecord) -> None:
    target = inj._choose(planned.pick, proxied=True)
    with inj._hold(f"slow-hook:{target.member}", planned.guaranteed) as got:
        if not got:
            raise _no_target(f"the slow-hook trigger of {target.member} is in use")
        _slow_hook(inj, planned, record, target)


def _no_target(why: str) -> Exception:
    from tests.chaos.faults import NoTarget

    return NoTarget(why)


def _slow_hook(inj: Injector, planned: Planned, record: FaultRecord, target: Target) -> None:
    hook_seconds = float(planned.params["hook_seconds"])
    provoke = str(planned.params["provoke"])
    watch = LedgerWatch(inj.cluster.ledger_dir, target.member)
    path = _trigger(inj.cluster.slow_hook_dir, target.member, hook_seconds)
    inj._begin(record, target.describe(), hook_seconds=hook_seconds, hold=planned.seconds,
               provoke=provoke)  # fmt: skip
    until = time.monotonic() + planned.seconds
    outcome: dict[str, Any] = {}
    try:
        if provoke == "sigterm":
            outcome["sigterm_delivered"] = inj._signal(target, signal.SIGTERM)
        elif provoke == "kill_mid_hook":
            others = [c for c in inj._children() if c.pid != target.pid]
            if others:
                other = others[planned.pick % len(others)]
                outcome["killed_other"] = other.describe()
                inj._signal(other, signal.SIGKILL)
                inj._forget_stopped(other.pid)

            def hook_of_target() -> dict[str, Any] | None:
                watch.poll()
                return next(
                    (h for h in watch.open_slow_hooks() if int(h["pid"]) == target.pid), None
                )

            hook = inj._wait(hook_of_target, inj.lease_ttl + 5.0)
            if hook is not None:
                inj._sleep(float(planned.params["kill_after"]) * hook_seconds)
                outcome["killed_mid_hook"] = _describe_hook(hook)
                outcome["kill_delivered"] = inj._signal(target, signal.SIGKILL)
                inj._forget_stopped(target.pid)
            else:
                outcome["killed_mid_hook"] = None
        inj._sleep(max(0.0, until - time.monotonic()))
    finally:
        path.unlink(missing_ok=True)
    # Over once no slow hook can still be running (by member: a successor counts too).
    inj._wait(lambda: not _in_progress(watch, hook_seconds), hook_seconds + 10.0)
    watch.poll()
    hooks = watch.slow_hooks()
    ended = {id(s) for s, _e in watch.ended}
    inj._end(
        record,
        **outcome,
        slow_hooks=dict(Counter(str(h["kind"]) for h in hooks)),
        cut_short=sum(1 for h in hooks if id(h) not in ended),
        pids=sorted({int(h["pid"]) for h in hooks}),
    )


def sigstop_in_hook(inj: Injector, planned: Planned, record: FaultRecord) -> None:
    from tests.chaos.faults import NoTarget

    attempts = ATTEMPTS if planned.guaranteed else 1
    for attempt in range(attempts):
        try:
            _sigstop_attempt(inj, planned, record, attempt)
            return
        except NoTarget:
            record.detail["attempts"] = attempt + 1
            if attempt + 1 == attempts:
                raise


def _sigstop_attempt(inj: Injector, planned: Planned, record: FaultRecord, attempt: int) -> None:
    target: Target | None = None
    if planned.params.get("proxied") and attempt == 0:

        def free_proxied() -> Target | None:
            p = inj._proxied()
            return p if p is not None and not inj._claimed(p.pid) else None

        target = inj._wait(free_proxied, 20.0)
    if target is None:
        target = inj._choose(planned.pick + attempt, proxied=True, unstopped=True)
    with inj._lock:
        if target.pid in inj.stopped or target.pid in inj.reserved:
            target = None
        else:
            inj.reserved.add(target.pid)  # no other SIGSTOP while we wait for a hook
    if target is None:
        raise _no_target("the chosen worker was stopped meanwhile")
    try:
        with inj._hold(f"slow-hook:{target.member}", planned.guaranteed) as got:
            if not got:
                raise _no_target(f"the slow-hook trigger of {target.member} is in use")
            _sigstop_in_hook(inj, planned, record, target)
    finally:
        with inj._lock:
            inj.reserved.discard(target.pid)


def _sigstop_in_hook(inj: Injector, planned: Planned, record: FaultRecord, target: Target) -> None:
    from tests.chaos.faults import Target

    hook_seconds = float(planned.params["hook_seconds"])
    member = target.member
    watch = LedgerWatch(inj.cluster.ledger_dir, member)
    path = _trigger(inj.cluster.slow_hook_dir, member, hook_seconds)
    inj._begin(record, target.describe(), hook_seconds=hook_seconds, seconds=planned.seconds)
    try:

        def open_hook() -> dict[str, Any] | None:
            watch.poll()
            hooks = [h for h in watch.open_slow_hooks() if _pid_alive(int(h["pid"]))]
            with inj._lock:  # not one stopped by another fault or reserved by child_work
                hooks = [
                    h
                    for h in hooks
                    if int(h["pid"]) not in inj.stopped
                    and (int(h["pid"]) == target.pid or int(h["pid"]) not in inj.reserved)
                ]
            return hooks[0] if hooks else None

        hook = inj._wait(open_hook, NATURAL_WAIT)
        if hook is None:
            # Provoke one: a graceful stop runs on_release of every owned segment (slow),
            # and its successor (same member id) acquires with slow on_acquire.
            record.detail["provoked"] = "sigterm"
            inj._signal(target, signal.SIGTERM)
            hook = inj._wait(open_hook, inj.lease_ttl + 10.0)
        if hook is None:
            raise _no_target(f"no hook of {member} started")
        pid = int(hook["pid"])
        try:
            proc = psutil.Process(pid)
        except psutil.Error as exc:
            raise _no_target(f"pid {pid} in a hook is gone") from exc
        with inj._lock:
            inj.stopped[pid] = proc
        stopped_at = time.monotonic()
        delivered = inj._signal(Target(target.name, member, pid, proc), signal.SIGSTOP)
        record.detail.update(
            pid=pid, hook=_describe_hook(hook), into_hook=round(stopped_at - float(hook["t"]), 3),
            stopped_at=stopped_at, delivered=delivered,
        )  # fmt: skip
        inj._sleep(planned.seconds)
        with inj._lock:
            ours = inj.stopped.pop(pid, None) is not None
        resumed = False
        if ours:
            resumed = inj._signal(Target(target.name, member, pid, proc), signal.SIGCONT)
            record.detail["continued_at"] = time.monotonic()
        record.detail["resumed"] = resumed
    finally:
        path.unlink(missing_ok=True)

    # Over once that hook is done: its end line, or its process gone.
    def over() -> bool:
        watch.poll()
        return watch.end_of(hook) is not None or not _pid_alive(pid)

    inj._wait(over, hook_seconds + 10.0)
    end = watch.end_of(hook)
    after: dict[str, Any] = {"hook_ended": end is not None}
    continued = record.detail.get("continued_at")
    if end is not None and continued is not None:
        after["hook_ran_after_cont"] = round(float(end["t"]) - continued, 3)
    elif continued is not None and not _pid_alive(pid):
        after["process_died"] = True
    inj._end(record, **after)


def child_work(inj: Injector, planned: Planned, record: FaultRecord) -> None:
    # The first of each run must happen: it tries other workers if one starts no call
    # (one that owns nothing yet, say, or is killed by another fault meanwhile).
    for attempt in range(ATTEMPTS if planned.guaranteed else 1):
        target = inj._choose(planned.pick + attempt, proxied=False, unstopped=True)
        with inj._lock:
            inj.reserved.add(target.pid)  # no SIGSTOP of it: its children would run on
        try:
            if _child_work(inj, planned, record, target):
                return
        finally:
            with inj._lock:
                inj.reserved.discard(target.pid)
        record.detail["attempts"] = attempt + 1
    raise _no_target("no child-process call started")


def _child_work(inj: Injector, planned: Planned, record: FaultRecord, target: Target) -> bool:
    """One attempt: False if no call of the target started child-process work."""
    child_seconds = float(planned.params["child_seconds"])
    watch = LedgerWatch(inj.cluster.ledger_dir, target.member)
    path = _trigger(inj.cluster.child_dir, target.member, child_seconds)
    inj._begin(record, target.describe(), child_seconds=child_seconds)
    try:

        def child_call() -> dict[str, Any] | None:
            watch.poll()
            return next((c for c in watch.child_calls() if int(c["pid"]) == target.pid), None)

        first = inj._wait(child_call, inj.lease_ttl + 5.0)
        if first is not None:
            inj._sleep(float(planned.params["kill_after"]))
        try:
            children = [p for p in target.proc.children(recursive=True) if p.is_running()]
        except psutil.Error:
            children = []
    finally:
        path.unlink(missing_ok=True)
    if first is None:
        return False
    killed_at = time.monotonic()
    delivered = inj._signal(target, signal.SIGKILL)
    inj._forget_stopped(target.pid)
    # How long did its children outlive it? (Until the supervisor killed its group, or
    # their work was done.)
    died: dict[int, float] = {}
    deadline = killed_at + child_seconds + 5.0
    while len(died) < len(children) and time.monotonic() < deadline:
        for child in children:
            if child.pid not in died and not _alive(child):
                died[child.pid] = round(time.monotonic() - killed_at, 3)
        inj._sleep(0.02)
    watch.poll()
    inj._end(
        record,
        delivered=delivered,
        into_call=round(killed_at - float(first["t"]), 3),
        child_calls=len([c for c in watch.child_calls() if int(c["pid"]) == target.pid]),
        children=len(children),
        children_outlived_worker_by=sorted(died.values()),
        children_still_alive=len(children) - len(died),
    )
    return True


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
