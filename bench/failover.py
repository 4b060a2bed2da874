"""Benchmark: kill -9 failover and recovery under the `fleet up` supervisor.

Runs ``fleet up`` (demo handler, embedded etcd on a free port, interval 0.5 s) in a fresh
temporary directory, exactly as a user would, waits until it is settled, then, round
after round, SIGKILLs one READY worker: a random non-leader (``--kills``, seeded) or the
leader (``--leader-kills``), interleaved. Each round is timed from the kill through every
step of the handover: the supervisor **reaped** the child (its ``w<i> exited`` line), its
member key was deleted (the supervisor **revoked** its lease at once: not bound by the
TTL), the next **assignment** was written, its segments were **acquired** by the others,
and each had its **first call** (its commit seen), then the **recovery**: the respawned
worker registered and the fleet settled again with N members.

etcd is read through one watch whose events are stamped on arrival (`observe.py`), on
the same clock as the ``ts`` of fleet up's JSON log lines. Writes ``<out>/failover.json``
(parameters, machine, every round, summary) and ``<out>/failover.md``. It fails only if
a step never completes; whatever happens the fleet is stopped and nothing is left.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BenchError,
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
from fleetrun import STEP_TIMEOUT, Fleets, FleetUp, Row, UpOptions, all_ready, shown_command
from observe import Observer
from stats import ms_between, rank_note, summarize_all, summary_table
from steps import handover, owned_by_others, since, step_deltas

from fleet.supervise.slots import RespawnPolicy

STEP_ORDER = ["kill", "reaped", "gone", "assignment", "acquired", "first_call"]


@dataclass(frozen=True)
class Options:
    up: UpOptions
    kills: int
    leader_kills: int
    seed: int
    out: Path


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

    def pick(self, rows: Sequence[Row], leader: str | None, want_leader: bool) -> Row:
        now = time.monotonic()
        ready = sorted((r for r in rows if r["state"] == "READY"), key=lambda r: r["slot"])
        eligible = [r for r in ready if self.recent(r["slot"], now) < self.policy.crash_limit - 1]
        wanted = [r for r in eligible if (r["member"] == leader) == want_leader]
        if not (wanted or eligible):
            raise BenchError("no READY slot may be killed now (each was killed too often)")
        row = self.rng.choice(wanted or eligible)
        self.kills.setdefault(row["slot"], []).append(now)
        return row

    def recent(self, slot: int, now: float) -> int:
        return sum(1 for t in self.kills.get(slot, []) if now - t <= self.policy.crash_window)


def schedule(kills: int, leader_kills: int) -> list[bool]:
    """True for a leader kill, spread evenly among the others."""
    marks = [((i + 0.5) / kills, False) for i in range(kills)]
    marks += [((j + 0.5) / leader_kills, True) for j in range(leader_kills)]
    return [leader for _, leader in sorted(marks)]


def whole(fleet: FleetUp, members: set[str], what: str) -> list[Row]:
    """Wait until every slot is READY, registered under its own pid, and etcd settled."""
    rows = fleet.wait_slots(what, all_ready)
    pids = {str(r["member"]): r["pid"] for r in rows}

    def done(o: Observer) -> bool:
        records = o.members()
        registered = all(records.get(m, {}).get("pid") == pid for m, pid in pids.items())
        return registered and o.settled(members)

    fleet.wait(what, done)
    return rows


def one_round(
    fleet: FleetUp, victims: Victims, members: set[str], round_no: int, leader_kill: bool
) -> dict[str, Any]:
    obs, ttl = fleet.obs, fleet.opts.lease_ttl
    rows = whole(fleet, members, f"round {round_no}: settled before the kill")
    with obs.lock:
        leader = obs.leader()
        row = victims.pick(rows, leader, leader_kill)
        victim, pid, slot = str(row["member"]), int(row["pid"]), int(row["slot"])
        owned = obs.owned_by(victim)

    def registered(o: Observer) -> bool:
        record = o.members().get(victim)
        return record is not None and record.get("pid") not in (None, pid)

    taken_over, back = obs.arm(owned_by_others(victim, owned)), obs.arm(registered)
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    t_owned = fleet.wait(
        f"round {round_no}: {victim}'s {len(owned)} segments taken over",
        taken_over,
        timeout=3 * ttl + STEP_TIMEOUT,  # TTL-bound if the revoke failed
    )
    stamps = handover(obs, t_kill, victim, owned, t_owned)
    reaped = fleet.exit_after(t_kill - 0.001, slot)
    stamps["reaped"] = reaped.ts if reaped else None
    t_registered = fleet.wait(f"round {round_no}: {victim} registered again", back)
    final = whole(fleet, members, f"round {round_no}: settled again after the respawn")
    t_settled = time.time()
    summary = fleet.summary_after(t_kill, 10.0)
    new_row = next(r for r in final if r["slot"] == slot)
    result: dict[str, Any] = {
        "round": round_no,
        "slot": slot,
        "victim": victim,
        "pid": pid,
        "victim_was_leader": victim == leader,
        "uptime_at_kill_s": row["uptime"],
        "restarts_before": row["restarts"],
        "segments": len(owned),
        **since(t_kill, stamps),
        "registered_ms": ms_between(t_kill, t_registered),
        "recovery_ms": ms_between(t_kill, t_settled),
        "supervisor_reported_s": summary[1] if summary else None,
        "new_pid": new_row["pid"],
        "last_exit": new_row["last_exit"],
        "leader_after": obs.leader(),
        "generation_after": obs.generation(),
    }
    result["kill_ms"] = 0.0
    result["steps"] = step_deltas(result, STEP_ORDER)
    return result


def measure(fleets: Fleets, opts: Options) -> dict[str, Any]:
    fleet = fleets.new(opts.up)
    raw: dict[str, Any] = {"cold_start": fleet.up_and_settled(), "rounds": []}
    members = set(raw["cold_start"].pop("members"))
    print(f"cold start: {raw['cold_start']}", flush=True)
    victims = Victims(random.Random(opts.seed))
    for round_no, leader_kill in enumerate(schedule(opts.kills, opts.leader_kills)):
        r = one_round(fleet, victims, members, round_no, leader_kill)
        raw["rounds"].append(r)
        leader = " (leader)" if r["victim_was_leader"] else ""
        print(
            f"round {round_no}: kill -9 {r['victim']}{leader}"
            f" owning {r['segments']}: reaped {r['reaped_ms']}, revoked {r['gone_ms']}, "
            f"assignment {r['assignment_ms']}, acquired {r['acquired_ms']}, first calls "
            f"{r['first_call_ms']} ms; settled again {r['recovery_ms']} ms",
            flush=True,
        )
    raw["shutdown"] = fleet.stop()
    return raw


# (key, label in the table, what is timed)
METRICS: list[tuple[str, str, str]] = [
    ("cold_start", "cold start", "spawn `fleet up` -> settled (etcd included)"),
    ("reaped", "reaped", "SIGKILL -> the supervisor's `w<i> exited` line"),
    ("gone", "lease revoked", "SIGKILL -> its member key deleted"),
    ("assignment", "assignment written", "SIGKILL -> the next assignment arrives"),
    ("first_acquired", "first acquired", "SIGKILL -> first of its segments acquired"),
    ("acquired", "**kill -9 failover**", "SIGKILL -> all its segments owned by others"),
    ("acquired_leader", "  victim was leader", "same, leader killed"),
    ("acquired_follower", "  victim not leader", "same, non-leader killed"),
    ("first_call", "**first calls**", "SIGKILL -> each of them had its first call"),
    ("first_call_leader", "  victim was leader", "same, leader killed"),
    ("first_call_follower", "  victim not leader", "same, non-leader killed"),
    ("registered", "respawned", "SIGKILL -> new worker registered (incl. backoff)"),
    ("recovery", "recovery", "SIGKILL -> settled again with N members"),
]
STEP_NAMES = {
    "kill": "SIGKILL",
    "reaped": "reaped",
    "gone": "lease revoked",
    "assignment": "assignment written",
    "acquired": "all acquired",
    "first_call": "first calls",
}
STEP_METRICS = [
    (f"step:{a}->{b}", f"{STEP_NAMES[a]} -> {STEP_NAMES[b]}", "this step alone")
    for a, b in zip(STEP_ORDER, STEP_ORDER[1:], strict=False)
]


def columns(raw: dict[str, Any]) -> dict[str, list[float | None]]:
    rounds = raw["rounds"]

    def col(key: str, leader: bool | None = None) -> list[Any]:
        return [r[key] for r in rounds if leader is None or r["victim_was_leader"] == leader]

    cols: dict[str, list[Any]] = {"cold_start": [raw["cold_start"]["settled_ms"]]}
    for key in ("reaped", "gone", "assignment", "first_acquired", "registered", "recovery"):
        cols[key] = col(f"{key}_ms")
    for key in ("acquired", "first_call"):
        cols[key] = col(f"{key}_ms")
        cols[f"{key}_leader"] = col(f"{key}_ms", True)
        cols[f"{key}_follower"] = col(f"{key}_ms", False)
    for key, _, _ in STEP_METRICS:
        cols[key] = [r["steps"][key.split(":", 1)[1]] for r in rounds]
    return cols


def render_markdown(report: dict[str, Any]) -> str:
    p, m, raw, cpu = report["parameters"], report["machine"], report["raw"], report["cpu"]
    rounds = raw["rounds"]
    leaders = sum(1 for r in rounds if r["victim_was_leader"])
    backed_off = sum(1 for r in rounds if r["restarts_before"])
    lines = [
        f"# Failover benchmark: fleet up, {p['workers']} workers, {p['segments']} segments",
        "",
        f"Command: `{report['command']}` (fleet: `{report['fleet_up_command']}`)",
        "",
        f"{report['finished']}; {machine_line(m)}; load average {m['load_average_start']} "
        f"before, {m['load_average_end']} after; {len(rounds)} kills ({leaders} of the "
        f"leader, seed {p['seed']}), lease TTL {p['lease_ttl']} s, interval {p['interval']} s.",
        f"CPU over the {cpu['wall_s']:.0f} s run: {cpu['busy_percent_all']:.0f}% busy in all, "
        f"{cpu['busy_percent_fleet']:.0f}% by the fleet, {cpu['busy_percent_poller']:.0f}% "
        "by this script.",
        "",
        *summary_table(METRICS, report["summary"]),
        "",
        "Each step alone (from the previous one):",
        "",
        *summary_table(STEP_METRICS, report["summary"]),
        "",
        f"Times are stamped when etcd's watch delivered the event to this script, or by the "
        f"`ts` of fleet up's JSON line for the reap ({rank_note(len(rounds))}). A respawned "
        "slot killed again within a minute is respawned after a longer backoff (by design), "
        f"which the respawn and recovery times include ({backed_off} of {len(rounds)} "
        "kills hit a slot that had been restarted before).",
        f"Stopped with `fleet down` (exit {raw['shutdown']['down_exit']}); nothing was left.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=8, help="fleet size (default 8)")
    parser.add_argument("--segments", type=int, default=64, help="segment count (default 64)")
    parser.add_argument("--kills", type=int, default=20, help="non-leader kills (default 20)")
    parser.add_argument(
        "--leader-kills", type=int, default=0, help="kills of the leader (default 0)"
    )
    parser.add_argument("--lease-ttl", type=int, default=10, help="lease TTL, s (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="victim choice seed (default 0)")
    parser.add_argument(
        "--smoke", action="store_true", help="2 workers, 8 segments, 1 kill of each kind"
    )
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.segments, args.kills, args.leader_kills = 2, 8, 1, 1
    if args.workers < 2:
        parser.error("--workers must be at least 2 (someone must take the segments over)")
    if args.segments < args.workers or args.kills < 0 or args.leader_kills < 0:
        parser.error("need --segments >= --workers and --kills, --leader-kills >= 0")
    if args.kills + args.leader_kills < 1:
        parser.error("--kills plus --leader-kills must be at least 1")
    up = UpOptions(args.workers, args.segments, args.lease_ttl, 0.5)
    return Options(up, args.kills, args.leader_kills, args.seed, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    command = shlex_command("failover.py", argv)
    host = {**machine(), "load_average_start": load_average()}
    meter = CpuMeter()
    fleets = Fleets()
    code, raw = guarded("failover", lambda: measure(fleets, opts), fleets.close, fleets.context)
    if code != 0:
        return code
    report: dict[str, Any] = {
        "benchmark": "failover",
        "command": command,
        "fleet_up_command": shown_command(opts.up),
        "finished": finished(),
        "parameters": {
            "workers": opts.up.workers,
            "segments": opts.up.segments,
            "kills": opts.kills,
            "leader_kills": opts.leader_kills,
            "lease_ttl": opts.up.lease_ttl,
            "seed": opts.seed,
            "interval": opts.up.interval,
            "handler": opts.up.handler,
            "percentiles": "nearest-rank",
        },
        "machine": {**host, "load_average_end": load_average()},
        "summary": summarize_all(columns(raw)),
        "cpu": meter.result(),
        "raw": raw,
    }
    publish(report, render_markdown(report), opts.out, "failover")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
