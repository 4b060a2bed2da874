"""Benchmark: cold start of `fleet up --workers N`, embedded etcd included, and how many
times each segment was acquired on the way.

Each trial runs ``fleet up`` in a fresh directory (fresh etcd data: nothing to be
sticky about) and times, from the spawn: etcd serving (``.fleet/fleet.json`` written),
the first and the last member registered, the first assignment written, and **settled**
(every member in the assignment, every segment owned by its assigned member, balanced),
plus the supervisor's summary line. It replays etcd's history from revision 1 to count
the acquires: every creation of an ``owners/<segment>`` key is one (the target is
exactly one per segment; a worker that joins late takes segments another acquired
first, so each extra one is a handoff paid during start-up), and the assignments
written on the way. Then ``fleet down``.

Writes ``<out>/coldstart-<N>x<S>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
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
from fleetrun import Fleets, FleetUp, UpOptions, shown_command
from stats import ms_between, rank_note, summarize_all, summary_table


@dataclass(frozen=True)
class Options:
    up: UpOptions
    trials: int
    out: Path


def acquires(fleet: FleetUp, until: float) -> dict[str, Any]:
    """From etcd's history up to `until`: acquires per segment, releases, assignments."""
    obs, keys = fleet.obs, fleet.obs.keys
    per_segment: dict[int, int] = {}
    releases = assignments = 0
    for e in obs.events_since(0.0):
        if e.at > until:
            break
        if e.key.startswith(keys.owners):
            seg = keys.segment_of(e.key)
            if seg is None:
                continue
            if e.kind == "put" and e.create_revision == e.revision:
                per_segment[seg] = per_segment.get(seg, 0) + 1
            elif e.kind == "delete":
                releases += 1
        elif e.key == keys.assignment and e.kind == "put":
            assignments += 1
    counts = list(per_segment.values())
    total = sum(counts)
    return {
        "acquires": total,
        "acquires_per_segment": round(total / max(1, fleet.opts.segments), 3),
        "acquires_max": max(counts, default=0),
        "segments_acquired_more_than_once": sum(1 for c in counts if c > 1),
        "releases": releases,
        "assignments_written": assignments,
    }


def stamps(fleet: FleetUp) -> dict[str, float | None]:
    """When the first/last member registered and the first assignment arrived."""
    keys = fleet.obs.keys
    events = fleet.obs.events_since(0.0)
    joins = [e.at for e in events if e.key.startswith(keys.members) and e.kind == "put"]
    first_assignment = next((e.at for e in events if e.key == keys.assignment), None)
    return {
        "first_member": min(joins, default=None),
        "last_member": max(joins, default=None),
        "first_assignment": first_assignment,
    }


def one_trial(fleets: Fleets, opts: Options, trial: int) -> dict[str, Any]:
    fleet = fleets.new(opts.up)
    up = fleet.up_and_settled(from_start=True)
    t0 = fleet.started_at
    st = stamps(fleet)
    result = {
        "trial": trial,
        **{k: v for k, v in up.items() if k != "members"},
        "first_member_ms": ms_between(t0, st["first_member"]),
        "last_member_ms": ms_between(t0, st["last_member"]),
        "first_assignment_ms": ms_between(t0, st["first_assignment"]),
        **acquires(fleet, fleet.settled_at),
    }
    result["shutdown"] = fleet.stop()
    return result


def measure(fleets: Fleets, opts: Options) -> list[dict[str, Any]]:
    trials = []
    for trial in range(opts.trials):
        r = one_trial(fleets, opts, trial)
        trials.append(r)
        print(
            f"trial {trial}: settled {r['settled_ms']} ms (etcd {r['etcd_ready_ms']} ms), "
            f"{r['acquires']} acquires for {opts.up.segments} segments "
            f"(max {r['acquires_max']} per segment), {r['assignments_written']} assignments",
            flush=True,
        )
    return trials


