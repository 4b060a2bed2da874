"""Benchmark: how long segments take to change hands between plain `fleet worker`s.

Starts a real etcd (`fleet.server.embedded.EmbeddedEtcd`) and N `python -m fleet worker`
processes (no supervisor) running the demo handler (every ``--interval`` s per segment,
default 0.05), and reads
etcd through one watch whose events are stamped on arrival (`observe.py`). Measures:

* **cold start** (once, first): spawning all N workers -> settled (every member in the
  assignment, every segment owned by its assigned member, balanced);
* **graceful handoff** (``--rounds``): SIGTERM one worker -> its member key deleted (it
  leaves first) -> the next assignment -> its owner keys released -> acquired by the
  others -> each one's first call; and the process's exit. Even rounds stop the leader,
  odd rounds a non-leader;
* **join rebalance** (every round): a replacement with the same id is started -> its
  member key appears (process start-up) -> settled (rebalance);
* **kill -9 against the TTL** (``--kill9``, last): SIGKILL a non-leader -> its lease
  expires (nobody revokes it: bound by the TTL by design) -> acquired -> first calls;
  then a replacement joins before the next one.

Writes ``<out>/handoff-<N>w.json`` (parameters, machine, raw numbers, summary) and
``<out>/handoff-<N>w.md``. It fails only if a step never completes.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    CpuMeter,
    add_out_argument,
    finished,
    guarded,
    load_average,
    machine,
    machine_line,
    publish,
    shlex_command,
)
from observe import Observer
from stats import ms_between, rank_note, summarize_all, summary_table
from steps import handover, owned_by_others, since
from workers import Fleet

INTERVAL = 0.05  # the default: every segment calls its handler 20 times a second
GRACEFUL_EXIT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Options:
    workers: int
    segments: int
    rounds: int
    kill9: int
    lease_ttl: int
    interval: float
    out: Path
    keep_logs: Path | None = None


def pick_victim(leader: str | None, ids: Sequence[str], round_no: int) -> str:
    """Even rounds: the leader. Odd rounds: a non-leader, in rotation."""
    if round_no % 2 == 0 and leader in ids:
        return str(leader)
    others = [m for m in ids if m != leader]
    return others[(round_no // 2) % len(others)]


def rejoin(fleet: Fleet, ids: Sequence[str], member: str, what: str) -> dict[str, Any]:
    """Start `member` again; time its start-up and the rebalance that follows."""
    settled = fleet.obs.arm(lambda o: o.settled(set(ids)))  # false: `member` is out
    t_spawn = time.time()
    replacement = fleet.spawn(member)

    def registered(o: Observer) -> bool:
        return o.members().get(member, {}).get("pid") == replacement.pid

    t_in = fleet.wait(f"{what}: {member} registered again", registered)
    t_done = fleet.wait(f"{what}: settled after {member} rejoined", settled)
    moved = [
        e
        for e in fleet.obs.events_since(t_in)
        if e.kind == "put" and e.key.startswith(fleet.obs.keys.owners) and e.at <= t_done
    ]
    return {
        "join_startup_ms": ms_between(t_spawn, t_in),
        "join_rebalance_ms": ms_between(t_in, t_done),
        "join_total_ms": ms_between(t_spawn, t_done),
        "segments_moved_on_join": len(moved),
    }


def one_round(fleet: Fleet, ids: Sequence[str], round_no: int) -> dict[str, Any]:
    """Graceful handoff of one worker, then the join of its replacement."""
    obs = fleet.obs
    fleet.wait(f"round {round_no}: settled", lambda o: o.settled(set(ids)))
    with obs.lock:
        leader = obs.leader()
        victim_id = pick_victim(leader, ids, round_no)
        owned = obs.owned_by(victim_id)
    victim = fleet.retire(victim_id)
    handed = obs.arm(owned_by_others(victim_id, owned))
    t_sig = time.time()
    victim.signal(signal.SIGTERM)
    t_handed = fleet.wait(f"round {round_no}: {victim_id}'s segments handed over", handed)
    stamps = handover(obs, t_sig, victim_id, owned, t_handed)
    code, exited_at = victim.wait_exit(GRACEFUL_EXIT_TIMEOUT)
    return {
        "round": round_no,
        "victim": victim_id,
        "victim_was_leader": victim_id == leader,
        "segments_handed_off": len(owned),
        **since(t_sig, stamps),
        "graceful_exit_ms": ms_between(t_sig, exited_at),
        "exit_code": code,
        **rejoin(fleet, ids, victim_id, f"round {round_no}"),
    }


def kill9(fleet: Fleet, ids: Sequence[str], trial: int) -> dict[str, Any]:
    """SIGKILL a non-leader: its keys go only when etcd expires its lease."""
    obs = fleet.obs
    fleet.wait(f"kill -9 {trial}: settled", lambda o: o.settled(set(ids)))
    with obs.lock:
        leader = obs.leader()
        others = [m for m in ids if m != leader]
        victim_id = others[trial % len(others)]
        owned = obs.owned_by(victim_id)
        lease = obs.view.members()[victim_id].lease
    ttl_left = obs.client.lease_ttl(lease)
    victim = fleet.retire(victim_id)
    taken_over = obs.arm(owned_by_others(victim_id, owned))
    t_kill = time.time()
    victim.signal(signal.SIGKILL, group=True)
    t_owned = fleet.wait(
        f"kill -9 {trial}: {victim_id}'s segments taken over",
        taken_over,
        timeout=3 * fleet.lease_ttl + 60.0,
    )
    stamps = handover(obs, t_kill, victim_id, owned, t_owned)
    return {
        "trial": trial,
        "victim": victim_id,
        "segments_taken_over": len(owned),
        "lease_ttl_left_at_kill_s": ttl_left,
        **since(t_kill, stamps, "kill9_"),
        **rejoin(fleet, ids, victim_id, f"kill -9 {trial}"),
    }


def measure(fleet: Fleet, opts: Options) -> dict[str, Any]:
    fleet.start_etcd()
    ids = [f"w{i}" for i in range(opts.workers)]
    t0 = time.time()
    for member_id in ids:
        fleet.spawn(member_id)
    t_done = fleet.wait("cold start: settled", lambda o: o.settled(set(ids)))
    raw: dict[str, Any] = {"cold_start": {"settled_ms": ms_between(t0, t_done)}, "rounds": []}
    print(f"cold start: {raw['cold_start']}", flush=True)
    for round_no in range(opts.rounds):
        r = one_round(fleet, ids, round_no)
        raw["rounds"].append(r)
        print(
            f"round {round_no}: {r['victim']}{' (leader)' if r['victim_was_leader'] else ''} "
            f"handoff {r['acquired_ms']} ms (first calls {r['first_call_ms']} ms), "
            f"join start-up {r['join_startup_ms']} ms + rebalance {r['join_rebalance_ms']} ms",
            flush=True,
        )
    raw["kill9"] = []
    for trial in range(opts.kill9):
        k = kill9(fleet, ids, trial)
        raw["kill9"].append(k)
        print(
            f"kill -9 {trial}: {k['victim']} lease expired after {k['kill9_gone_ms']} ms "
            f"({k['lease_ttl_left_at_kill_s']} s were left), taken over {k['kill9_acquired_ms']}",
            flush=True,
        )
    return raw


# (key, label in the table, what is timed)
METRICS: list[tuple[str, str, str]] = [
    ("cold_start", "cold start", "spawn N workers -> settled"),
    ("gone", "left", "SIGTERM -> its member key deleted"),
    ("assignment", "assignment written", "SIGTERM -> the next assignment arrives"),
    ("released", "released", "SIGTERM -> the last of its owner keys deleted"),
    ("acquired", "**graceful handoff**", "SIGTERM -> all its segments owned by others"),
    ("acquired_leader", "  victim was leader", "same, leader stopped"),
    ("acquired_follower", "  victim not leader", "same, non-leader stopped"),
    ("first_call", "first calls", "SIGTERM -> each of them had its first call"),
    ("graceful_exit", "graceful stop: exit", "SIGTERM -> process exited"),
    ("join_startup", "join: process start-up", "spawn -> member key appears"),
    ("join_rebalance", "join: rebalance", "member key -> settled"),
    ("join_total", "join: total", "spawn -> settled"),
    ("kill9_gone", "kill -9: lease expiry", "SIGKILL -> member key gone (TTL-bound)"),
    ("kill9_acquired", "**kill -9 failover, no supervisor**", "SIGKILL -> owned by others"),
    ("kill9_first_call", "  first calls", "SIGKILL -> each of them had its first call"),
]


def columns(raw: dict[str, Any]) -> dict[str, list[float | None]]:
    rounds, k9 = raw["rounds"], raw["kill9"]
    cols: dict[str, list[Any]] = {"cold_start": [raw["cold_start"]["settled_ms"]]}
    for key in ("gone", "assignment", "released", "acquired", "first_call", "graceful_exit"):
        cols[key] = [r[f"{key}_ms"] for r in rounds]
    cols["acquired_leader"] = [r["acquired_ms"] for r in rounds if r["victim_was_leader"]]
    cols["acquired_follower"] = [r["acquired_ms"] for r in rounds if not r["victim_was_leader"]]
    for key in ("join_startup", "join_rebalance", "join_total"):
        cols[key] = [r[f"{key}_ms"] for r in rounds + k9]
    for key in ("kill9_gone", "kill9_acquired", "kill9_first_call"):
        cols[key] = [k[f"{key}_ms"] for k in k9]
    return cols


def render_markdown(report: dict[str, Any]) -> str:
    p, m, raw, cpu = report["parameters"], report["machine"], report["raw"], report["cpu"]
    rounds, k9 = raw["rounds"], raw["kill9"]
    lines = [
        f"# Handoff benchmark: {p['workers']} workers, {p['segments']} segments",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['finished']}; {machine_line(m)}; load average {m['load_average_start']} "
        f"before, {m['load_average_end']} after; {p['rounds']} rounds, {p['kill9']} kill -9, "
        f"lease TTL {p['lease_ttl']} s, interval {p['interval']} s, handler `{p['handler']}`.",
        f"CPU over the {cpu['wall_s']:.0f} s run: {cpu['busy_percent_all']:.0f}% busy in all, "
        f"{cpu['busy_percent_fleet']:.0f}% by etcd and the workers, "
        f"{cpu['busy_percent_poller']:.0f}% by this script.",
        "",
        *summary_table(METRICS, report["summary"]),
        "",
        f"Times are stamped when etcd's watch delivered the event ({rank_note(len(rounds))}).",
        "Graceful rounds alternate between stopping the leader and a non-leader; stopped "
        f"workers exited with status {sorted({r['exit_code'] for r in rounds})}; a join moved "
        f"{sorted({r['segments_moved_on_join'] for r in rounds + k9})} segments (minimum: "
        f"{p['segments'] // p['workers']}).",
    ]
    if k9:
        left = sorted({k["lease_ttl_left_at_kill_s"] for k in k9})
        lines.append(
            f"kill -9 without a supervisor is bound by the lease TTL by design "
            f"({p['lease_ttl']} s; {left} s were left on the victim's lease at the kills): "
            "only etcd's lease expiry removes a dead worker's keys when nobody revokes them."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, help="fleet size (default 4)")
    parser.add_argument("--segments", type=int, default=64, help="segment count (default 64)")
    parser.add_argument("--rounds", type=int, default=10, help="stop/rejoin rounds (default 10)")
    parser.add_argument("--kill9", type=int, default=1, help="kill -9 trials (default 1)")
    parser.add_argument("--lease-ttl", type=int, default=10, help="lease TTL, s (default 10)")
    parser.add_argument(
        "--interval", type=float, default=INTERVAL, help=f"handler interval, s ({INTERVAL})"
    )
    parser.add_argument(
        "--poll-ms", type=float, default=None, help="ignored (etcd is watched, not polled)"
    )
    parser.add_argument(
        "--keep-logs", type=Path, metavar="DIR", help="copy etcd's and the workers' logs here"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2 workers, 8 segments, 1 round, 1 kill -9 (TTL 2)"
    )
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.segments, args.rounds, args.kill9, args.lease_ttl = 2, 8, 1, 1, 2
    if args.workers < 2:
        parser.error("--workers must be at least 2 (someone must take the segments over)")
    if args.segments < args.workers or args.rounds < 0 or args.kill9 < 0 or args.lease_ttl < 2:
        parser.error("need --segments >= --workers, --rounds/--kill9 >= 0, --lease-ttl >= 2")
    if args.interval <= 0:
        parser.error("--interval must be positive")
    return Options(
        args.workers, args.segments, args.rounds, args.kill9, args.lease_ttl, args.interval,
        args.out, args.keep_logs,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    command = shlex_command("handoff.py", argv)
    host = {**machine(), "load_average_start": load_average()}
    meter = CpuMeter()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmpdir:
        fleet = Fleet(Path(tmpdir), opts.segments, opts.lease_ttl, f"{opts.interval:g}")

        def cleanup() -> list[str]:
            left = fleet.close()
            if opts.keep_logs is not None:
                shutil.copytree(Path(tmpdir) / "logs", opts.keep_logs, dirs_exist_ok=True)
            return left

        code, raw = guarded("handoff", lambda: measure(fleet, opts), cleanup, fleet.log_tails)
    if code != 0:
        return code
    report: dict[str, Any] = {
        "benchmark": "handoff",
        "command": command,
        "finished": finished(),
        "parameters": {
            "workers": opts.workers,
            "segments": opts.segments,
            "rounds": opts.rounds,
            "kill9": opts.kill9,
            "lease_ttl": opts.lease_ttl,
            "interval": opts.interval,
            "handler": fleet.handler,
            "percentiles": "nearest-rank",
        },
        "machine": {**host, "load_average_end": load_average()},
        "summary": summarize_all(columns(raw)),
        "cpu": meter.result(),
        "raw": raw,
    }
    publish(report, render_markdown(report), opts.out, f"handoff-{opts.workers}w")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
