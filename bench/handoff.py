"""Benchmark: how long segments take to change hands in a real fleet.

Starts a real etcd (`fleet.server.embedded.EmbeddedEtcd`) and N real `python -m fleet worker`
processes running the demo handler, and reads the fleet in-process the way
`fleet status --json` does (`fleet.coord.status.collect`, every few milliseconds). Measures:

* **cold start** (once, first): spawning all N workers -> all member keys present ->
  converged (every member in, every segment owned by its assigned member, balanced);
* **graceful handoff** (every round): SIGTERM one worker -> every segment it owned is
  owned by another member and nothing is `moving`. Even rounds stop the leader (so the
  handoff includes a leader change), odd rounds a non-leader;
* **join rebalance** (every round): a replacement with the same id is started ->
  its member key appears (process start-up) -> converged (rebalance);
* **kill -9 failover** (once, last): SIGKILL one non-leader -> its member key is gone
  -> all its segments are owned by others. Bound by the lease TTL *by design*: nothing
  but etcd's lease expiry removes a dead worker's keys (the supervisor of a later issue
  revokes the lease of a dead child to make this fast).

Every observation is timestamped when its read is sent; the event happened between the
previous read and that one, so the poll period (reported) is the resolution.

Writes ``<out>/handoff-<N>w.json`` (parameters, machine, raw numbers, summary) and
``<out>/handoff-<N>w.md`` (the summary table and the command). A benchmark, not a test:
it fails only if a step never completes, never because something is slow.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
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
    bench_parser,
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
from fleet.server.embedded import EmbeddedEtcd

# Every process we start inherits this variable, so the final leak check finds even a
# process that escaped its process group or was re-parented.
TAG_ENV = "FLEET_BENCH_TAG"
HANDLER = "fleet.demo:handle"
INTERVAL = "0.05"
DEFAULT_POLL_MS = 5.0  # target time between two status reads ...
POLL_MIN_SLEEP = 0.001  # ... but always leave the CPUs to the fleet for a moment
STEP_TIMEOUT = 60.0  # any step but the TTL-bound failover
GRACEFUL_EXIT_TIMEOUT = 60.0
LOG_TAIL_LINES = 30

QUANTILES = (("median", 0.5), ("p90", 0.9))


# -- reading the fleet ------------------------------------------------------------------


def member_ids(st: Status) -> set[str]:
    return {m["id"] for m in st["members"]}


def owner_map(st: Status) -> dict[int, str | None]:
    return {s["segment"]: s["owner"] for s in st["segment_owners"]}


def owned_by(st: Status, member_id: str) -> list[int]:
    for m in st["members"]:
        if m["id"] == member_id:
            return list(m["owned"])
    return []


def converged(st: Status, ids: Iterable[str]) -> bool:
    """Exactly `ids` are in, every segment is owned by its assigned member, balanced.

    Balance matters right after a join: until the leader writes the new assignment
    nothing is `moving`, but the newcomer owns nothing yet.
    """
    if member_ids(st) != set(ids) or st["moving"] or st["unowned"]:
        return False
    sizes = [len(m["owned"]) for m in st["members"]]
    return bool(sizes) and max(sizes) - min(sizes) <= 1


def handed_off(st: Status, victim: str, segments: Sequence[int]) -> bool:
    """Every segment in `segments` is owned by a member other than `victim`, none moving."""
    if st["moving"] or victim in member_ids(st):
        return False
    owners = owner_map(st)
    return all(owners.get(seg) not in (None, victim) for seg in segments)


def registered(st: Status, member_id: str, pid: int) -> bool:
    """The member key of `member_id` exists and was written by process `pid`."""
    return any(m["id"] == member_id and m["pid"] == pid for m in st["members"])


def brief(st: Status | None) -> str:
    """One line about a status, for error messages."""
    if st is None:
        return "(no status read yet)"
    owned = {m["id"]: len(m["owned"]) for m in st["members"]}
    return (
        f"leader {st['leader']}, generation {st['generation']}, owned per member {owned}, "
        f"unowned {st['unowned']}, moving {st['moving']}"
    )


# -- processes --------------------------------------------------------------------------


@dataclass
class Worker:
    """One `fleet worker` process; a thread records the moment it exits."""

    member_id: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    exited_at: float | None = None  # monotonic

    def __post_init__(self) -> None:
        threading.Thread(target=self._reap, name=f"reap-{self.member_id}", daemon=True).start()

    def _reap(self) -> None:
        self.popen.wait()
        self.exited_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals, *, group: bool = False) -> None:
        """Signal the process (or its group); a no-op once it has been reaped."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)


