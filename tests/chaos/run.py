"""Jepsen-style chaos run of a real fleet: `python -m tests.chaos.run [options]`.

One single-node etcd, one `fleet up --workers W` with the recording handler (its class
form, so `on_acquire`/`on_release` are recorded and can be made slow), and one
extra standalone `fleet worker --id proxied` that reaches etcd only through a TCP proxy
of our own (so a network partition is `proxy.cut()`). For `--duration` seconds a seeded
plan injects faults of every kind (see `tests.chaos.faults`), several at a time. Then
everything is healed and the run measures how long the fleet takes to own and process
every segment again (bound: lease TTL + 5 s), stops the fleet with `fleet down`,
checks that no process and no member/owner/election key is left, and runs the
history checker (`tests.chaos.history.check`) over every ledger and the final
checkpoints.

With ``--cluster`` etcd is a 3-member cluster (`tests.chaos.clusteretcd`): every worker
is given all three endpoints, the proxied worker one proxy per member, and the etcd
faults are those of `tests.chaos.clusterfaults` (member kill -9 and restart, member
SIGSTOP, leader transfer, quorum loss) instead of `etcd_restart`.

Prints a one-screen summary, writes ``<out>/chaos-<seed>.json``, exits 0 on pass and 1
otherwise; the seed is always printed, so a failure can be replayed with ``--seed``.
Every process it started is stopped on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from fleet.coord.etcd import Etcd
from fleet.coord.keys import Keys
from fleet.coord.session import safety_margin
from fleet.coord.status import collect
from fleet.server.embedded import EmbeddedEtcd
from fleet.supervise.control import RunDir, request
from tests.chaos import clusterreport
from tests.chaos.clusteretcd import ClusterEtcd, ProxyGroup, endpoints_of, proxy_for
from tests.chaos.faults import (
    KINDS,
    PROXIED,
    FaultRecord,
    Injector,
    kinds_for,
    make_plan,
    proxies_of,
)
from tests.chaos.history import check, summarize
from tests.chaos.proxy import TcpProxy
from tests.chaos.report import render
from tests.support.checker import load_calls
from tests.support.fleet import CLEAN_ENV, converged
from tests.support.procs import Proc, Spawner, tagged_processes

KEYS = Keys("/fleet", "default")
RECOVERY_SLACK = 5.0  # the bound: every segment owned and processed again within TTL + this
SETUP_TIMEOUT = 60.0
WATCHDOG_LINE = "past the lease deadline; exiting"
JOINED_LINE = "joined fleet"
# The recording handler with recorded (and, on a trigger, slow) on_acquire/on_release.
RECORDER = "tests.support.recording:Recorder"
# An overlap is excused when the older side's process was SIGSTOPped before the newer
# side started and was over within this long after SIGCONT, beyond the watchdog's grace
# of half a safety margin of awake time (a thawed process must also get scheduled).
PAUSE_SLACK = 0.5


@dataclass
class Options:
    duration: float = 75.0
    seed: int | None = None
    workers: int = 4
    segments: int = 16
    lease_ttl: int = 3
    out: Path | None = None
    json: bool = False
    work_dir: Path | None = None
    keep: bool = False
    quiet: bool = False
    cluster: bool = False
    kinds: tuple[str, ...] | None = None  # None: every kind of the mode


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m tests.chaos.run", description=__doc__.split("\n")[0]
    )
    p.add_argument("--duration", type=float, default=75.0, help="seconds of faults (default 75)")
    p.add_argument("--seed", type=int, default=None, help="plan seed (default: random, printed)")
    p.add_argument("--workers", type=int, default=4, help="fleet up workers (default 4)")
    p.add_argument("--segments", type=int, default=16, help="segments (default 16)")
    p.add_argument("--lease-ttl", type=int, default=3, help="lease TTL seconds (default 3)")
    p.add_argument("--out", type=Path, default=None, help="where chaos-<seed>.json goes")
    p.add_argument("--json", action="store_true", help="also print the JSON summary")
    p.add_argument("--work-dir", type=Path, default=None, help="default: a new temp dir")
    p.add_argument("--keep", action="store_true", help="keep the work dir even on pass")
    p.add_argument("--quiet", action="store_true", help="no fault-by-fault progress")
    p.add_argument("--cluster", action="store_true", help="etcd is a 3-member cluster")
    p.add_argument(
        "--kinds", default=None, help="only these fault kinds, comma-separated (default: all)"
    )
    a = p.parse_args(argv)
    if a.duration <= 0 or a.workers < 1 or a.segments < 1 or a.lease_ttl < 1:
        p.error("--duration, --workers, --segments and --lease-ttl must be positive")
    kinds = None
    if a.kinds is not None:
        kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
        unknown = sorted(set(kinds) - set(kinds_for(a.cluster)))
        if unknown or not kinds:
            p.error(f"--kinds {a.kinds!r}: unknown {unknown}; known: {list(kinds_for(a.cluster))}")
    return Options(
        duration=a.duration,
        seed=a.seed,
        workers=a.workers,
        segments=a.segments,
        lease_ttl=a.lease_ttl,
        out=a.out,
        json=a.json,
        work_dir=a.work_dir,
        keep=a.keep,
        quiet=a.quiet,
        cluster=a.cluster,
        kinds=kinds,
    )


class Stopwatch:
    """Monotonic seconds since the run started, for progress lines."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, t: float | None = None) -> float:
        return (t if t is not None else time.monotonic()) - self.t0


