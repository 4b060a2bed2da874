"""The faults a chaos run injects, the seeded plan that orders them, and their execution.

A plan is drawn up front from one `random.Random(seed)`: every kind once in a
shuffled order, then random kinds, each with its start offset and all of its random
parameters (which target, how long, which cut mode). Execution then only resolves a
target index against what is running at that moment, so a seed replays the same
sequence of faults even though process ids and timing differ between runs.

Faults run in their own threads and overlap (a SIGSTOP still in force while another
worker is killed, a partition during an etcd restart); only faults that would fight
over one resource (two cuts of the proxy, two etcd restarts, two scalings, two rolling
restarts, one process stopped twice, one member's slow-hook trigger) are serialised, and
a worker doing child-process work is never SIGSTOPped (its children would run on, which
says nothing about fleet). The faults on hooks and child processes are in `hookfaults`,
the hostile control client in `controlfaults`, the etcd faults of a 3-member cluster
(`--cluster`, which replace `etcd_restart`) in `clusterfaults`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from tests.chaos import clusterfaults, controlfaults, hookfaults
from tests.chaos.proxy import TcpProxy

if TYPE_CHECKING:
    from tests.chaos.run import Cluster

KINDS = (
    "kill9_worker",
    "kill9_leader",
    "sigstop_worker",
    "sigterm_worker",
    "scale",
    "rolling_restart",
    "etcd_restart",
    "network_cut",
    "handler_hang",
    "slow_hook",
    "sigstop_in_hook",
    "child_work",
    "hostile_control",
    "slow_network",
)
# Relative frequency of the random faults that follow the one-of-each opening.
WEIGHTS = {
    "kill9_worker": 3.0,
    "kill9_leader": 2.0,
    "sigstop_worker": 3.0,
    "sigterm_worker": 2.0,
    "scale": 1.5,
    "rolling_restart": 1.0,
    "etcd_restart": 1.5,
    "network_cut": 2.0,
    "handler_hang": 2.0,
    "slow_hook": 1.5,
    "sigstop_in_hook": 1.5,
    "child_work": 1.5,
    "hostile_control": 0.5,
    "slow_network": 1.5,
}
# The kinds of a `--cluster` run: the etcd faults hit members of a 3-member cluster.
CLUSTER_KINDS = (
    *(k for k in KINDS if k not in clusterfaults.REPLACED),
    *clusterfaults.KINDS,
)
ALL_WEIGHTS = {**WEIGHTS, **clusterfaults.WEIGHTS}
# Which faults may not run at the same time as another holding the same resource.
RESOURCES = {
    "etcd_restart": "etcd",
    "network_cut": "proxy",
    "slow_network": "proxy",
    "scale": "scale",
    "rolling_restart": "rolling",
    "hostile_control": "control",
    **clusterfaults.RESOURCES,
}
RANDOM_WAIT = 5.0  # a random fault whose resource stays busy this long is skipped
GUARANTEED_WAIT = 60.0
ROLLING_WAIT = 30.0  # longest a rolling_restart fault waits for the restart to finish
PROXIED = "proxied"


@dataclass(frozen=True)
class Planned:
    """One fault of the plan: when (seconds after the fault phase began) and how."""

    index: int
    at: float
    kind: str
    guaranteed: bool
    pick: int  # resolved modulo the candidates present when the fault runs
    seconds: float  # how long the fault lasts (stop, cut, hang, scale hold, etcd down)
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class FaultRecord:
    """What happened: times on both clocks, the target, details, and any error."""

    index: int
    kind: str
    guaranteed: bool
    planned_at: float
    start: float | None = None  # time.monotonic()
    end: float | None = None
    start_wall: float | None = None
    end_wall: float | None = None
    target: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    parent: int | None = None  # a fault started by another (the cut under a hang)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kinds_for(cluster: bool) -> tuple[str, ...]:
    """The fault kinds of a run against one etcd, or against a 3-member cluster."""
    return CLUSTER_KINDS if cluster else KINDS


def make_plan(
    rng: random.Random,
    duration: float,
    *,
    lease_ttl: int,
    workers: int,
    kinds: Sequence[str] = KINDS,
) -> list[Planned]:
    """Every kind once (shuffled), then random kinds until `duration`; some start together."""
    plan: list[Planned] = []

    def add(kind: str, at: float, guaranteed: bool) -> None:
        params: dict[str, Any] = {}
        seconds = 0.0
        if kind in ("sigstop_worker", "network_cut"):
            seconds = lease_ttl + 2.0
        if kind == "sigstop_worker":
            # `fleet up` kills a child silent for --heartbeat-timeout (5 s, about what this
            # stop lasts), so a stopped child usually dies before its SIGCONT; the proxied
            # worker has no supervisor and always lives to resume past its lease, fenced.
            # The first stop is always that one.
            params["proxied_only"] = guaranteed
        if kind == "network_cut":
            params["mode"] = rng.choice(["refuse", "blackhole"])
        elif kind == "handler_hang":
            # The first hang always hits the proxied worker under a partition (TTL + 2 s),
            # so that every run sees the watchdog kill a handler stuck past its lease
            # deadline; it hangs long enough (2 TTL + 6 s) for that even if the worker is
            # also SIGSTOPped meanwhile (frozen time does not count for the watchdog). Later
            # ones hit any member: a hang under a live lease just blocks its segments, which
            # a rebalance or a stop must wait out, unless an etcd restart or another
            # partition takes the lease away meanwhile.
            params["proxied"] = guaranteed or rng.random() < 1.0 / (workers + 1)
            params["cut_mode"] = rng.choice(["refuse", "blackhole"])
            seconds = 2.0 * lease_ttl + 6.0 if params["proxied"] else lease_ttl + 3.0
        elif kind == "etcd_restart":
            seconds = rng.uniform(1.0, 2.0)
        elif kind == "slow_hook":
            # Hooks of 1 s to TTL + 1 s, for a window of 6-12 s, provoked by a SIGTERM of
            # the target (the first one always: it always yields hooks), a kill -9 of the
            # target in the middle of a hook (after killing another worker, so that the
            # target acquires), or nothing but the other faults' handoffs.
            params["hook_seconds"] = round(rng.uniform(1.0, lease_ttl + 1.0), 3)
            params["provoke"] = (
                "sigterm" if guaranteed else rng.choice(["sigterm", "kill_mid_hook", "none"])
            )
            params["kill_after"] = round(rng.uniform(0.1, 0.8), 3)  # fraction of the hook
            seconds = rng.uniform(6.0, 12.0)
        elif kind == "sigstop_in_hook":
            # Stopped for TTL + 2 s inside a hook that lasts 2 TTL + 6 s: it is still in
            # the hook when continued, so it can only stop by the watchdog (or finish
            # beside the new owner, which the checker reports). The first one always hits
            # the proxied worker (no supervisor kills it while it is stopped).
            seconds = lease_ttl + 2.0
            params["hook_seconds"] = 2.0 * lease_ttl + 6.0
            params["proxied"] = guaranteed or rng.random() < 0.5
        elif kind == "child_work":
            # Child processes that work 2-4 s per call (longer than a handoff after kill
            # -9: the supervisor revokes the lease at once), killed 0.2-1 s into the call.
            params["child_seconds"] = round(rng.uniform(2.0, 4.0), 3)
            params["kill_after"] = round(rng.uniform(0.2, 1.0), 3)
        elif kind == "scale":
            params["by"] = rng.randint(1, 2)
            seconds = rng.uniform(3.0, 8.0)
        elif kind == "hostile_control":
            seconds = rng.uniform(3.0, 6.0)
        elif kind == "slow_network":
            # The proxied worker's link turns bad, not broken, for 3-8 s: 0.2 s to TTL/3
            # (1 s at TTL 3) one way, 2-200 KiB/s each way (log-uniform: the worker's
            # link carries about 2 KiB/s, so only the low end throttles it). A one-way
            # latency near the TTL would let no keepalive come back before the lease is
            # gone, a partition in all but name (network_cut's job); up to TTL/3 a round
            # trip (2 latencies) still fits in TTL - margin, so acknowledged-but-late
            # keepalives, commits and watch events are what this exercises.
            params["latency"] = round(rng.uniform(0.2, min(1.0, lease_ttl / 3)), 3)
            params["bandwidth"] = int(2 * 1024 * 100 ** rng.random())
            seconds = rng.uniform(3.0, 8.0)
        elif kind in clusterfaults.KINDS:
            seconds, params = clusterfaults.plan_params(kind, rng, lease_ttl, guaranteed)
        plan.append(
            Planned(
                index=len(plan),
                at=round(at, 3),
                kind=kind,
                guaranteed=guaranteed,
                pick=rng.randrange(1 << 30),
                seconds=round(seconds, 3),
                params=params,
            )
        )

    opening = list(kinds)
    rng.shuffle(opening)
    at = rng.uniform(0.5, 1.5)
    for kind in opening:
        add(kind, at, guaranteed=True)
        at += rng.uniform(1.0, 3.0)
    randoms = [k for k in ALL_WEIGHTS if k in kinds]  # in KINDS order: seeds replay
    weights = [ALL_WEIGHTS[k] for k in randoms]
    while True:
        # About one fault every 2.3 s; 0: two at once. Faster, and `fleet up` parks most
        # slots in FATAL (5 exits within 60 s, then a 5 min cool-down) well before the end.
        at += 0.0 if rng.random() < 0.15 else rng.uniform(1.5, 4.0)
        if at >= duration - 1.0:
            break
        add(rng.choices(randoms, weights)[0], at, guaranteed=False)
    return plan


class NoTarget(Exception):
    """No running worker to act on (every slot down, FATAL or already stopped)."""


@dataclass
class Target:
    """A process a fault acts on; `proc` guards against signalling a reused pid."""

    name: str  # "w<slot>" or "proxied"
    member: str
    pid: int
    proc: psutil.Process

    def describe(self) -> str:
        return f"{self.name} ({self.member}, pid {self.pid})"


class Injector:
    """Runs a plan against a cluster; `run()` returns once every fault has ended."""

    def __init__(
        self,
        cluster: Cluster,
        plan: Sequence[Planned],
        *,
        lease_ttl: int,
        say: Callable[[str], None],
    ) -> None:
        self.cluster = cluster
        self.plan = list(plan)
        self.lease_ttl = lease_ttl
        self.say = say
        self.records: list[FaultRecord] = []
        self.stop = threading.Event()
        self.t0 = 0.0
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._freed = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self.stopped: dict[int, psutil.Process] = {}  # SIGSTOPped by us, not yet continued
        self.reserved: set[int] = set()  # pids no fault may SIGSTOP (child_work targets)

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> list[FaultRecord]:
        self.t0 = time.monotonic()
        try:
            for planned in self.plan:
                if self.stop.wait(max(0.0, self.t0 + planned.at - time.monotonic())):
                    break
                record = self._record(planned.index, planned.kind, planned.guaranteed, planned.at)
                thread = threading.Thread(
                    target=self._execute,
                    args=(planned, record),
                    name=f"fault-{planned.index}-{planned.kind}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
            self.join(timeout=180.0)
        finally:
            self.continue_all()
        return self.records

    def abort(self, wait: float = 5.0) -> None:
        """Stop: every fault's sleep ends at once (each undoes what it did); wait a little."""
        self.stop.set()
        deadline = time.monotonic() + wait
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.continue_all()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            self.stop.set()
            raise RuntimeError(f"faults still running after {timeout:.0f} s: {alive}")

    def continue_all(self) -> None:
        """SIGCONT everything we stopped (also on an interrupted run)."""
        with self._lock:
            stopped, self.stopped = dict(self.stopped), {}
        for proc in stopped.values():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)

    def _record(self, index: int, kind: str, guaranteed: bool, at: float) -> FaultRecord:
        record = FaultRecord(index=index, kind=kind, guaranteed=guaranteed, planned_at=at)
        with self._lock:
            self.records.append(record)
        return record

    def _elapsed(self, t: float | None = None) -> float:
        return (t if t is not None else time.monotonic()) - self.t0

    def _begin(self, record: FaultRecord, target: str | None, **detail: Any) -> None:
        record.start, record.start_wall = time.monotonic(), time.time()
        record.target = target
        record.detail.update(detail)
        extra = "".join(f" {k}={v}" for k, v in detail.items())
        self.say(
            f"fault t+{self._elapsed(record.start):5.1f}s + #{record.index} {record.kind}"
            f"{' -> ' + target if target else ''}{extra}"
        )

    def _end(self, record: FaultRecord, **detail: Any) -> None:
        record.end, record.end_wall = time.monotonic(), time.time()
        record.detail.update(detail)
        took = record.end - (record.start or record.end)
        extra = "".join(f" {k}={v}" for k, v in detail.items())
        self.say(
            f"fault t+{self._elapsed(record.end):5.1f}s - #{record.index} {record.kind} "
            f"ended after {took:.1f}s{extra}"
        )

    @contextlib.contextmanager
    def _hold(self, resource: str | None, guaranteed: bool) -> Iterator[bool]:
        """Yield True once `resource` is ours (False: gave up waiting; skip the fault)."""
        if resource is None:
            yield True
            return
        deadline = time.monotonic() + (GUARANTEED_WAIT if guaranteed else RANDOM_WAIT)
        with self._freed:
            while resource in self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self.stop.is_set():
                    break
                self._freed.wait(timeout=min(left, 0.2))
            got = resource not in self._busy
            if got:
                self._busy.add(resource)
        try:
            yield got
        finally:
            if got:
                with self._freed:
                    self._busy.discard(resource)
                    self._freed.notify_all()

    def _sleep(self, seconds: float) -> None:
        """Sleep through a fault; an interrupted run still ends it (heal, SIGCONT)."""
        self.stop.wait(seconds)

    def _execute(self, planned: Planned, record: FaultRecord) -> None:
        try:
            with self._hold(RESOURCES.get(planned.kind), planned.guaranteed) as got:
                if not got:
                    record.skipped = f"{RESOURCES[planned.kind]} busy"
                    self.say(
                        f"fault t+{self._elapsed():5.1f}s . #{record.index} {record.kind} skipped: "
                        f"{record.skipped}"
                    )
                    return
                getattr(self, f"_fault_{planned.kind}")(planned, record)
        except NoTarget as exc:
            record.skipped = str(exc)
            self.say(f"fault t+{self._elapsed():5.1f}s . #{record.index} {record.kind}: {exc}")
        except Exception as exc:  # reported as an injection error: a harness or fleet bug
            record.error = f"{type(exc).__name__}: {exc}"
            self.say(
                f"fault t+{self._elapsed():5.1f}s ! #{record.index} {record.kind}: {record.error}"
            )
        finally:
            if record.start is not None and record.end is None:
                self._end(record)

    # -- targets --------------------------------------------------------------------------

    def _children(self, ready_only: bool = True) -> list[Target]:
        """Live `fleet up` children, by slot."""
        targets = []
        for row in sorted(self.cluster.ps(), key=lambda r: r["slot"]):
            pid = row.get("pid")
            if pid is None or (ready_only and row["state"] != "READY"):
                continue
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                continue
            targets.append(Target(f"w{row['slot']}", row["member"], pid, proc))
        return targets

    def _proxied(self) -> Target | None:
        pid = self.cluster.proxied_pid()
        if pid is None:
            return None
        try:
            return Target(PROXIED, PROXIED, pid, psutil.Process(pid))
        except psutil.Error:
            return None

    def _choose(self, pick: int, *, proxied: bool, unstopped: bool = False) -> Target:
        """Resolve `pick` against the workers running now (waiting a little for one)."""
        deadline = time.monotonic() + 10.0
        while True:
            candidates = self._children() or self._children(ready_only=False)
            if proxied and (p := self._proxied()) is not None:
                candidates.append(p)
            if unstopped:
                candidates = [c for c in candidates if not self._claimed(c.pid)]
            if candidates:
                return candidates[pick % len(candidates)]
            if time.monotonic() >= deadline:
                raise NoTarget("no running worker to act on")
            self._sleep(0.1)

    def _claimed(self, pid: int) -> bool:
        """Stopped by us, or reserved by a fault that must not see it stopped."""
        with self._lock:
            return pid in self.stopped or pid in self.reserved

    @staticmethod
    def _signal(target: Target, sig: signal.Signals) -> bool:
        try:
            target.proc.send_signal(sig)
        except psutil.NoSuchProcess:
            return False
        return True

    # -- the faults -----------------------------------------------------------------------

    def _fault_kill9_worker(self, planned: Planned, record: FaultRecord) -> None:
        target = self._choose(planned.pick, proxied=False)
        self._begin(record, target.describe())
        delivered = self._signal(target, signal.SIGKILL)
        self._forget_stopped(target.pid)
        self._end(record, delivered=delivered)

    def _fault_kill9_leader(self, planned: Planned, record: FaultRecord) -> None:
        deadline = time.monotonic() + 5.0
        leader: str | None = None
        while leader is None and time.monotonic() < deadline:
            try:
                leader = self.cluster.status().get("leader")
            except Exception:  # etcd may be restarting: ask again
                leader = None
            if leader is None:
                self._sleep(0.1)
        target: Target | None = None
        if leader == PROXIED:
            target = self._proxied()
        elif leader is not None:
            target = next((c for c in self._children(False) if c.member == leader), None)
        if target is None:
            # No leader right now (an election in progress, etcd down): the oldest campaign
            # wins next, so kill a random worker instead and say so.
            target = self._choose(planned.pick, proxied=False)
            record.detail["fallback"] = f"leader {leader!r} not among running workers"
        self._begin(record, target.describe(), leader=leader)
        delivered = self._signal(target, signal.SIGKILL)
        self._forget_stopped(target.pid)
        self._end(record, delivered=delivered)

    def _fault_sigstop_worker(self, planned: Planned, record: FaultRecord) -> None:
        target: Target | None = None
        if planned.params.get("proxied_only"):
            self._wait(lambda: self._proxied() is not None, 10.0)
            target = self._proxied()
        if target is not None and self._claimed(target.pid):
            target = None
        if target is None:
            target = self._choose(planned.pick, proxied=True, unstopped=True)
        with self._lock:
            self.stopped[target.pid] = target.proc
        self._begin(record, target.describe(), seconds=planned.seconds, pid=target.pid)
        record.detail["stopped_at"] = time.monotonic()
        delivered = self._signal(target, signal.SIGSTOP)
        self._sleep(planned.seconds)
        with self._lock:
            ours = self.stopped.pop(target.pid, None) is not None
        resumed = ours and self._signal(target, signal.SIGCONT)
        if resumed:
            record.detail["continued_at"] = time.monotonic()
        self._end(record, delivered=delivered, resumed=resumed)

    def _forget_stopped(self, pid: int) -> None:
        with self._lock:
            self.stopped.pop(pid, None)

    def _fault_sigterm_worker(self, planned: Planned, record: FaultRecord) -> None:
        target = self._choose(planned.pick, proxied=True)
        self._begin(record, target.describe())
        delivered = self._signal(target, signal.SIGTERM)
        try:
            target.proc.wait(timeout=15.0)
            exited = True
        except psutil.TimeoutExpired:
            exited = False  # stopped by another fault, or draining a hung call
        except psutil.Error:
            exited = True
        self._end(record, delivered=delivered, exited=exited)

    def _fault_scale(self, planned: Planned, record: FaultRecord) -> None:
        base = self.cluster.workers
        up = base + int(planned.params["by"])
        self._begin(record, f"{base} -> {up} -> {base}", hold=planned.seconds)
        self.cluster.fleet_command(["scale", str(up)])
        self._sleep(planned.seconds)
        if self.stop.is_set():
            return
        self.cluster.fleet_command(["scale", str(base)])
        gone = self._wait(lambda: len(self.cluster.ps()) == base, 15.0)
        self._end(record, slots_back=gone)

    def _fault_rolling_restart(self, planned: Planned, record: FaultRecord) -> None:
        before = {r["slot"]: r for r in self.cluster.ps()}
        self._begin(record, f"slots {sorted(before)}")
        self.cluster.fleet_command(["restart"])

        def outcome() -> str | None:
            rows = {r["slot"]: r for r in self.cluster.ps()}
            fatal = sorted(i for i, r in rows.items() if r["state"] == "FATAL")
            if fatal:
                return f"blocked: slots {fatal} FATAL"
            restarted = all(
                i not in rows or rows[i]["restarts"] > before[i]["restarts"] for i in before
            )
            ready = all(r["state"] == "READY" for r in rows.values())
            return "complete" if restarted and ready else None

        # Over once every slot has a new process and all are READY (a slot that crashed
        # meanwhile counts as restarted). The supervisor moves to the next slot only once
        # every slot is settled, so a FATAL slot (5 min cool-down) holds the rest up: the
        # fault ends there, and so does waiting for a restart that other faults slow down.
        result = self._wait(outcome, ROLLING_WAIT) or f"incomplete after {ROLLING_WAIT:g} s"
        rows = {r["slot"]: r["state"] for r in self.cluster.ps()}
        self._end(record, outcome=result, states=rows)

    def _fault_etcd_restart(self, planned: Planned, record: FaultRecord) -> None:
        etcd = self.cluster.etcd
        self._begin(record, f"etcd pid {etcd.pid}", down=planned.seconds)
        etcd.kill()
        self._sleep(planned.seconds)
        if self.stop.is_set():
            return  # the run is being torn down: leave etcd dead
        started = time.monotonic()
        etcd.start(timeout=30.0)
        self._end(record, healthy_after=round(time.monotonic() - started, 3), pid=etcd.pid)

    def _fault_network_cut(self, planned: Planned, record: FaultRecord) -> None:
        self._cut(record, planned.seconds, str(planned.params["mode"]))

    def _cut(self, record: FaultRecord, seconds: float, mode: str) -> None:
        proxy = self.cluster.proxy
        assert proxy is not None
        self._begin(record, f"proxy :{proxy.port}", mode=mode, seconds=seconds)
        killed = proxy.cut(mode)  # type: ignore[arg-type]
        self._sleep(seconds)
        proxy.heal()
        self._end(record, connections_closed=killed)

    def _fault_slow_network(self, planned: Planned, record: FaultRecord) -> None:
        """Slow every proxy (one per member in `--cluster`), cutting nothing, then heal."""
        assert self.cluster.proxy is not None
        proxies = proxies_of(self.cluster.proxy)
        latency, bandwidth = float(planned.params["latency"]), int(planned.params["bandwidth"])
        before = [vars(p.stats).copy() for p in proxies]
        lost_before = self._proxied_leases_lost()
        exits_before = len(self.cluster.proxied_exits)
        self._begin(
            record, f"proxy :{self.cluster.proxy.port}", latency=latency, bandwidth=bandwidth,
            seconds=planned.seconds, connections=sum(p.active for p in proxies),
        )  # fmt: skip
        try:
            for proxy in proxies:
                proxy.slow(latency=latency, bandwidth=bandwidth)
            self._sleep(planned.seconds)
        finally:
            for proxy in proxies:
                proxy.heal()

        def delta(name: str) -> int:
            return sum(vars(p.stats)[name] - b[name] for p, b in zip(proxies, before, strict=True))

        # Connections closed by a cut must stay 0: slowness closes nothing (the worker may
        # still drop and reconnect on its own, counted in `accepted`).
        self._end(
            record, bytes_up=delta("bytes_up"), bytes_down=delta("bytes_down"),
            bytes_delayed=delta("delayed_bytes"), throttle_waits=delta("throttled"),
            connections_closed=delta("killed"),
            accepted=delta("accepted"), connections_after=sum(p.active for p in proxies),
            proxied_leases_lost=self._proxied_leases_lost() - lost_before,
            proxied_exits=len(self.cluster.proxied_exits) - exits_before,
        )  # fmt: skip

    def _proxied_leases_lost(self) -> int:
        """How many "lease ... lost" lines the proxied worker logged so far (every run)."""
        return sum(
            len(LEASE_LOST_RE.findall(path.read_text(encoding="utf-8", errors="replace")))
            for path in self.cluster.logs.glob(f"{PROXIED}*.log")
        )

    def _fault_handler_hang(self, planned: Planned, record: FaultRecord) -> None:
        if planned.params.get("proxied"):
            target = self._proxied()
            if target is None:  # restarting: wait for it
                self._wait(lambda: self._proxied() is not None, 10.0)
                target = self._proxied()
        else:
            target = self._choose(planned.pick, proxied=True)
        if target is None:
            raise NoTarget("the proxied worker is not running")
        member = target.member
        hang_file = self.cluster.hang_dir / member.replace(os.sep, "_")
        written = time.time()
        tmp = hang_file.with_name(hang_file.name + ".tmp")
        tmp.write_text(f"{planned.seconds}\n", encoding="utf-8")
        tmp.replace(hang_file)  # atomic: a call never reads half a number
        self._begin(record, target.describe(), seconds=planned.seconds)
        try:
            # Until one of its calls starts (a worker between owners may have none yet).
            first = self._wait(
                lambda: hung_calls(self.cluster.ledger_dir, member, since=written),
                self.lease_ttl + 5.0,
            )
            self._sleep(0.3)  # let its other segments' next calls start too
        finally:
            hang_file.unlink(missing_ok=True)
        hung = hung_calls(self.cluster.ledger_dir, member, since=written)
        if not first or not hung:
            self._end(record, note="no call started while the hang file was there")
            return
        if planned.params.get("proxied"):
            # Partition it while stuck: its lease deadline passes, the watchdog must kill it.
            with self._hold("proxy", guaranteed=True) as got:
                if got:
                    cut = self._record(record.index, "network_cut", False, record.planned_at)
                    cut.parent = record.index
                    cut_mode = str(planned.params.get("cut_mode", "refuse"))
                    self._cut(cut, self.lease_ttl + 2.0, cut_mode)

        # The fault lasts until every stuck call is over: its time ran out, or its process
        # died (the watchdog, or another fault). By member, not by the target process: a
        # slot respawned while the file was there hangs too.
        def stuck() -> list[dict[str, Any]]:
            now = time.monotonic()
            return [
                h
                for h in hung_calls(self.cluster.ledger_dir, member, since=written)
                if now < h["t"] + planned.seconds + 0.2 and _pid_alive(int(h["pid"]))
            ]

        self._wait(lambda: not stuck(), planned.seconds + 10.0)
        hung = hung_calls(self.cluster.ledger_dir, member, since=written)
        pids = sorted({int(h["pid"]) for h in hung})
        self._end(
            record,
            hung_calls=len(hung),
            pids=pids,
            died=[pid for pid in pids if not _pid_alive(pid)],
            still_stuck=len(stuck()),
        )

    def _fault_slow_hook(self, planned: Planned, record: FaultRecord) -> None:
        hookfaults.slow_hook(self, planned, record)

    def _fault_sigstop_in_hook(self, planned: Planned, record: FaultRecord) -> None:
        hookfaults.sigstop_in_hook(self, planned, record)

    def _fault_child_work(self, planned: Planned, record: FaultRecord) -> None:
        hookfaults.child_work(self, planned, record)

    def _fault_hostile_control(self, planned: Planned, record: FaultRecord) -> None:
        controlfaults.hostile_control(self, planned, record)

    def _fault_member_kill9(self, planned: Planned, record: FaultRecord) -> None:
        clusterfaults.member_kill9(self, planned, record)

    def _fault_member_pause(self, planned: Planned, record: FaultRecord) -> None:
        clusterfaults.member_pause(self, planned, record)

    def _fault_leader_transfer(self, planned: Planned, record: FaultRecord) -> None:
        clusterfaults.leader_transfer(self, planned, record)

    def _fault_quorum_loss(self, planned: Planned, record: FaultRecord) -> None:
        clusterfaults.quorum_loss(self, planned, record)

    def _wait(self, predicate: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = predicate()
            except Exception:  # the cluster is in chaos: ask again
                value = None
            if value or time.monotonic() >= deadline or self.stop.is_set():
                return value
            self._sleep(0.1)


LEASE_LOST_RE = re.compile(r"lease [0-9a-f]+ lost: ")


def proxies_of(proxy: Any) -> list[TcpProxy]:
    """The `TcpProxy`s behind the proxied worker: one, or a `ProxyGroup`'s (one a member)."""
    return list(getattr(proxy, "proxies", [proxy]))


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False


def hung_calls(ledger_dir: Path, member: str, since: float) -> list[dict[str, Any]]:
    """Start lines of `member`'s calls that hung, recorded after wall time `since`."""
    found = []
    name = re.compile(re.escape(member.replace(os.sep, "_")) + r"-\d+\.jsonl")
    for path in Path(ledger_dir).glob("*.jsonl"):
        if not name.fullmatch(path.name):
            continue
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if '"hang"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line being written right now
                if rec.get("ev") == "start" and rec.get("wall", 0) >= since:
                    found.append(rec)
    return found