@dataclass(frozen=True)
class Options:
    workers: int
    segments: int
    rounds: int
    lease_ttl: int
    out: Path
    poll_ms: float = DEFAULT_POLL_MS
    keep_logs: Path | None = None


@dataclass
class Fleet:
    """An etcd, the workers started against it, and a status reader. `close()` kills all."""

    tmp: Path
    opts: Options
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    workers: dict[str, Worker] = field(default_factory=dict)  # expected to be running
    started: list[Worker] = field(default_factory=list)  # every worker ever spawned
    poll_periods: list[float] = field(default_factory=list)
    keys: Keys = field(default_factory=lambda: Keys("/fleet", "default"))

    def __post_init__(self) -> None:
        os.environ[TAG_ENV] = self.tag  # inherited by etcd too
        (self.tmp / "logs").mkdir()
        self.server = EmbeddedEtcd(self.tmp / "etcd", log_path=self.tmp / "logs" / "etcd.log")
        self.client: Etcd | None = None

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def start_etcd(self) -> None:
        self.server.start()
        self.client = Etcd([self.endpoint], timeout=3.0)

    def spawn(self, member_id: str) -> Worker:
        """Start `python -m fleet worker` for `member_id` in its own session."""
        log_path = self.tmp / "logs" / f"{member_id}.{len(self.started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env[TAG_ENV] = self.tag
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        cmd = [
            sys.executable, "-m", "fleet", "worker",
            "--etcd", self.endpoint,
            "--id", member_id,
            "--segments", str(self.opts.segments),
            "--interval", INTERVAL,
            "--lease-ttl", str(self.opts.lease_ttl),
            "--handler", HANDLER,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,  # no ./fleet.toml of the caller's
                env=env,
                start_new_session=True,
            )
        worker = Worker(member_id, popen, log_path)
        self.started.append(worker)
        self.workers[member_id] = worker
        return worker

    def retire(self, member_id: str) -> Worker:
        """Stop expecting `member_id` to run (before signalling it)."""
        return self.workers.pop(member_id)

    def _check_alive(self) -> None:
        for worker in self.workers.values():
            if not worker.alive:
                raise BenchError(
                    f"worker {worker.member_id} (pid {worker.pid}) exited unexpectedly with "
                    f"status {worker.popen.returncode}; log tail:\n"
                    f"{tail(worker.log_path, LOG_TAIL_LINES)}"
                )

    def status(self) -> Status:
        """One status read (retried while etcd is briefly unavailable)."""
        return self.wait_for("status read", lambda _st: True)[1]

    def wait_for(
        self, what: str, done: Callable[[Status], bool], timeout: float = STEP_TIMEOUT
    ) -> tuple[float, Status]:
        """Poll until `done(status)`; the monotonic send time of that read, and the status."""
        assert self.client is not None
        deadline = time.monotonic() + timeout
        last: Status | None = None
        error = ""
        previous: float | None = None
        while True:
            self._check_alive()
            sent = time.monotonic()
            if previous is not None:
                self.poll_periods.append(sent - previous)
            previous = sent
            try:
                last = collect(self.client, self.keys)
            except EtcdError as exc:
                error = f"; last error: {exc}"
            else:
                if done(last):
                    return sent, last
            if time.monotonic() >= deadline:
                raise BenchError(
                    f"{what}: not reached within {timeout:.0f} s; {brief(last)}{error}"
                )
            period = self.opts.poll_ms / 1000.0
            time.sleep(max(POLL_MIN_SLEEP, period - (time.monotonic() - sent)))

    def close(self) -> list[str]:
        """Kill every process started here; return those still found running afterwards."""
        for worker in self.started:
            worker.signal(signal.SIGCONT, group=True)
            worker.signal(signal.SIGKILL, group=True)
        for worker in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.popen.wait(timeout=10)
        if self.client is not None:
            self.client.close()
        with contextlib.suppress(RuntimeError):
            self.server.kill()
        # Anything else with our tag (say, a worker spawned just as Ctrl-C arrived, before
        # it was recorded) goes the same way.
        kill_all(tagged_processes(TAG_ENV, self.tag))
        return self.leftovers()

    def leftovers(self) -> list[str]:
        """Our processes still alive: unreaped children, plus anything carrying our tag."""
        found = [f"{w.member_id} (pid {w.pid})" for w in self.started if w.popen.poll() is None]
        if self.server.running:
            found.append(f"etcd (pid {self.server.pid})")
        for proc in tagged_processes(TAG_ENV, self.tag):
            with contextlib.suppress(psutil.Error):
                found.append(describe(proc))
        return found

    def log_tails(self) -> str:
        logs = [w.log_path for w in self.started[-4:]] + [self.tmp / "logs" / "etcd.log"]
        return "\n".join(f"--- {path.name}\n{tail(path, LOG_TAIL_LINES)}" for path in logs)


