"""Benchmark: kill -9 failover and recovery under the `fleet up` supervisor.

Runs ``python -m fleet up`` (demo handler, embedded etcd on a free port) in a fresh
temporary directory, exactly as a user would, and measures:

* **cold start** (once, first): spawning ``fleet up`` -> its summary line
  ``N/N workers ready, S/S segments owned, leader ..., X s`` appears in its output
  (the X the supervisor prints is recorded too);
* **kill -9 failover** (every round): SIGKILL one READY worker, chosen at random
  (seeded) -> every segment it owned is owned by another member. The supervisor reaps
  the child and revokes its lease at once, so this is not bound by the lease TTL;
* **recovery** (every round): the same SIGKILL -> converged again: every slot READY,
  the respawned worker registered, every segment owned by its assigned member, nothing
  moving, balanced. Split into the supervisor's respawn (kill -> new pid in
  ``fleet ps``, which includes its backoff) and the new worker's start-up.

The fleet is read in-process the way ``fleet status --json`` and ``fleet ps --json``
do: ``fleet.coord.status.collect`` over the etcd in ``.fleet/fleet.json``, and the ``ps``
request on the control socket; while a failover is under way, by the owners and members
part of ``collect`` only (one etcd read, every ~5 ms: ``collect`` adds a lease query per
member and takes several times as long). Every observation is stamped with the send time
of the first read showing it, so the read period (reported) is the resolution.

Writes ``<out>/failover.json`` (parameters, machine, raw numbers, summary) and
``<out>/failover.md`` (the summary table and the command). A benchmark, not a test: it
fails only if a step never completes, never because something is slow. Whatever
happens (a failed step, Ctrl-C, SIGTERM), the fleet is stopped with ``fleet down``,
anything left is killed, and the script fails if any of it is still running.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

# First: it puts this checkout on sys.path, so that the fleet measured is this one.
from common import (
    REPO_ROOT,
    BenchError,
    CpuMeter,
    Status,
    add_out_argument,
    alive,
    bench_parser,
    cell,
    check_fleet_args,
    describe,
    fail_on_leftovers,
    ignore_stop_signals,
    kill_all,
    machine,
    machine_line,
    ms,
    period_summary,
    publish,
    stop_on_signals,
    summarize,
    summary_table,
    tagged_processes,
    tail,
)

from fleet.coord.etcd import Etcd, EtcdError
from fleet.coord.keys import Keys
from fleet.coord.status import collect
from fleet.coord.view import FleetView
from fleet.supervise.control import ControlError, RunDir, request
from fleet.supervise.slots import RespawnPolicy

Row = dict[str, Any]

# Every process we start inherits this variable, so the final leak check finds even a
# process that left `fleet up`'s process group (workers and etcd run in their own
# sessions) or was re-parented.
TAG_ENV = "FLEET_FAILOVER_BENCH_TAG"
HANDLER = "fleet.demo:handle"
INTERVAL = "0.5"
FAILOVER_POLL = 0.005  # target period of status reads while a failover is under way ...
RECOVERY_POLL = 0.02  # ... and while waiting seconds for a respawn (spare the 2 CPUs)
POLL_MIN_SLEEP = 0.001  # always leave the CPUs to the fleet for a moment
STEP_TIMEOUT = 120.0  # cold start, convergence, recovery (respawn backoff caps at 30 s)
SUMMARY_WAIT = 10.0  # how long the supervisor's summary line may lag our own observation
DOWN_TIMEOUT = 90.0  # `fleet down`: graceful_timeout (30 s) plus margin
OUTPUT_TAIL_LINES = 40
QUANTILES = (("median", 0.5), ("p90", 0.9), ("p99", 0.99))
SUMMARY = re.compile(
    r"fleet \| (?P<ready>\d+)/(?P<workers>\d+) workers ready, "
    r"(?P<owned>\d+)/(?P<segments>\d+) segments owned, leader (?P<leader>\S+), "
    r"(?P<took>[\d.]+) s\s*$"
)


@dataclass(frozen=True)
class Options:
    workers: int
    segments: int
    kills: int
    lease_ttl: int
    seed: int
    out: Path


@dataclass
class Read:
    """One observation: the status (and optionally the slots), stamped at its send time."""

    sent: float  # monotonic
    status: Status
    slots: list[Row] | None = None


# -- reading the fleet ------------------------------------------------------------------


def members_by_id(st: Status) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in st["members"]}


def taken_over(st: Status, victim: str, segments: Sequence[int]) -> bool:
    """Every segment in `segments` is owned by a member other than `victim`."""
    owners = {s["segment"]: s["owner"] for s in st["segment_owners"]}
    return all(owners.get(seg) not in (None, victim) for seg in segments)


def converged(read: Read, workers: int, segments: int) -> bool:
    """Every slot READY and registered under its own pid; every segment with its assigned
    member, nothing moving, balanced (right after a join nothing is `moving` yet, but the
    newcomer owns nothing)."""
    rows, st = read.slots, read.status
    if rows is None or len(rows) != workers or any(r["state"] != "READY" for r in rows):
        return False
    members = members_by_id(st)
    if set(members) != {r["member"] for r in rows}:
        return False
    if any(members[r["member"]]["pid"] != r["pid"] for r in rows):
        return False
    if st["segments"] != segments or st["unowned"] or st["moving"] or st["leader"] is None:
        return False
    sizes = [len(m["owned"]) for m in members.values()]
    return max(sizes) - min(sizes) <= 1


def quick_status(etcd: Etcd, keys: Keys) -> Status:
    """The part of `collect` a failover needs, from its one consistent read of the fleet.

    `collect` adds one lease TTL query per member: on a busy 2-CPU machine that makes a
    read take about 6 times as long (about 17 ms instead of 3), too coarse to time a
    failover that takes a few hundred milliseconds.
    """
    view = FleetView.from_snapshot(keys, etcd.get_prefix(keys.root))
    owners = view.owners()
    leader = view.leader()
    members = [{"id": m.id, "pid": m.info.get("pid")} for m in view.members().values()]
    return {
        "leader": leader.value.decode() if leader else None,
        "members": members,
        "segment_owners": [
            {"segment": seg, "owner": owners[seg].member if seg in owners else None}
            for seg in range(view.segments() or 0)
        ],
    }


def brief(read: Read | None) -> str:
    """One line about the last observation, for error messages."""
    if read is None:
        return "(nothing read yet)"
    st = read.status
    if "moving" not in st:  # a quick_status
        owners = [s["owner"] for s in st["segment_owners"]]
        owned = {m["id"]: owners.count(m["id"]) for m in st["members"]}
        return f"leader {st['leader']}, owned per member {owned}, unowned {owners.count(None)}"
    owned = {m["id"]: len(m["owned"]) for m in st["members"]}
    text = (
        f"leader {st['leader']}, generation {st['generation']}, owned per member {owned}, "
        f"unowned {st['unowned']}, moving {st['moving']}"
    )
    if read.slots is not None:
        text += "; slots " + ", ".join(
            f"w{r['slot']} {r['state']} pid {r['pid']}" for r in read.slots
        )
    return text


# -- the fleet under test ---------------------------------------------------------------


@dataclass
class Summary:
    """One summary line of `fleet up`, stamped when this script first saw it."""

    seen: float  # monotonic
    took_s: float
    leader: str
    line: str


@dataclass
class FleetUp:
    """`python -m fleet up` in `cwd`, its output file, and readers of its state."""

    cwd: Path
    opts: Options
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    popen: subprocess.Popen[bytes] | None = None
    client: Etcd | None = None
    summaries: list[Summary] = field(default_factory=list)
    periods: dict[str, list[float]] = field(default_factory=dict)
    keys: Keys = field(default_factory=lambda: Keys("/fleet", "default"))
    _offset: int = 0
    _partial: bytes = b""

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.cwd / ".fleet")

    @property
    def out_path(self) -> Path:
        return self.cwd / "fleet-up.out"

    def env(self) -> dict[str, str]:
        # No FLEET_* of the caller's (say FLEET_ETCD, which would skip the embedded etcd).
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update({"FLEET_EMBEDDED_PORT": "0", "PYTHONPATH": str(REPO_ROOT), TAG_ENV: self.tag})
        return env

    def command(self) -> list[str]:
        o = self.opts
        return [
            sys.executable, "-m", "fleet", "up",
            "--workers", str(o.workers),
            "--segments", str(o.segments),
            "--lease-ttl", str(o.lease_ttl),
            "--interval", INTERVAL,
            "--handler", HANDLER,
        ]  # fmt: skip

    def start(self) -> float:
        """Spawn `fleet up`; the monotonic time just before."""
        with self.out_path.open("wb") as out:
            t0 = time.monotonic()
            self.popen = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env(),
                start_new_session=True,
            )
        return t0

    def check_alive(self) -> None:
        assert self.popen is not None
        code = self.popen.poll()
        if code is not None:
            raise BenchError(
                f"fleet up (pid {self.popen.pid}) exited unexpectedly with status {code}; "
                f"output tail:\n{tail(self.out_path, OUTPUT_TAIL_LINES)}"
            )

    def pump(self) -> None:
        """Read the new lines of `fleet up`'s output; keep its summary lines."""
        try:
            with self.out_path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return
        if not data:
            return
        seen = time.monotonic()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            match = SUMMARY.search(line)
            if match:
                self.summaries.append(
                    Summary(seen, float(match["took"]), match["leader"], line.strip())
                )

    def summary_after(self, t: float, timeout: float) -> Summary | None:
        """The first summary line seen after `t`, waiting up to `timeout` for it."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            found = next((s for s in self.summaries if s.seen > t), None)
            if found is not None or time.monotonic() >= deadline:
                return found
            self.check_alive()
            time.sleep(RECOVERY_POLL)

    def connect(self, timeout: float = STEP_TIMEOUT) -> str:
        """Wait for `.fleet/fleet.json`; connect to the etcd it names; that endpoint."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(self.run_dir.info_file.read_text())
                endpoint = str(info["etcd"][0])
                self.client = Etcd([endpoint], timeout=3.0)
                return endpoint
            if time.monotonic() >= deadline:
                raise BenchError(f"no {self.run_dir.info_file} within {timeout:.0f} s")
            time.sleep(RECOVERY_POLL)

    def slots(self) -> list[Row]:
        rows: list[Row] = request(self.run_dir, {"cmd": "ps"})["slots"]
        return rows

    def wait_for(
        self,
        what: str,
        done: Callable[[Read], bool],
        *,
        with_slots: bool,
        period: float,
        quick: bool = False,
        timeout: float = STEP_TIMEOUT,
        observe: Callable[[Read], None] | None = None,
    ) -> tuple[Read, float | None]:
        """Poll until `done(read)`; that read, and the send time of the read before it.

        A status read (`quick_status` if `quick`, else `collect`) is sent first and stamps
        the observation; the slots (if wanted) are asked right after. `observe` sees every
        successful read (to stamp events on the way). Read periods are kept under `what`'s
        first word.
        """
        assert self.client is not None
        deadline = time.monotonic() + timeout
        last: Read | None = None
        error = ""
        previous: float | None = None
        periods = self.periods.setdefault(what.split(":")[0], [])
        while True:
            self.check_alive()
            sent = time.monotonic()
            if previous is not None:
                periods.append(sent - previous)
            try:
                read_status = quick_status if quick else collect
                read = Read(sent, read_status(self.client, self.keys))
                if with_slots:
                    read.slots = self.slots()
            except (EtcdError, ControlError) as exc:
                error = f"; last error: {exc}"
            else:
                last = read
                if observe is not None:
                    observe(read)
                if done(read):
                    return read, previous
            previous = sent
            if time.monotonic() >= deadline:
                raise BenchError(
                    f"{what}: not reached within {timeout:.0f} s; {brief(last)}{error}"
                )
            time.sleep(max(POLL_MIN_SLEEP, period - (time.monotonic() - sent)))

    # -- stopping ---------------------------------------------------------------------

    def known(self) -> list[psutil.Process]:
        """Everything of the fleet we know of: `fleet up`, its descendants, tagged ones."""
        procs: dict[int, psutil.Process] = {p.pid: p for p in tagged_processes(TAG_ENV, self.tag)}
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(psutil.Error):
                up = psutil.Process(self.popen.pid)
                procs[up.pid] = up
                for child in up.children(recursive=True):
                    procs[child.pid] = child
        return list(procs.values())

    def leftovers(self) -> list[str]:
        found = []
        for proc in self.known():
            with contextlib.suppress(psutil.Error):
                if alive(proc):
                    found.append(describe(proc))
        return sorted(found)

    def stop(self) -> dict[str, Any]:
        """`fleet down`, then SIGKILL whatever is left; what happened."""
        result: dict[str, Any] = {"down_exit": None, "down_ms": None, "killed": []}
        if self.client is not None:
            self.client.close()
            self.client = None
        before = self.known()
        if self.popen is not None and self.popen.poll() is None:
            t0 = time.monotonic()
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "fleet", "down"],
                    cwd=self.cwd,
                    env=self.env(),
                    capture_output=True,
                    text=True,
                    timeout=DOWN_TIMEOUT,
                    check=False,
                )
                result["down_exit"] = done.returncode
                if done.returncode != 0:
                    result["down_error"] = (done.stderr or done.stdout).strip()
            except subprocess.TimeoutExpired:
                result["down_exit"] = "timeout"
            if result["down_exit"] == 0:  # it returns once `fleet up` has exited
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=10)
            result["down_ms"] = ms(time.monotonic() - t0)
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            result["killed"].append(f"process group {self.popen.pid}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)
        strays = [p for p in {*before, *self.known()} if alive(p)]
        result["killed"] += [f"pid {proc.pid}" for proc in strays]
        kill_all(strays)
        if self.popen is not None:
            result["up_exit"] = self.popen.poll()
        return result


# -- the measurements -------------------------------------------------------------------


def cold_start(fleet: FleetUp) -> dict[str, Any]:
    t0 = fleet.start()
    endpoint = fleet.connect()
    t_etcd = time.monotonic()
    deadline = t0 + STEP_TIMEOUT
    while not fleet.summaries:
        fleet.check_alive()
        if time.monotonic() >= deadline:
            raise BenchError(
                f"cold start: no summary line within {STEP_TIMEOUT:.0f} s; output tail:\n"
                f"{tail(fleet.out_path, OUTPUT_TAIL_LINES)}"
            )
        time.sleep(FAILOVER_POLL)
        fleet.pump()
    first = fleet.summaries[0]
    return {
        "etcd": endpoint,
        "fleet_json_ms": ms(t_etcd - t0),
        "summary_line_ms": ms(first.seen - t0),
        "supervisor_reported_s": first.took_s,
        "summary_line": first.line,
    }


@dataclass
class Victims:
    """Seeded choice of a READY slot that the kill cannot park in FATAL.

    The supervisor marks a slot FATAL (retried after 5 minutes) on its `crash_limit`-th
    exit within `crash_window` seconds; a slot already killed `crash_limit - 1` times in
    that window is not eligible (otherwise one unlucky run would wait 5 minutes).
    """

    rng: random.Random
    policy: RespawnPolicy = field(default_factory=RespawnPolicy)
    kills: dict[int, list[float]] = field(default_factory=dict)

    def pick(self, rows: Sequence[Row], now: float) -> tuple[Row, list[int]]:
        ready = sorted((r for r in rows if r["state"] == "READY"), key=lambda r: r["slot"])
        excluded = [r["slot"] for r in ready if self.recent(r["slot"], now) >= self.limit]
        eligible = [r for r in ready if r["slot"] not in excluded]
        if not eligible:
            raise BenchError(f"no READY slot may be killed now (excluded {excluded})")
        row = self.rng.choice(eligible)
        self.kills.setdefault(row["slot"], []).append(now)
        return row, excluded

    @property
    def limit(self) -> int:
        return self.policy.crash_limit - 1

    def recent(self, slot: int, now: float) -> int:
        return sum(1 for t in self.kills.get(slot, []) if now - t <= self.policy.crash_window)


def one_round(fleet: FleetUp, victims: Victims, round_no: int) -> dict[str, Any]:
    o = fleet.opts
    settled, _ = fleet.wait_for(
        f"converge: before round {round_no}",
        lambda r: converged(r, o.workers, o.segments),
        with_slots=True,
        period=RECOVERY_POLL,
    )
    assert settled.slots is not None
    row, excluded = victims.pick(settled.slots, time.monotonic())
    victim, pid, slot = str(row["member"]), int(row["pid"]), int(row["slot"])
    owned = list(members_by_id(settled.status)[victim]["owned"])
    was_leader = settled.status["leader"] == victim

    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    stamps: dict[str, float] = {}

    def first(name: str, when: float) -> None:
        stamps.setdefault(name, when)

    def failover_events(read: Read) -> None:
        if victim not in members_by_id(read.status):
            first("member_gone", read.sent)

    done, before = fleet.wait_for(
        f"failover: round {round_no}, {victim}'s {len(owned)} segments taken over",
        lambda r: taken_over(r.status, victim, owned),
        with_slots=False,
        period=FAILOVER_POLL,
        quick=True,
        timeout=3 * o.lease_ttl + STEP_TIMEOUT,  # TTL-bound if the revoke failed
        observe=failover_events,
    )
    t_failover = done.sent
    owners_after = {s["segment"]: s["owner"] for s in done.status["segment_owners"]}
    leader_at_failover = done.status["leader"]

    def recovery_events(read: Read) -> None:
        assert read.slots is not None
        new = next(r for r in read.slots if r["slot"] == slot)
        if new["pid"] not in (None, pid):
            first("respawned", read.sent)
            if new["state"] == "READY":
                first("ready", read.sent)
            member = members_by_id(read.status).get(victim)
            if member is not None and member["pid"] == new["pid"]:
                first("registered", read.sent)

    final, _ = fleet.wait_for(
        f"recovery: round {round_no}, w{slot} respawned and the fleet converged",
        lambda r: converged(r, o.workers, o.segments),
        with_slots=True,
        period=RECOVERY_POLL,
        observe=recovery_events,
    )
    summary = fleet.summary_after(t_kill, SUMMARY_WAIT)
    new_row = next(r for r in final.slots or [] if r["slot"] == slot)

    def since_kill(name: str) -> float | None:
        return ms(stamps[name] - t_kill) if name in stamps else None

    return {
        "round": round_no,
        "slot": slot,
        "victim": victim,
        "pid": pid,
        "victim_was_leader": was_leader,
        "uptime_at_kill_s": row["uptime"],
        "restarts_before": row["restarts"],
        "excluded_slots": excluded,
        "segments": len(owned),
        "failover_ms": ms(t_failover - t_kill),
        "failover_lower_bound_ms": ms(before - t_kill) if before is not None else 0.0,
        "member_gone_ms": since_kill("member_gone"),
        "taken_over_by": sorted({str(owners_after[s]) for s in owned}),
        "leader_at_failover": leader_at_failover,
        "respawned_ms": since_kill("respawned"),
        "ready_ms": since_kill("ready"),
        "registered_ms": since_kill("registered"),
        "recovery_ms": ms(final.sent - t_kill),
        "supervisor_reported_s": summary.took_s if summary else None,
        "summary_line_ms": ms(summary.seen - t_kill) if summary else None,
        "new_pid": new_row["pid"],
        "restarts": new_row["restarts"],
        "last_exit": new_row["last_exit"],
        "leader_after": final.status["leader"],
        "generation_after": final.status["generation"],
    }


def measure(fleet: FleetUp) -> dict[str, Any]:
    raw: dict[str, Any] = {"cold_start": cold_start(fleet), "rounds": []}
    print(f"cold start: {raw['cold_start']}", flush=True)
    victims = Victims(random.Random(fleet.opts.seed))
    for round_no in range(fleet.opts.kills):
        r = one_round(fleet, victims, round_no)
        raw["rounds"].append(r)
        leader = " (leader)" if r["victim_was_leader"] else ""
        print(
            f"round {round_no}: kill -9 {r['victim']}{leader} owning {r['segments']}: "
            f"failover {r['failover_ms']} ms, recovery {r['recovery_ms']} ms "
            f"(respawn {r['respawned_ms']} ms, fleet up says {r['supervisor_reported_s']} s)",
            flush=True,
        )
    return raw


# -- summary and reports ----------------------------------------------------------------


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The smallest value with at least q of all values at or below it (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# (key, label in the table, what is timed)
METRICS: list[tuple[str, str, str]] = [
    ("cold_start", "cold start", "spawn `fleet up` -> its summary line"),
    ("cold_start_reported", "  as printed by fleet up", "the X s of that line"),
    ("failover", "kill -9 failover", "SIGKILL -> all its segments owned by others"),
    ("failover_leader", "  victim was leader", "same, leader killed"),
    ("failover_follower", "  victim not leader", "same, non-leader killed"),
    ("member_gone", "lease revoked", "SIGKILL -> its member key gone"),
    ("respawned", "respawn", "SIGKILL -> new pid in `fleet ps` (incl. backoff)"),
    ("startup", "worker start-up", "new pid -> its member key registered"),
    ("recovery", "recovery", "SIGKILL -> converged, N members, balanced"),
    ("recovery_reported", "  as printed by fleet up", "reap -> summary line (its X s)"),
]


def samples(raw: dict[str, Any]) -> dict[str, list[float | None]]:
    rounds, cold = raw["rounds"], raw["cold_start"]

    def col(key: str, pick: Callable[[dict[str, Any]], bool] = lambda _r: True) -> list[Any]:
        return [r[key] for r in rounds if pick(r)]

    return {
        "cold_start": [cold["summary_line_ms"]],
        "cold_start_reported": [cold["supervisor_reported_s"] * 1000.0],
        "failover": col("failover_ms"),
        "failover_leader": col("failover_ms", lambda r: bool(r["victim_was_leader"])),
        "failover_follower": col("failover_ms", lambda r: not r["victim_was_leader"]),
        "member_gone": col("member_gone_ms"),
        "respawned": col("respawned_ms"),
        "startup": [
            None
            if r["registered_ms"] is None or r["respawned_ms"] is None
            else r["registered_ms"] - r["respawned_ms"]
            for r in rounds
        ],
        "recovery": col("recovery_ms"),
        "recovery_reported": [
            None if v is None else v * 1000.0 for v in col("supervisor_reported_s")
        ],
    }


def render_markdown(report: dict[str, Any]) -> str:
    p, m, raw, cpu = report["parameters"], report["machine"], report["raw"], report["cpu"]
    res = report["poll_period_ms"]
    rounds = raw["rounds"]
    la0, la1 = m["load_average_start"], m["load_average_end"]
    lines = [
        f"# Failover benchmark: fleet up, {p['workers']} workers, {p['segments']} segments",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['finished']}; {machine_line(m)}; load average (1/5/15 min) "
        f"{'/'.join(f'{v:.1f}' for v in la0)} before, {'/'.join(f'{v:.1f}' for v in la1)} "
        f"after; {p['kills']} kills (seed {p['seed']}), lease TTL {p['lease_ttl']} s, "
        f"interval {p['interval']} s, handler `{p['handler']}`.",
        "",
        f"CPU over the {cpu['wall_s']:.0f} s run: {cpu['busy_percent_all']:.0f}% busy in all, "
        f"{cpu['busy_percent_fleet']:.0f}% by the fleet (fleet up, etcd, workers; the "
        "`fleet down` too), "
        f"{cpu['busy_percent_poller']:.0f}% by this script (mostly the status reads).",
        "",
        *summary_table(METRICS, report["summary"], QUANTILES),
    ]
    segs = sorted({r["segments"] for r in rounds})
    stable = p["stable_after_s"]
    backed_off = sum(1 for r in rounds if r["restarts_before"] and r["uptime_at_kill_s"] < stable)
    n = len(rounds)
    leaders = sum(1 for r in rounds if r["victim_was_leader"])
    lines += [
        "",
        "Percentiles are nearest-rank (the smallest sample with at least that share of the "
        f"samples at or below it): with {n} samples p90 is the sample of rank "
        f"{max(1, math.ceil(0.9 * n))} and p99 the one of rank {max(1, math.ceil(0.99 * n))}.",
        f"Resolution: during a failover one read of the fleet's keys every "
        f"{cell(res['failover']['median'])} ms (median; p90 {cell(res['failover']['p90'])} ms; "
        "owners and members only, without `fleet status`'s per-member lease TTL queries), "
        f"while converging every {cell(res['recovery']['median'])} ms (full `fleet status` "
        "and `fleet ps`); each time is stamped when the first read showing the event was "
        "sent.",
        f"Victims: a random READY worker each round (killed slots: "
        f"{[r['slot'] for r in rounds]}; the leader in {leaders} of them), each owning "
        f"{segs} segments. A respawned worker killed again less than "
        f"{stable:.0f} s after its spawn is respawned after a longer backoff (0.5 s doubling, "
        f"by design), which the respawn and recovery times include ({backed_off} of {n} "
        f"kills); a slot already killed {RespawnPolicy().crash_limit - 1} times within "
        f"{p['crash_window_s']:.0f} s is not chosen (its next crash would park it in FATAL "
        f"for {RespawnPolicy().cooldown:.0f} s).",
        f"Stopped with `fleet down` (exit {raw['shutdown']['down_exit']}, "
        f"{cell(raw['shutdown']['down_ms'])} ms); nothing was left running.",
    ]
    return "\n".join(lines) + "\n"


def build_report(
    fleet: FleetUp, raw: dict[str, Any], command: str, host: dict[str, Any]
) -> dict[str, Any]:
    o = fleet.opts

    def period(name: str) -> dict[str, float | None]:
        return period_summary(fleet.periods.get(name, []), nearest_rank)

    return {
        "benchmark": "failover",
        "command": command,
        "fleet_up_command": shlex.join(["python", *fleet.command()[1:]]),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "parameters": {
            "workers": o.workers,
            "segments": o.segments,
            "kills": o.kills,
            "lease_ttl": o.lease_ttl,
            "seed": o.seed,
            "interval": float(INTERVAL),
            "handler": HANDLER,
            "failover_poll_target_ms": FAILOVER_POLL * 1000.0,
            "recovery_poll_target_ms": RECOVERY_POLL * 1000.0,
            "crash_window_s": RespawnPolicy().crash_window,
            "stable_after_s": RespawnPolicy().stable_after,
            "percentiles": "nearest-rank",
        },
        "machine": {
            **host,
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
        },
        "poll_period_ms": {"failover": period("failover"), "recovery": period("recovery")},
        "summary": {key: summarize(v, nearest_rank, QUANTILES) for key, v in samples(raw).items()},
    }


# -- entry ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    parser = bench_parser(__doc__, workers=8, rounds=("--kills", 20, "kill -9 rounds"))
    parser.add_argument("--seed", type=int, default=0, help="victim choice seed (default 0)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    check_fleet_args(parser, args, "--kills")
    return Options(args.workers, args.segments, args.kills, args.lease_ttl, args.seed, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    command = shlex.join(["python", "bench/failover.py", *argv])
    stop_on_signals()  # Ctrl-C, SIGTERM, SIGHUP: through the `finally` below
    load_start = [round(v, 2) for v in os.getloadavg()]
    host = {**machine(), "load_average_start": load_start}
    report: dict[str, Any] | None = None
    raw: dict[str, Any] = {}
    code = 1
    with tempfile.TemporaryDirectory(prefix="fleet-failover-") as tmpdir:
        meter = CpuMeter()
        fleet = FleetUp(Path(tmpdir), opts)
        try:
            raw = measure(fleet)
            code = 0
        except BenchError as exc:
            print(
                f"failover: {exc}\n--- fleet up output\n{tail(fleet.out_path, OUTPUT_TAIL_LINES)}",
                file=sys.stderr,
            )
        except KeyboardInterrupt:
            print("failover: interrupted; stopping the fleet", file=sys.stderr)
            code = 130
        finally:
            ignore_stop_signals()  # a second Ctrl-C must not cut the cleanup short
            shutdown = fleet.stop()
            leftovers = fleet.leftovers()
        fail_on_leftovers(leftovers)
        if shutdown["down_exit"] != 0:
            print(
                f"failover: fleet down did not stop the fleet cleanly: {shutdown}", file=sys.stderr
            )
    if code != 0:
        return code
    raw["shutdown"] = shutdown
    report = build_report(fleet, raw, command, host)
    report.update(cpu=meter.result(), raw=raw)
    publish(report, render_markdown(report), opts.out, "failover")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