# -- the cluster under test ---------------------------------------------------------------


class Cluster:
    """etcd + proxy + `fleet up` + the proxied worker, and the handles faults need."""

    def __init__(self, opts: Options, work: Path, say: Callable[[str], None]) -> None:
        self.opts = opts
        self.work = work
        self.say = say
        self.workers = opts.workers
        self.logs = work / "logs"
        self.ledger_dir = work / "ledger"
        self.hang_dir = work / "hang"
        self.slow_hook_dir = work / "slow-hook"
        self.child_dir = work / "child"
        self.trigger_dirs = (self.hang_dir, self.slow_hook_dir, self.child_dir)
        for d in (self.logs, self.ledger_dir, *self.trigger_dirs):
            d.mkdir(parents=True, exist_ok=True)
        self.run_dir = RunDir(work / ".fleet")
        self.spawner = Spawner(log_dir=self.logs, cwd=work)
        self.etcd: EmbeddedEtcd | ClusterEtcd = (
            ClusterEtcd(work / "etcd", self.logs)
            if opts.cluster
            else EmbeddedEtcd(work / "etcd", log_path=self.logs / "etcd.log")
        )
        self.proxy: TcpProxy | ProxyGroup | None = None
        self.up: Proc | None = None
        self.client: Etcd | None = None
        self._client_lock = threading.Lock()
        self._proxied_lock = threading.Lock()
        self.proxied: Proc | None = None
        self.proxied_exits: list[dict[str, Any]] = []
        self.keep_proxied = threading.Event()
        self._monitor: threading.Thread | None = None
        self.env: dict[str, str | None] = {
            **CLEAN_ENV,
            "FLEET_TEST_LEDGER": str(self.ledger_dir),
            "FLEET_TEST_HANG_DIR": str(self.hang_dir),
            "FLEET_TEST_SLOW_HOOK_DIR": str(self.slow_hook_dir),
            "FLEET_TEST_CHILD_DIR": str(self.child_dir),
            "FLEET_TEST_CALL_SECONDS": "0.05",
        }

    # -- setup ----------------------------------------------------------------------------

    def start(self) -> None:
        o = self.opts
        self.etcd.start()
        endpoints = endpoints_of(self.etcd)
        self.client = Etcd(endpoints, timeout=2.0)
        self.proxy = proxy_for(self.etcd)
        self.say(f"etcd at {','.join(endpoints)}, proxy at {self.proxy.endpoint}")
        self.up = self.spawner(
            [
                "up", "--workers", str(o.workers), "--segments", str(o.segments),
                "--lease-ttl", str(o.lease_ttl), "--interval", "0.05",
                "--heartbeat-timeout", "5", "--handler", RECORDER,
                "--etcd", ",".join(endpoints), "--host-id", socket.gethostname(),
            ],
            env=self.env,
            name="up",
        )  # fmt: skip
        members = self._wait_ready(o.workers)
        self.wait_converged(members, SETUP_TIMEOUT)
        self.keep_proxied.set()
        self._spawn_proxied()
        self._monitor = threading.Thread(target=self._watch_proxied, name="proxied", daemon=True)
        self._monitor.start()
        self.wait_converged([*members, PROXIED], SETUP_TIMEOUT)

    def _wait_ready(self, workers: int) -> list[str]:
        def ready() -> list[str] | None:
            rows = self.ps()
            if len(rows) == workers and all(r["state"] == "READY" for r in rows):
                return [r["member"] for r in rows]
            return None

        found = self.wait(ready, SETUP_TIMEOUT, f"{workers} READY slots")
        assert found is not None
        return list(found)

    def wait_converged(self, members: Sequence[str], timeout: float) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.status()
            return st if converged(st, members) else None

        found = self.wait(check, timeout, f"the fleet converged on {sorted(members)}")
        assert found is not None
        return dict(found)

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            self.assert_up_alive()
            try:
                last = predicate()
            except Exception as exc:  # not there yet
                last = exc
            else:
                if last:
                    return last
            if time.monotonic() >= deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}: {last!r}")
            time.sleep(0.1)

    def assert_up_alive(self) -> None:
        if self.up is not None and not self.up.alive:
            raise RuntimeError(
                f"fleet up exited {self.up.returncode} unexpectedly:\n{self.up.tail(30)}"
            )

    # -- the proxied worker ---------------------------------------------------------------

    def _spawn_proxied(self) -> None:
        assert self.proxy is not None
        o = self.opts
        proc = self.spawner(
            [
                "worker", "--id", PROXIED, "--etcd", self.proxy.endpoint,
                "--segments", str(o.segments), "--lease-ttl", str(o.lease_ttl),
                "--interval", "0.05", "--handler", RECORDER,
            ],
            env=self.env,
            name=PROXIED,
        )  # fmt: skip
        with self._proxied_lock:
            self.proxied = proc

    def _watch_proxied(self) -> None:
        """Restart the proxied worker whenever it exits (the watchdog may kill it)."""
        while self.keep_proxied.is_set():
            with self._proxied_lock:
                proc = self.proxied
            if proc is not None and not proc.alive:
                log = proc.log()
                self.proxied_exits.append(
                    {
                        "t": time.monotonic(),
                        "wall": time.time(),
                        "pid": proc.pid,
                        "code": proc.returncode,
                        "watchdog": WATCHDOG_LINE in log,
                        "log": proc.log_path.name,
                    }
                )
                self.say(
                    f"proxied worker (pid {proc.pid}) exited {proc.returncode}"
                    f"{' (watchdog)' if WATCHDOG_LINE in log else ''}; restarting it"
                )
                time.sleep(0.3)
                if self.keep_proxied.is_set():
                    self._spawn_proxied()
            time.sleep(0.05)

    def proxied_pid(self) -> int | None:
        with self._proxied_lock:
            proc = self.proxied
        return proc.pid if proc is not None and proc.alive else None

    def stop_proxied(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the proxied worker once it has joined (no more restarts); its exit code.

        A worker signalled while still starting (before it installs its handlers, e.g.
        just restarted after an exit) dies of the signal: that says nothing about its
        graceful stop, so first let it join, restarting it once more if it exits.
        """
        deadline = time.monotonic() + self.opts.lease_ttl + 15.0
        while time.monotonic() < deadline:
            with self._proxied_lock:
                proc = self.proxied
            if proc is not None and proc.alive and JOINED_LINE in proc.log():
                break
            time.sleep(0.1)
        self.keep_proxied.clear()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        with self._proxied_lock:
            proc = self.proxied
        if proc is None:
            return None
        proc.signal(signal.SIGCONT)
        proc.signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    # -- views and commands ---------------------------------------------------------------

    def ps(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = request(self.run_dir, {"cmd": "ps"}, timeout=5.0)["slots"]
        return rows

    def status(self) -> dict[str, Any]:
        assert self.client is not None
        with self._client_lock:
            return collect(self.client, KEYS)

    def reconnect(self) -> None:
        """A fresh harness client: after members restarted, the old one's channel may sit
        in gRPC's reconnect backoff for seconds, and the harness must not measure that."""
        with self._client_lock:
            old, self.client = self.client, Etcd(endpoints_of(self.etcd), timeout=2.0)
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()

    def fleet_command(self, args: Sequence[str], timeout: float = 60.0) -> None:
        """`fleet ARGS`; scale and restart return at once (the faults do their own waiting)."""
        argv = [*args, "--no-wait"] if args[0] in ("scale", "restart") else list(args)
        proc = self.spawner(argv, env=CLEAN_ENV, name=args[0])
        rc = proc.wait(timeout=timeout)
        if rc != 0:
            raise RuntimeError(f"fleet {' '.join(args)} exited {rc}: {proc.log().strip()}")

    def live_keys(self) -> list[str]:
        assert self.client is not None
        with self._client_lock:
            kvs = self.client.get_prefix(KEYS.root).kvs
        prefixes = (KEYS.members, KEYS.owners, KEYS.election)
        return [kv.key for kv in kvs if kv.key.startswith(prefixes)]

    def checkpoints(self) -> dict[int, Any]:
        assert self.client is not None
        with self._client_lock:
            kvs = self.client.get_prefix(KEYS.checkpoints).kvs
        found: dict[int, Any] = {}
        for kv in kvs:
            segment = KEYS.segment_of(kv.key)
            if segment is not None:
                found[segment] = json.loads(kv.value)
        return found

    def logs_text(self) -> dict[str, str]:
        return {
            p.name: p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(self.logs.glob("*.log"))
        }

    # -- teardown -------------------------------------------------------------------------

    def kill_everything(self) -> None:
        """Last resort, always run: nothing we started survives the run."""
        self.keep_proxied.clear()
        with contextlib.suppress(Exception):
            self.spawner.kill_all()
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.stop()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        with contextlib.suppress(Exception):
            self.etcd.kill()


class LedgerTail:
    """Reads the start lines appended to every ledger since the last poll."""

    def __init__(self, ledger_dir: Path) -> None:
        self.dir = ledger_dir
        self._offsets: dict[Path, int] = {}

    def starts(self) -> list[dict[str, Any]]:
        """Start lines of handler calls (not hooks, not child lines)."""
        found = []
        for path in sorted(self.dir.glob("*.jsonl")):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
            complete = data.rfind(b"\n") + 1  # a line being written waits for the next poll
            self._offsets[path] = offset + complete
            for line in data[:complete].splitlines():
                if b'"start"' not in line or b'"kind"' in line:
                    continue  # cheap: a 10-minute run's ledgers hold ~500,000 lines
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("ev") == "start" and not rec.get("kind"):
                    found.append(rec)
        return found


# -- phases -------------------------------------------------------------------------------


def heal_all(cluster: Cluster, injector: Injector, say: Callable[[str], None]) -> list[str]:
    """Undo whatever a fault may have left: cut, stopped processes, hang files, etcd, scale."""
    actions = []
    if cluster.proxy is not None and cluster.proxy.is_cut:
        cluster.proxy.heal()
        actions.append("healed the proxy")
    if cluster.proxy is not None and any(p.is_slow for p in proxies_of(cluster.proxy)):
        cluster.proxy.heal()
        actions.append("healed the slow proxy")
    if injector.stopped:
        actions.append(f"continued {len(injector.stopped)} stopped processes")
    injector.continue_all()
    for directory in cluster.trigger_dirs:
        for path in directory.iterdir():
            path.unlink(missing_ok=True)
            actions.append(f"removed {directory.name} file {path.name}")
    if isinstance(cluster.etcd, ClusterEtcd):
        actions.extend(cluster.etcd.heal())
    elif not cluster.etcd.running:
        cluster.etcd.start(timeout=30.0)
        actions.append("restarted etcd")
    rows = cluster.ps()
    if len(rows) != cluster.workers:
        cluster.fleet_command(["scale", str(cluster.workers)])
        actions.append(f"scaled back to {cluster.workers}")
    for action in actions:
        say(f"heal: {action}")
    return actions


def wait_recovery(cluster: Cluster, since: float, bound: float) -> dict[str, Any]:
    """Time until every segment is owned and has a call that started after `since`."""
    segments = cluster.opts.segments
    tail = LedgerTail(cluster.ledger_dir)
    first_start: dict[int, float] = {}
    owned_at: float | None = None
    give_up = since + bound + 30.0
    status_errors = 0
    slowest_status = 0.0
    while True:
        # Ownership first: the first ledger read of a long run parses hundreds of
        # thousands of lines, and must not delay when ownership is seen (it did: 16.6 s).
        if owned_at is None:
            asked = time.monotonic()
            try:
                st = cluster.status()
            except Exception:
                status_errors += 1
                cluster.reconnect()
            else:
                if not st["unowned"] and st["segments"] == segments:
                    owned_at = time.monotonic()
            took = time.monotonic() - asked
            slowest_status = max(slowest_status, took)
            if owned_at is None and took > 1.0:
                cluster.reconnect()
        for rec in tail.starts():
            seg, t = int(rec["segment"]), float(rec["t"])
            if t > since and seg not in first_start:
                first_start[seg] = t
        if owned_at is not None and len(first_start) == segments:
            break
        if time.monotonic() >= give_up:
            break
        time.sleep(0.05)
    processed_at = max(first_start.values()) if len(first_start) == segments else None
    seconds = None
    if processed_at is not None and owned_at is not None:
        seconds = max(processed_at, owned_at) - since
    return {
        "bound_seconds": bound,
        "seconds": round(seconds, 3) if seconds is not None else None,
        "owned_after": round(owned_at - since, 3) if owned_at is not None else None,
        "processed_after": round(processed_at - since, 3) if processed_at is not None else None,
        "slowest_segment": (
            max(first_start, key=lambda s: first_start[s]) if processed_at is not None else None
        ),
        "not_processed": sorted(set(range(segments)) - set(first_start)),
        "status_errors": status_errors,
        "slowest_status_seconds": round(slowest_status, 3),
        "within_bound": seconds is not None and seconds <= bound,
    }


def wait_whole(cluster: Cluster, since: float, cap: float) -> dict[str, Any]:
    """Informational: when are all W slots READY and the fleet converged again?

    A slot in BACKOFF comes back after its respawn delay; one parked in FATAL (5 fast
    exits in 60 s) only after a 5 min cool-down, which this does not wait for.
    """
    rows = cluster.ps()
    backoff = [r["next_start_in"] or 0.0 for r in rows if r["state"] == "BACKOFF"]
    fatal = [r["slot"] for r in rows if r["state"] == "FATAL"]
    wait_for = min(cap, max([0.0, *backoff]) + 15.0)
    deadline = time.monotonic() + wait_for
    result: dict[str, Any] = {
        "respawn_backoff_seconds": max([0.0, *backoff]),
        "fatal_slots": fatal,
        "converged_after": None,
    }
    while not fatal and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            rows = cluster.ps()
            if len(rows) == cluster.workers and all(r["state"] == "READY" for r in rows):
                members = [r["member"] for r in rows] + [PROXIED]
                if cluster.proxied_pid() is not None and converged(cluster.status(), members):
                    result["converged_after"] = round(time.monotonic() - since, 3)
                    break
        time.sleep(0.1)
    result["slots"] = [
        {k: r[k] for k in ("slot", "state", "restarts", "last_exit", "fatal_reason")} for r in rows
    ]
    return result


def shut_down(cluster: Cluster, say: Callable[[str], None]) -> dict[str, Any]:
    """`fleet down`, SIGTERM the proxied worker, then look for leftovers."""
    result: dict[str, Any] = {}
    started = time.monotonic()
    assert cluster.up is not None
    cluster.fleet_command(["down"], timeout=120.0)
    result["fleet_down_seconds"] = round(time.monotonic() - started, 3)
    result["fleet_up_exit"] = cluster.up.wait(timeout=30.0)
    started = time.monotonic()
    result["proxied_exit"] = cluster.stop_proxied()
    result["proxied_stop_seconds"] = round(time.monotonic() - started, 3)
    left = tagged_processes(cluster.spawner.tag, since=0.0)
    result["leftover_processes"] = [_describe(p) for p in left]
    keys = cluster.live_keys()
    result["leftover_keys"] = keys
    if keys:
        # Say whether they would have gone by themselves (lease expiry) or are stuck.
        time.sleep(cluster.opts.lease_ttl + 2.0)
        result["leftover_keys_after_ttl"] = cluster.live_keys()
    say(
        f"down in {result['fleet_down_seconds']:.1f} s (fleet up exit {result['fleet_up_exit']}), "
        f"proxied exit {result['proxied_exit']}; {len(left)} processes and {len(keys)} "
        f"live keys left"
    )
    return result


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]} ({proc.status()})"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def faults_by_kind(
    records: Sequence[FaultRecord], t0: float, kinds: Sequence[str] = KINDS
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in kinds:
        # Injected: begun and not given up (a fault that found nothing to act on counts
        # only as skipped).
        done = [r for r in records if r.kind == kind and r.start is not None and not r.skipped]
        out[kind] = {
            "count": len(done),
            "times": [
                [round(r.start - t0, 3), round((r.end or r.start) - t0, 3)]  # type: ignore[operator]
                for r in done
            ],
            "skipped": sum(1 for r in records if r.kind == kind and r.skipped),
            "errors": sum(1 for r in records if r.kind == kind and r.error),
        }
    return out