METRICS = [
    ("etcd_ready", "etcd serving", "spawn `fleet up` -> .fleet/fleet.json written"),
    ("first_member", "first member", "spawn -> first member key"),
    ("last_member", "last member", "spawn -> all N member keys"),
    ("first_assignment", "first assignment", "spawn -> first assignment written"),
    ("settled", "settled", "spawn -> every segment owned by its assigned member"),
    ("summary_line", "summary line", "spawn -> `N/N workers ready, ...` printed"),
]


def columns(trials: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    return {key: [t[f"{key}_ms"] for t in trials] for key, _, _ in METRICS}


def render_markdown(report: dict[str, Any]) -> str:
    p, m = report["parameters"], report["machine"]
    trials = report["raw"]["trials"]
    acq = report["acquires"]
    lines = [
        f"# Cold start: fleet up, {p['workers']} workers, {p['segments']} segments",
        "",
        f"Command: `{report['command']}` (each trial: `{report['fleet_up_command']}`)",
        "",
        f"{report['finished']}; {machine_line(m)}; load average {m['load_average_start']} "
        f"before, {m['load_average_end']} after; {p['trials']} trials.",
        "",
        *summary_table(METRICS, report["summary"]),
        "",
        f"Acquires per segment during start-up (target 1.0): mean "
        f"{acq['per_segment_mean']:.2f}, worst trial {acq['per_segment_worst']:.2f}; "
        f"at most {acq['max']} acquires of one segment; {acq['assignments_mean']:.1f} "
        "assignments written per start (counted from etcd's history: each creation of an "
        "owners/ key is an acquire).",
        f"Times are stamped when etcd's watch delivered the event ({rank_note(len(trials))}).",
    ]
    return "\n".join(lines) + "\n"


def build_report(opts: Options, trials: list[dict[str, Any]], command: str, host: dict[str, Any]
                 ) -> dict[str, Any]:  # fmt: skip
    per = [t["acquires_per_segment"] for t in trials]
    return {
        "benchmark": "coldstart",
        "command": command,
        "fleet_up_command": shown_command(opts.up),
        "finished": finished(),
        "parameters": {
            "workers": opts.up.workers,
            "segments": opts.up.segments,
            "trials": opts.trials,
            "lease_ttl": opts.up.lease_ttl,
            "interval": opts.up.interval,
            "handler": opts.up.handler,
            "percentiles": "nearest-rank",
        },
        "machine": {**host, "load_average_end": load_average()},
        "summary": summarize_all(columns(trials)),
        "acquires": {
            "per_segment_mean": round(sum(per) / len(per), 3),
            "per_segment_worst": max(per),
            "max": max(t["acquires_max"] for t in trials),
            "assignments_mean": sum(t["assignments_written"] for t in trials) / len(trials),
        },
        "raw": {"trials": trials},
    }


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=8, help="fleet size (default 8)")
    parser.add_argument("--segments", type=int, default=64, help="segment count (default 64)")
    parser.add_argument("--trials", type=int, default=20, help="cold starts (default 20)")
    parser.add_argument("--interval", type=float, default=0.5, help="handler interval (0.5)")
    parser.add_argument("--lease-ttl", type=int, default=10, help="lease TTL, s (default 10)")
    parser.add_argument("--smoke", action="store_true", help="2 workers, 8 segments, 1 trial")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.segments, args.trials = 2, 8, 1
    if args.workers < 1 or args.segments < args.workers or args.trials < 1:
        parser.error("need --workers >= 1, --segments >= --workers and --trials >= 1")
    up = UpOptions(args.workers, args.segments, args.lease_ttl, args.interval)
    return Options(up, args.trials, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    command = shlex_command("coldstart.py", argv)
    host = {**machine(), "load_average_start": load_average()}
    meter = CpuMeter()
    fleets = Fleets()
    code, trials = guarded("coldstart", lambda: measure(fleets, opts), fleets.close, fleets.context)
    if code != 0:
        return code
    report = build_report(opts, trials, command, host)
    report["cpu"] = meter.result()
    report["raw"] = report.pop("raw")
    stem = f"coldstart-{opts.up.workers}x{opts.up.segments}"
    publish(report, render_markdown(report), opts.out, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
