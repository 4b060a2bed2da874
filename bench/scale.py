"""Benchmark: join and leave under `fleet up`, and what a rebalance costs etcd.

Starts ``fleet up --workers N --segments S --interval I`` (demo handler, embedded etcd),
times its cold start to settled and counts its acquires (as coldstart.py), then runs
``--trials`` rounds of:

* **join**: ``fleet scale N+1`` (over the control socket) -> the new worker registered
  -> the next assignment -> its first acquire -> **settled** (every segment with its
  assigned member, balanced);
* **leave**: ``fleet scale N`` (the supervisor stops the new, highest slot gracefully)
  -> its member key deleted -> the next assignment -> released -> acquired by the others
  -> their first calls -> settled; and the slot gone from ``fleet ps``.

Around each one it reads etcd's own counters (``/metrics``: grpc_server_handled_total for
unary calls, grpc_server_msg_received_total for the watch and keepalive streams,
etcd_mvcc_*_total) and leaves out what the fleet sends anyway: the handlers' checkpoint
commits meanwhile (counted exactly from the watch) and the keepalives (their rate over
``--window`` seconds of the settled fleet, before), which leaves what the rebalance cost.
Writes ``<out>/scale-<N>x<S>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coldstart import acquires
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
from observe import delta, requests_total, scrape
from stats import ms_between, rank_note, summarize_all, summary_table
from steps import handover, owned_by_others, since


@dataclass(frozen=True)
class Options:
    up: UpOptions
    trials: int
    window: float
    out: Path


KEEPALIVE = "messages_in:LeaseKeepAlive"


def keepalive_rate(fleet: FleetUp, window: float) -> float:
    """Keepalives per second of the settled fleet, measured over `window` seconds."""
    before, t0 = scrape(fleet.endpoint), time.monotonic()
    time.sleep(window)
    after, t1 = scrape(fleet.endpoint), time.monotonic()
    return delta(after, before).get(KEEPALIVE, 0.0) / (t1 - t0)


def cost(gross: dict[str, float], seconds: float, commits: int, keepalives: float
         ) -> dict[str, Any]:  # fmt: skip
    """etcd requests of a rebalance: those between two scrapes, less the handlers'
    checkpoint commits in between (counted exactly from the watch: they come in bursts
    every interval, which no average over a window could subtract) and the keepalives
    the fleet sends anyway (steady: the rate measured before, times the duration)."""
    background = {"requests:Txn": float(commits), KEEPALIVE: keepalives * seconds}
    net = {k: round(v - background.get(k, 0.0), 1) for k, v in gross.items()}
    return {
        "seconds": round(seconds, 3),
        "requests_gross": requests_total(gross),
        "checkpoint_commits": commits,
        "keepalives_expected": round(keepalives * seconds, 1),
        "requests_net": round(requests_total(net), 1),
        "by_counter_net": {k: v for k, v in net.items() if abs(v) >= 0.5},
    }


def metered(fleet: FleetUp, keepalives: float, body: Any) -> tuple[Any, dict[str, Any]]:
    before, t0, w0 = scrape(fleet.endpoint), time.monotonic(), time.time()
    result = body()
    after, t1, w1 = scrape(fleet.endpoint), time.monotonic(), time.time()
    time.sleep(0.05)  # commits sent before the scrape may arrive through the watch just after
    with fleet.obs.lock:
        commits = sum(1 for at, _, _ in fleet.obs.commits if w0 <= at <= w1 + 0.05)
    return result, cost(delta(after, before), t1 - t0, commits, keepalives)


def join(fleet: FleetUp, members: set[str], new: str, trial: int) -> dict[str, Any]:
    obs = fleet.obs
    registered = obs.arm(lambda o: new in o.members())
    settled = obs.arm(lambda o: o.settled(members | {new}))
    t_cmd = fleet.scale(len(members) + 1)
    t_in = fleet.wait(f"join {trial}: {new} registered", registered)
    t_done = fleet.wait(f"join {trial}: settled", settled)
    events = [e for e in obs.events_since(t_in) if e.at <= t_done]
    keys = obs.keys
    acquired = [e for e in events if e.kind == "put" and e.key.startswith(keys.owners)]
    assignment = next((e.at for e in events if e.key == keys.assignment), None)
    return {
        "registered_ms": ms_between(t_cmd, t_in),
        "assignment_ms": ms_between(t_cmd, assignment),
        "first_acquired_ms": ms_between(t_cmd, min((e.at for e in acquired), default=None)),
        "settled_ms": ms_between(t_cmd, t_done),
        "rebalance_ms": ms_between(t_in, t_done),
        "segments_moved": len(acquired),
    }


def leave(fleet: FleetUp, members: set[str], new: str, trial: int) -> dict[str, Any]:
    obs = fleet.obs
    with obs.lock:
        owned = obs.owned_by(new)
    taken_over, settled = (
        obs.arm(owned_by_others(new, owned)),
        obs.arm(lambda o: o.settled(members)),
    )
    t_cmd = fleet.scale(len(members))
    t_owned = fleet.wait(f"leave {trial}: {new}'s segments taken over", taken_over)
    stamps = handover(obs, t_cmd, new, owned, t_owned)
    t_done = fleet.wait(f"leave {trial}: settled", settled)
    fleet.wait_slots(f"leave {trial}: slot gone", lambda rows: len(rows) == len(members))
    return {
        **since(t_cmd, stamps),
        "settled_ms": ms_between(t_cmd, t_done),
        "slot_gone_ms": ms_between(t_cmd, time.time()),
        "segments_moved": len(owned),
    }


def measure(fleets: Fleets, opts: Options) -> dict[str, Any]:
    fleet = fleets.new(opts.up)
    cold = fleet.up_and_settled(from_start=True)
    members = set(cold.pop("members"))
    cold.update(acquires(fleet, fleet.settled_at))
    print(f"cold start: {cold}", flush=True)
    prefix = next(iter(members)).rsplit("-", 1)[0]
    new = f"{prefix}-{len(members)}"  # `fleet scale N+1` starts slot N
    rate = keepalive_rate(fleet, opts.window)
    raw: dict[str, Any] = {"cold_start": cold, "keepalives_per_s": rate, "trials": []}
    for trial in range(opts.trials):
        j, j_cost = metered(fleet, rate, lambda t=trial: join(fleet, members, new, t))
        lv, l_cost = metered(fleet, rate, lambda t=trial: leave(fleet, members, new, t))
        raw["trials"].append({"trial": trial, "join": j, "join_etcd": j_cost,
                              "leave": lv, "leave_etcd": l_cost})  # fmt: skip
        print(
            f"trial {trial}: join settled {j['settled_ms']} ms (rebalance {j['rebalance_ms']}, "
            f"{j['segments_moved']} moved, ~{j_cost['requests_net']:.0f} etcd requests); "
            f"leave settled {lv['settled_ms']} ms (~{l_cost['requests_net']:.0f} requests)",
            flush=True,
        )
    raw["shutdown"] = fleet.stop()
    return raw


METRICS: list[tuple[str, str, str]] = [
    ("cold_start", "cold start", "spawn `fleet up` -> settled (etcd included)"),
    ("join_registered", "join: registered", "`fleet scale N+1` -> new member key"),
    ("join_assignment", "join: assignment", "`fleet scale N+1` -> next assignment"),
    ("join_settled", "**join**", "`fleet scale N+1` -> settled"),
    ("join_rebalance", "  of which rebalance", "new member key -> settled"),
    ("leave_gone", "leave: left", "`fleet scale N` -> its member key deleted"),
    ("leave_acquired", "**leave**", "`fleet scale N` -> its segments owned by others"),
    ("leave_first_call", "  first calls", "`fleet scale N` -> each had its first call"),
    ("leave_settled", "leave: settled", "`fleet scale N` -> settled"),
    ("leave_slot_gone", "leave: slot gone", "`fleet scale N` -> N slots in `fleet ps`"),
]


def columns(raw: dict[str, Any]) -> dict[str, list[float | None]]:
    trials = raw["trials"]
    cols: dict[str, list[Any]] = {"cold_start": [raw["cold_start"]["settled_ms"]]}
    for key in ("registered", "assignment", "settled", "rebalance"):
        cols[f"join_{key}"] = [t["join"][f"{key}_ms"] for t in trials]
    for key in ("gone", "acquired", "first_call", "settled", "slot_gone"):
        cols[f"leave_{key}"] = [t["leave"][f"{key}_ms"] for t in trials]
    return cols


def etcd_summary(raw: dict[str, Any]) -> dict[str, Any]:
    trials = raw["trials"]

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[(len(ordered) - 1) // 2] if ordered else 0.0

    return {
        f"{kind}_requests_net_median": median([t[f"{kind}_etcd"]["requests_net"] for t in trials])
        for kind in ("join", "leave")
    } | {
        "keepalives_per_s": round(raw["keepalives_per_s"], 2),
        "join_segments_moved": sorted({t["join"]["segments_moved"] for t in trials}),
    }


def render_markdown(report: dict[str, Any]) -> str:
    p, m, raw, e = report["parameters"], report["machine"], report["raw"], report["etcd"]
    cold = raw["cold_start"]
    lines = [
        f"# Join, leave and scale: fleet up, {p['workers']} workers, {p['segments']} segments",
        "",
        f"Command: `{report['command']}` (fleet: `{report['fleet_up_command']}`)",
        "",
        f"{report['finished']}; {machine_line(m)}; load average {m['load_average_start']} "
        f"before, {m['load_average_end']} after; {p['trials']} joins and leaves, interval "
        f"{p['interval']} s.",
        "",
        *summary_table(METRICS, report["summary"]),
        "",
        f"Cold start: {cold['acquires_per_segment']:.2f} acquires per segment (target 1.0, "
        f"at most {cold['acquires_max']} of one), {cold['assignments_written']} assignments.",
        "etcd requests per rebalance (unary calls plus watch and keepalive stream messages; "
        "the handlers' checkpoint commits meanwhile, counted from the watch, and the "
        f"fleet's steady {e['keepalives_per_s']:.1f} keepalives/s left out): join "
        f"{e['join_requests_net_median']:.0f}, leave {e['leave_requests_net_median']:.0f} "
        f"(median); a join moved {e['join_segments_moved']} segments.",
        f"Times are stamped when etcd's watch delivered the event "
        f"({rank_note(len(raw['trials']))}).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=8, help="fleet size (default 8)")
    parser.add_argument("--segments", type=int, default=64, help="segment count (default 64)")
    parser.add_argument("--trials", type=int, default=20, help="joins and leaves (default 20)")
    parser.add_argument("--interval", type=float, default=10.0, help="handler interval (10)")
    parser.add_argument("--lease-ttl", type=int, default=10, help="lease TTL, s (default 10)")
    parser.add_argument(
        "--window", type=float, default=3.0, help="keepalive rate window, s (default 3)"
    )
    parser.add_argument("--smoke", action="store_true", help="2 workers, 8 segments, 1 trial")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.segments, args.trials, args.window = 2, 8, 1, 1.0
    if args.workers < 1 or args.segments < args.workers + 1 or args.trials < 1:
        parser.error("need --workers >= 1, --segments > --workers and --trials >= 1")
    if args.window <= 0:
        parser.error("--window must be positive")
    up = UpOptions(args.workers, args.segments, args.lease_ttl, args.interval)
    return Options(up, args.trials, args.window, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    host = {**machine(), "load_average_start": load_average()}
    meter = CpuMeter()
    fleets = Fleets()
    code, raw = guarded("scale", lambda: measure(fleets, opts), fleets.close, fleets.context)
    if code != 0:
        return code
    report: dict[str, Any] = {
        "benchmark": "scale",
        "command": shlex_command("scale.py", argv),
        "fleet_up_command": shown_command(opts.up),
        "finished": finished(),
        "parameters": {
            "workers": opts.up.workers,
            "segments": opts.up.segments,
            "trials": opts.trials,
            "interval": opts.up.interval,
            "lease_ttl": opts.up.lease_ttl,
            "window_s": opts.window,
            "percentiles": "nearest-rank",
        },
        "machine": {**host, "load_average_end": load_average()},
        "summary": summarize_all(columns(raw)),
        "etcd": etcd_summary(raw),
        "cpu": meter.result(),
        "raw": raw,
    }
    publish(
        report, render_markdown(report), opts.out, f"scale-{opts.up.workers}x{opts.up.segments}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