# -- the measurements -------------------------------------------------------------------


def cold_start(fleet: Fleet, ids: Sequence[str]) -> dict[str, Any]:
    t0 = time.monotonic()
    for member_id in ids:
        fleet.spawn(member_id)
    t_in, _ = fleet.wait_for(
        "cold start: all members registered", lambda s: member_ids(s) == set(ids)
    )
    t_done, st = fleet.wait_for("cold start: converged", lambda s: converged(s, ids))
    return {
        "registered_ms": ms(t_in - t0),
        "converged_ms": ms(t_done - t0),
        "leader": st["leader"],
        "generation": st["generation"],
    }


def pick_victim(st: Status, ids: Sequence[str], round_no: int) -> str:
    """Even rounds: the leader. Odd rounds: a non-leader, in rotation."""
    leader = st["leader"]
    if round_no % 2 == 0 and leader in ids:
        return str(leader)
    others = [m for m in ids if m != leader]
    return others[(round_no // 2) % len(others)]


def one_round(fleet: Fleet, ids: Sequence[str], round_no: int) -> dict[str, Any]:
    """Graceful handoff of one worker, then the join of its replacement."""
    before = fleet.coord.status()
    victim_id = pick_victim(before, ids, round_no)
    owned = owned_by(before, victim_id)
    victim = fleet.retire(victim_id)

    t_sig = time.monotonic()
    victim.signal(signal.SIGTERM)
    t_handed, after = fleet.wait_for(
        f"round {round_no}: {victim_id}'s segments handed over",
        lambda s: handed_off(s, victim_id, owned),
    )
    try:
        code = victim.popen.wait(timeout=GRACEFUL_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"round {round_no}: {victim_id} still running {GRACEFUL_EXIT_TIMEOUT:.0f} s after "
            f"SIGTERM; log tail:\n{tail(victim.log_path, LOG_TAIL_LINES)}"
        ) from None
    while (exited_at := victim.exited_at) is None:  # the reaper stamps it right after wait()
        time.sleep(0.001)

    t_spawn = time.monotonic()
    replacement = fleet.spawn(victim_id)
    t_in, _ = fleet.wait_for(
        f"round {round_no}: {victim_id} registered again",
        lambda s: registered(s, victim_id, replacement.pid),
    )
    t_done, final = fleet.wait_for(
        f"round {round_no}: converged after {victim_id} rejoined", lambda s: converged(s, ids)
    )
    moved_in = sum(
        1 for seg, owner in owner_map(final).items() if owner != owner_map(after).get(seg)
    )
    return {
        "round": round_no,
        "victim": victim_id,
        "victim_was_leader": victim_id == before["leader"],
        "segments_handed_off": len(owned),
        "graceful_handoff_ms": ms(t_handed - t_sig),
        "graceful_exit_ms": ms(exited_at - t_sig),
        "exit_code": code,
        "join_startup_ms": ms(t_in - t_spawn),
        "join_rebalance_ms": ms(t_done - t_in),
        "join_total_ms": ms(t_done - t_spawn),
        "segments_moved_on_join": moved_in,
        "leader_after": final["leader"],
    }


def kill9(fleet: Fleet, ids: Sequence[str]) -> dict[str, Any]:
    """SIGKILL a non-leader: its keys go only when etcd expires its lease."""
    before = fleet.coord.status()
    victim_id = next(m for m in ids if m != before["leader"])
    owned = owned_by(before, victim_id)
    ttl_left = next(m["ttl"] for m in before["members"] if m["id"] == victim_id)
    victim = fleet.retire(victim_id)
    timeout = 3 * fleet.opts.lease_ttl + STEP_TIMEOUT

    t_kill = time.monotonic()
    victim.signal(signal.SIGKILL, group=True)
    t_gone, _ = fleet.wait_for(
        f"kill -9: {victim_id}'s lease expired", lambda s: victim_id not in member_ids(s), timeout
    )
    t_done, _ = fleet.wait_for(
        f"kill -9: {victim_id}'s segments taken over",
        lambda s: handed_off(s, victim_id, owned),
        timeout,
    )
    return {
        "victim": victim_id,
        "segments_taken_over": len(owned),
        "lease_ttl_left_at_kill_s": ttl_left,
        "lease_expiry_ms": ms(t_gone - t_kill),
        "failover_ms": ms(t_done - t_kill),
        "reassign_after_expiry_ms": ms(t_done - t_gone),
    }


def measure(fleet: Fleet) -> dict[str, Any]:
    opts = fleet.opts
    ids = [f"w{i}" for i in range(opts.workers)]
    raw: dict[str, Any] = {"cold_start": cold_start(fleet, ids), "rounds": []}
    print(f"cold start: {raw['cold_start']}", flush=True)
    for round_no in range(opts.rounds):
        result = one_round(fleet, ids, round_no)
        raw["rounds"].append(result)
        print(
            f"round {round_no}: {result['victim']}"
            f"{' (leader)' if result['victim_was_leader'] else ''} "
            f"handoff {result['graceful_handoff_ms']} ms, "
            f"join start-up {result['join_startup_ms']} ms + "
            f"rebalance {result['join_rebalance_ms']} ms",
            flush=True,
        )
    raw["kill9"] = kill9(fleet, ids)
    print(f"kill -9: {raw['kill9']}", flush=True)
    return raw


# -- summary and reports ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# (key, label in the table, what is timed)
METRICS: list[tuple[str, str, str]] = [
    ("cold_start_registered", "cold start: registered", "spawn N workers -> all member keys"),
    ("cold_start", "cold start: converged", "spawn N workers -> converged"),
    ("graceful_handoff", "graceful handoff", "SIGTERM -> its segments owned by others"),
    ("graceful_handoff_leader", "  victim was leader", "same, leader stopped"),
    ("graceful_handoff_follower", "  victim not leader", "same, non-leader stopped"),
    ("graceful_exit", "graceful stop: exit", "SIGTERM -> process exited"),
    ("join_startup", "join: process start-up", "spawn -> member key appears"),
    ("join_rebalance", "join: rebalance", "member key -> converged"),
    ("join_total", "join: total", "spawn -> converged"),
    ("kill9_lease_expiry", "kill -9: lease expiry", "SIGKILL -> member key gone (TTL-bound)"),
    ("kill9_failover", "kill -9 failover", "SIGKILL -> its segments owned by others"),
]


def samples(raw: dict[str, Any]) -> dict[str, list[float]]:
    rounds = raw["rounds"]
    return {
        "cold_start_registered": [raw["cold_start"]["registered_ms"]],
        "cold_start": [raw["cold_start"]["converged_ms"]],
        "graceful_handoff": [r["graceful_handoff_ms"] for r in rounds],
        "graceful_handoff_leader": [
            r["graceful_handoff_ms"] for r in rounds if r["victim_was_leader"]
        ],
        "graceful_handoff_follower": [
            r["graceful_handoff_ms"] for r in rounds if not r["victim_was_leader"]
        ],
        "graceful_exit": [r["graceful_exit_ms"] for r in rounds],
        "join_startup": [r["join_startup_ms"] for r in rounds],
        "join_rebalance": [r["join_rebalance_ms"] for r in rounds],
        "join_total": [r["join_total_ms"] for r in rounds],
        "kill9_lease_expiry": [raw["kill9"]["lease_expiry_ms"]],
        "kill9_failover": [raw["kill9"]["failover_ms"]],
    }


def render_markdown(report: dict[str, Any]) -> str:
    p, m, raw = report["parameters"], report["machine"], report["raw"]
    resolution, cpu = report["poll_period_ms"], report["cpu"]
    lines = [
        f"# Handoff benchmark: {p['workers']} workers, {p['segments']} segments",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['finished']}; {machine_line(m)}, load average "
        f"{m['load_average_1m_start']:.1f} -> {m['load_average_1m_end']:.1f}; "
        f"{p['rounds']} rounds, lease TTL {p['lease_ttl']} s, interval {p['interval']} s, "
        f"handler `{p['handler']}`.",
        "",
        f"CPU over the {cpu['wall_s']:.0f} s run: {cpu['busy_percent_all']:.0f}% busy in all, "
        f"of which {cpu['busy_percent_fleet']:.0f}% by etcd and the workers and "
        f"{cpu['busy_percent_poller']:.0f}% by this script's status reads.",
        "",
        *summary_table(METRICS, report["summary"], QUANTILES),
    ]
    k9 = raw["kill9"]
    lines += [
        "",
        f"Resolution: one status read every {resolution['median']:.1f} ms (median; p90 "
        f"{resolution['p90']:.1f} ms); each time is stamped when the first read showing the "
        "event was sent.",
        f"Graceful rounds alternate between stopping the leader and a non-leader; stopped "
        f"workers exited with status {sorted({r['exit_code'] for r in raw['rounds']})}; a join "
        f"moved {sorted({r['segments_moved_on_join'] for r in raw['rounds']})} segments "
        f"(minimum: {p['segments'] // p['workers']}).",
        f"kill -9 failover is bound by the lease TTL by design ({p['lease_ttl']} s; "
        f"{k9['lease_ttl_left_at_kill_s']} s were left on {k9['victim']}'s lease at the kill, "
        f"and reassignment after the expiry took {k9['reassign_after_expiry_ms']:.1f} ms): "
        "only etcd's lease expiry removes a dead worker's keys until the supervisor revokes "
        "the lease of a dead child.",
    ]
    return "\n".join(lines) + "\n"


def build_report(
    fleet: Fleet, raw: dict[str, Any], command: str, host: dict[str, Any]
) -> dict[str, Any]:
    opts = fleet.opts
    return {
        "benchmark": "handoff",
        "command": command,
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "parameters": {
            "workers": opts.workers,
            "segments": opts.segments,
            "rounds": opts.rounds,
            "lease_ttl": opts.lease_ttl,
            "interval": float(INTERVAL),
            "handler": HANDLER,
            "poll_target_period_ms": opts.poll_ms,
        },
        "machine": {**host, "load_average_1m_end": round(os.getloadavg()[0], 2)},
        "poll_period_ms": period_summary(fleet.poll_periods or [0.0], percentile),
        "summary": {key: summarize(v, percentile, QUANTILES) for key, v in samples(raw).items()},
        "raw": raw,
    }


# -- entry ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    parser = bench_parser(__doc__, workers=4, rounds=("--rounds", 10, "stop/rejoin rounds"))
    add_out_argument(parser)
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=DEFAULT_POLL_MS,
        help=f"target period of the status reads (default {DEFAULT_POLL_MS:g})",
    )
    parser.add_argument(
        "--keep-logs", type=Path, metavar="DIR", help="copy etcd's and the workers' logs here"
    )
    args = parser.parse_args(argv)
    check_fleet_args(parser, args, "--rounds")
    if args.poll_ms <= 0:
        parser.error("--poll-ms must be positive")
    return Options(
        args.workers,
        args.segments,
        args.rounds,
        args.lease_ttl,
        args.out,
        args.poll_ms,
        args.keep_logs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    command = shlex.join(["python", "bench/handoff.py", *argv])
    stop_on_signals()  # Ctrl-C, SIGTERM, SIGHUP: through every `finally` below
    report: dict[str, Any] | None = None
    code = 1
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmpdir:
        meter = CpuMeter()
        fleet = Fleet(Path(tmpdir), opts)
        try:
            fleet.start_etcd()
            # Other processes compete for the same CPUs: the load before and after the run.
            host = {**machine(), "load_average_1m_start": round(os.getloadavg()[0], 2)}
            report = build_report(fleet, measure(fleet), command, host)
            code = 0
        except BenchError as exc:
            print(f"handoff: {exc}\n{fleet.log_tails()}", file=sys.stderr)
        except KeyboardInterrupt:
            print("handoff: interrupted; killing the fleet", file=sys.stderr)
            code = 130
        finally:
            ignore_stop_signals()  # a second Ctrl-C must not cut the cleanup short
            leftovers = fleet.close()
            if opts.keep_logs is not None:
                shutil.copytree(Path(tmpdir) / "logs", opts.keep_logs, dirs_exist_ok=True)
        fail_on_leftovers(leftovers)
    if report is None:
        return code
    raw = report.pop("raw")  # keep the raw numbers last in the JSON
    report.update(cpu=meter.result(), raw=raw)
    publish(report, render_markdown(report), opts.out, f"handoff-{opts.workers}w")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