# -- the run ------------------------------------------------------------------------------


def run_chaos(opts: Options, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one chaos experiment; returns the summary (``summary["pass"]``)."""
    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 31)
    opts.seed = seed
    clock = Stopwatch()

    def progress(text: str) -> None:
        if not opts.quiet:
            say(f"[{clock():6.1f}s] {text}")

    work = opts.work_dir or Path(tempfile.mkdtemp(prefix=f"fleet-chaos-{seed}-"))
    work.mkdir(parents=True, exist_ok=True)
    out = opts.out or Path(tempfile.gettempdir()) / "fleet-chaos"
    say(f"chaos seed {seed} (replay: python -m tests.chaos.run --seed {seed} "
        f"--duration {opts.duration:g}{' --cluster' if opts.cluster else ''}"
        f"{' --kinds ' + ','.join(opts.kinds) if opts.kinds else ''}); work dir {work}")  # fmt: skip
    summary: dict[str, Any] = {
        "seed": seed,
        "duration": opts.duration,
        "workers": opts.workers,
        "segments": opts.segments,
        "lease_ttl": opts.lease_ttl,
        "cluster": opts.cluster,
        "host": socket.gethostname(),
        "started_wall": time.time(),
        "work_dir": str(work),
        "failures": [],
    }
    failures: list[str] = summary["failures"]
    cluster = Cluster(opts, work, progress)
    kinds = opts.kinds or kinds_for(opts.cluster)
    summary["kinds"] = list(opts.kinds) if opts.kinds else None
    plan = make_plan(
        random.Random(seed), opts.duration, lease_ttl=opts.lease_ttl, workers=opts.workers,
        kinds=kinds,
    )  # fmt: skip
    injector = Injector(cluster, plan, lease_ttl=opts.lease_ttl, say=progress)
    summary["plan"] = [
        {"index": p.index, "at": p.at, "kind": p.kind, "guaranteed": p.guaranteed} for p in plan
    ]
    try:
        summary["etcd"] = etcd_version(cluster.etcd.command()[0])
        cluster.start()
        progress(f"fleet of {opts.workers} + proxied converged; {len(plan)} faults planned")

        # -- faults
        summary["fault_phase_start_wall"] = time.time()
        try:
            injector.run()
        finally:
            summary["faults"] = [r.as_dict() for r in injector.records]
        fault_t0 = injector.t0
        faults_end = max([r.end for r in injector.records if r.end] + [time.monotonic()])
        summary["fault_phase_seconds"] = round(faults_end - fault_t0, 3)
        summary["faults_by_kind"] = faults_by_kind(injector.records, fault_t0, kinds)
        missing = [k for k in kinds if summary["faults_by_kind"][k]["count"] == 0]
        if missing:
            failures.append(f"fault kinds never injected: {missing}")
        errors = [f"#{r.index} {r.kind}: {r.error}" for r in injector.records if r.error]
        if errors:
            failures.append(f"fault injection errors: {errors}")
        cluster.assert_up_alive()

        # -- heal and recover
        summary["healed"] = heal_all(cluster, injector, progress)
        since = time.monotonic()
        bound = opts.lease_ttl + RECOVERY_SLACK
        recovery = wait_recovery(cluster, since, bound)
        summary["recovery"] = recovery
        progress(
            f"recovery: owned after {recovery['owned_after']} s, every segment processed "
            f"after {recovery['processed_after']} s (bound {bound:g} s)"
        )
        if not recovery["within_bound"]:
            failures.append(
                f"recovery took {recovery['seconds']} s > TTL + {RECOVERY_SLACK:g} = {bound:g} s "
                f"(owned after {recovery['owned_after']}, processed after "
                f"{recovery['processed_after']}, not processed: {recovery['not_processed']})"
            )
        summary["whole"] = wait_whole(cluster, since, cap=45.0)
        progress(f"fleet whole again after {summary['whole']['converged_after']} s")

        # -- stop and look for leftovers
        shutdown = shut_down(cluster, progress)
        summary["shutdown"] = shutdown
        if shutdown["fleet_up_exit"] != 0:
            failures.append(f"fleet up exited {shutdown['fleet_up_exit']} after fleet down")
        if shutdown["proxied_exit"] != 0:
            failures.append(f"proxied worker exited {shutdown['proxied_exit']} on SIGTERM")
        if shutdown["leftover_processes"]:
            failures.append(f"processes left after fleet down: {shutdown['leftover_processes']}")
        if shutdown["leftover_keys"]:
            failures.append(f"live keys left after fleet down: {shutdown['leftover_keys']}")

        # -- the history
        checkpoints = cluster.checkpoints()
        summary["final_checkpoints"] = {str(k): v for k, v in sorted(checkpoints.items())}
        cluster.etcd.stop()
        pauses = injected_pauses(injector.records)
        grace = safety_margin(opts.lease_ttl) / 2 + PAUSE_SLACK
        excused: list[Any] = []
        violations = check(
            cluster.ledger_dir, checkpoints, segments=opts.segments, pauses=pauses,
            grace=grace, excused=excused,
        )  # fmt: skip
        calls = load_calls(cluster.ledger_dir)
        summary["calls"] = summarize(calls)
        summary["pause_grace_seconds"] = grace
        summary["excused_overlaps"] = [{"segment": v.segment, "detail": v.detail} for v in excused]
        summary["hung_calls"] = _count_hung(cluster.ledger_dir)
        summary["hook_faults"] = hook_fault_outcomes(injector.records)
        summary["violations"] = [
            {"kind": v.kind, "segment": v.segment, "detail": v.detail} for v in violations
        ]
        if violations:
            kinds = Counter(v.kind for v in violations)
            failures.append(f"{len(violations)} history violations: {dict(kinds)}")
        logs = cluster.logs_text()
        up_log = logs.get("up.log", "")
        kills = watchdog_kills(logs, cluster.ledger_dir, _day_start(summary["started_wall"]))
        summary["watchdog_kills"] = kills
        summary["events"] = {
            "watchdog_kills": len(kills),
            "watchdog_kills_of_normal_calls": sum(1 for k in kills if not k["hung_call"]),
            "proxied_exits": cluster.proxied_exits,
            "supervisor_respawns": up_log.count("; respawn in "),
            "supervisor_fatal": up_log.count("; FATAL: "),
            "supervisor_hung_kills": up_log.count(": killing it"),
            "tracebacks": {n: t.count("Traceback") for n, t in logs.items() if "Traceback" in t},
        }
        if opts.cluster:
            summary["cluster_outcomes"] = clusterreport.outcomes(
                injector.records, cluster.ledger_dir, logs, _day_start(summary["started_wall"])
            )
            failures.extend(clusterreport.failures(summary))
        if cluster.proxy is not None:
            summary["proxy"] = vars(cluster.proxy.stats)
    except BaseException as exc:
        failures.append(f"run aborted: {type(exc).__name__}: {exc}")
        if not isinstance(exc, Exception):
            raise
    finally:
        injector.abort()
        cluster.kill_everything()
        summary["pass"] = not failures
        summary["elapsed_seconds"] = round(clock(), 3)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"chaos-{seed}.json"
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        summary["json_path"] = str(path)
        if summary["pass"] and not opts.keep and opts.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return summary


WATCHDOG_RE = re.compile(
    r"(\d\d):(\d\d):(\d\d)\.(\d+) (\S+) CRITICAL segment (\d+): handler still running "
    r"([\d.]+)s past the lease deadline"
)
# The watchdog's one non-blocking line (no time stamp, no member id; in up.log it has the
# supervisor's "w<slot> | " prefix).
WATCHDOG_RAW_RE = re.compile(
    r"^(?:w(\d+) \| )?fleet: segment (\d+): (\w+) still running ([\d.]+)s past the lease "
    r"deadline",
    re.MULTILINE,
)


def injected_pauses(records: Sequence[FaultRecord]) -> dict[int, list[tuple[float, float]]]:
    """pid -> [(stopped_at, continued_at)] of every SIGSTOP that was followed by SIGCONT."""
    pauses: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        d = r.detail
        if "stopped_at" in d and "continued_at" in d and "pid" in d:
            pauses.setdefault(int(d["pid"]), []).append(
                (float(d["stopped_at"]), float(d["continued_at"]))
            )
    return pauses


def hook_fault_outcomes(records: Sequence[FaultRecord]) -> dict[str, Any]:
    """What became of the processes stopped inside hooks and of killed workers' children."""
    stops = [r.detail for r in records if r.kind == "sigstop_in_hook" and "stopped_at" in r.detail]
    kills = [r.detail for r in records if r.kind == "child_work" and "children" in r.detail]
    after = [float(d["hook_ran_after_cont"]) for d in stops if "hook_ran_after_cont" in d]
    orphans = [float(t) for d in kills for t in d.get("children_outlived_worker_by", [])]
    return {
        "stopped_in_hook": len(stops),
        "resumed": sum(1 for d in stops if d.get("resumed")),
        "died": sum(1 for d in stops if not d.get("hook_ended")),
        "hook_ended": len(after),
        "longest_after_cont": max(after, default=None),
        "children": sum(int(d["children"]) for d in kills),
        "longest_orphan": max(orphans, default=None),
        "children_still_alive": sum(int(d.get("children_still_alive", 0)) for d in kills),
    }


def _unterminated(ledger_dir: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Start lines (calls and hooks) without an end line, by (member, segment)."""
    unterminated: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for path in sorted(ledger_dir.glob("*.jsonl")):
        open_starts: dict[tuple[int, int, str], dict[str, Any]] = {}
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec["ev"] not in ("start", "end"):
                    continue  # a child process's line
                key = (int(rec["segment"]), int(rec["token"]), str(rec.get("kind") or "call"))
                if rec["ev"] == "start":
                    open_starts[key] = rec
                else:
                    open_starts.pop(key, None)
        for rec in open_starts.values():
            unterminated.setdefault((rec["member"], int(rec["segment"])), []).append(rec)
    return unterminated


def _expected_kill(call: dict[str, Any] | None) -> bool:
    """A call the watchdog is meant to kill: hung on purpose, or a slow hook."""
    return bool(call and (call.get("hang") or call.get("slow")))


def watchdog_kills(
    logs: dict[str, str], ledger_dir: Path, day_start: float
) -> list[dict[str, Any]]:
    """Every watchdog exit in the logs, with the call it killed: was it a hung one?

    A hung call (FLEET_TEST_HANG_DIR) or a slow hook is what the watchdog is for; a call
    of the normal 0.05 s handler killed past its deadline would mean the worker itself (a
    commit retried past the deadline, say) kept a call running too long.
    """
    unterminated = _unterminated(ledger_dir)
    kills = []
    for name, text in sorted(logs.items()):
        for m in WATCHDOG_RE.finditer(text):
            hh, mm, ss, frac, member, segment = m.groups()[:6]
            wall = day_start + int(hh) * 3600 + int(mm) * 60 + int(ss) + float(f"0.{frac}")
            candidates = [
                r for r in unterminated.get((member, int(segment)), []) if r["wall"] <= wall
            ]
            call = max(candidates, key=lambda r: r["wall"], default=None)
            kills.append(
                {
                    "log": name,
                    "member": member,
                    "segment": int(segment),
                    "past_deadline": float(m.group(7)),
                    "wall": round(wall, 3),
                    "call_pid": call["pid"] if call else None,
                    "hung_call": _expected_kill(call),
                    "call_age": round(wall - call["wall"], 3) if call else None,
                }
            )
        for m in WATCHDOG_RAW_RE.finditer(text):
            slot, segment, what, past = m.groups()
            if slot is not None:
                member = f"{socket.gethostname()}-{slot}"
            else:
                member = PROXIED if name.startswith(PROXIED) else name.removesuffix(".log")
            kind = "call" if what == "handle" else what
            candidates = [
                r
                for r in unterminated.get((member, int(segment)), [])
                if str(r.get("kind") or "call") == kind
            ]
            call = max(candidates, key=lambda r: r["wall"], default=None)
            kills.append(
                {
                    "log": name,
                    "member": member,
                    "segment": int(segment),
                    "what": what,
                    "past_deadline": float(past),
                    "call_pid": call["pid"] if call else None,
                    "hung_call": _expected_kill(call),
                }
            )
    return kills


def _day_start(wall: float) -> float:
    """Epoch time of the local midnight before `wall` (log lines carry local H:M:S)."""
    t = time.localtime(wall)
    return wall - (t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec) - (wall % 1)


def etcd_version(binary: str) -> dict[str, str]:
    """Which etcd the run used (3.5.0-3.5.2 can lose acknowledged writes when killed)."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        out = f"etcd Version: unknown ({exc})"
    found = re.search(r"etcd Version: (\S+)", out)
    return {"binary": binary, "version": found.group(1) if found else "unknown"}


def _count_hung(ledger_dir: Path) -> int:
    count = 0
    for path in ledger_dir.glob("*.jsonl"):
        with path.open(encoding="utf-8", errors="replace") as fh:
            count += sum(1 for line in fh if '"hang"' in line)
    return count


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)

    def on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        summary = run_chaos(opts, say=lambda text: print(text, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print(f"chaos seed {opts.seed}: interrupted; everything started was stopped",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if opts.json:
        print(json.dumps(summary, indent=2, default=str))
    print(render(summary), flush=True)
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
