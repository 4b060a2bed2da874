"""Benchmark: segments moved by joins and leaves, fleet's assignment vs three common strategies.

For every segment count S in {64, 1024, 10000} and starting fleet size N in {8, 32, 100}
it draws a seeded random sequence of ``--events`` joins and leaves (membership stays
within [N/2, 2N]) and applies each strategy of ``strategies.py`` step by step, each from
its own previous result: fleet's, contiguous ranges over sorted ids (the original
example's ``DistributeEvenly``), a consistent-hash ring with 32 virtual nodes, and
round-robin over sorted ids. After every event it counts the segments that changed
owner, the fewest any balanced assignment could have moved from the same state
(``strategies.lower_bound``), and the balance (most and fewest segments of a member),
and times the strategy call. Pure computation: no etcd, no processes.

Writes ``<out>/movement.json`` (parameters, machine, the events, every step's numbers
and the summary) and ``<out>/movement.md`` (the summary table and the command);
``--quick`` (smaller sizes, fewer events, a few seconds) writes ``movement-quick.*``
instead, so that it never replaces the reference run.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# First: it puts this checkout on sys.path, so that the fleet measured is this one.
from common import BenchError, add_out_argument, git_revision, publish
from strategies import STRATEGIES, balance, lower_bound, moved, new_segments

FULL = ((64, 1024, 10000), (8, 32, 100), 50)  # segment counts, fleet sizes, events
QUICK = ((64, 256), (4, 8), 10)


@dataclass(frozen=True)
class Options:
    segments: tuple[int, ...]
    members: tuple[int, ...]
    events: int
    seed: int
    quick: bool
    out: Path


# -- the events -------------------------------------------------------------------------


def draw_events(
    rng: random.Random, start: int, count: int
) -> tuple[list[str], list[tuple[str, str]]]:
    """``start`` members, then ``count`` (``"join"`` | ``"leave"``, member) events.

    At the floor (N/2, at least 1) a join, at the ceiling (2N) a leave, else either
    with even odds. A leave picks a random member; a join brings back a member that left
    (a restarted worker keeps its id) or, at even odds or when none has left, a new one.
    Ids are random (``w-<8 hex>``), like host names: sorted order says nothing about
    who came first, which matters to the strategies that sort.
    """
    low, high = max(1, start // 2), 2 * start
    seen: set[str] = set()

    def fresh() -> str:
        while True:
            member = f"w-{rng.getrandbits(32):08x}"
            if member not in seen:
                seen.add(member)
                return member

    members = [fresh() for _ in range(start)]
    initial = list(members)
    gone: list[str] = []
    events: list[tuple[str, str]] = []
    for _ in range(count):
        n = len(members)
        join = n <= low or (n < high and rng.random() < 0.5)
        if join:
            back = bool(gone) and rng.random() < 0.5
            member = gone.pop(rng.randrange(len(gone))) if back else fresh()
            members.append(member)
        else:
            member = members.pop(rng.randrange(n))
            gone.append(member)
        events.append(("join" if join else "leave", member))
    return initial, events


# -- one strategy over one sequence ------------------------------------------------------


def check_valid(
    name: str, segments: int, members: Sequence[str], result: Mapping[str, Any]
) -> None:
    """Every segment given exactly once, to live members only: else the numbers are void."""
    owned = sorted(s for mine in result.values() for s in mine)
    if owned != list(range(segments)) or not set(result) <= set(members):
        raise BenchError(f"{name}: not an exact cover of {segments} segments by the live members")


def run_strategy(
    name: str, segments: int, initial: Sequence[str], events: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """Apply strategy `name` from nothing to ``initial``, then event by event; per step
    (after each event): moved, lower bound, new, members, most, fewest, ms."""
    strategy = STRATEGIES[name]
    members = list(initial)
    started = time.perf_counter()
    current = strategy(segments, members, {})
    first_ms = (time.perf_counter() - started) * 1000.0
    check_valid(name, segments, members, current)
    most, fewest = balance(current)
    initial_step = {"new": new_segments({}, current), "most": most, "fewest": fewest}
    steps: dict[str, list[Any]] = {
        k: [] for k in ("moved", "lower_bound", "new", "members", "most", "fewest", "ms")
    }
    for kind, member in events:
        if kind == "join":
            members.append(member)
        else:
            members.remove(member)
        bound = lower_bound(segments, current, members)
        started = time.perf_counter()
        after = strategy(segments, members, current)
        elapsed = (time.perf_counter() - started) * 1000.0
        check_valid(name, segments, members, after)
        most, fewest = balance(after)
        for key, value in (
            ("moved", moved(current, after)),
            ("lower_bound", bound),
            ("new", new_segments(current, after)),
            ("members", len(members)),
            ("most", most),
            ("fewest", fewest),
            ("ms", round(elapsed, 3)),
        ):
            steps[key].append(value)
        current = after
    return {"initial": {**initial_step, "ms": round(first_ms, 3)}, "steps": steps}


def summarize(segments: int, run: Mapping[str, Any]) -> dict[str, Any]:
    """Totals over the events, and the balance over the steps where it means something.

    max/min is taken over the steps with at least as many segments as members (with
    fewer, someone idles under any strategy); a step in which a member had nothing
    although it could have had something counts as ``idle`` and makes the worst
    max/min infinite (``None`` in JSON), the mean being over the other steps. The most
    a member holds over ``ceil(segments / members)`` is taken over every step.
    """
    st = run["steps"]
    total_moved, total_bound = sum(st["moved"]), sum(st["lower_bound"])
    ratios: list[float] = []
    idle = 0
    peaks: list[float] = []  # most / ceil(segments / members): defined at every step
    for n, most, fewest in zip(st["members"], st["most"], st["fewest"], strict=True):
        peaks.append(most / -(-segments // n))
        if segments < n:
            continue
        if fewest == 0:
            idle += 1
        else:
            ratios.append(most / fewest)
    return {
        "moved": total_moved,
        "lower_bound": total_bound,
        "moved_over_bound": round(total_moved / total_bound, 3) if total_bound else None,
        "new": run["initial"]["new"] + sum(st["new"]),
        "balance_worst": None if idle or not ratios else round(max(ratios), 3),
        "balance_mean": round(statistics.fmean(ratios), 3) if ratios else None,
        "balance_steps": len(ratios) + idle,
        "idle_steps": idle,
        "max_over_ceil_worst": round(max(peaks), 3),
        "ms_per_step_mean": round(statistics.fmean(st["ms"]), 3),
        "ms_per_step_max": round(max(st["ms"]), 3),
    }


def run_cell(segments: int, start: int, count: int, seed: int) -> dict[str, Any]:
    # A string seed is hashed with SHA-512, not salted: the same events in every run.
    rng = random.Random(f"{seed}:{segments}:{start}")
    initial, events = draw_events(rng, start, count)
    runs = {name: run_strategy(name, segments, initial, events) for name in STRATEGIES}
    summary = {name: summarize(segments, run) for name, run in runs.items()}
    baseline = summary["fleet"]["moved"]
    for s in summary.values():  # the same events, so the plainest comparison there is
        s["moved_over_fleet"] = round(s["moved"] / baseline, 3) if baseline else None
    return {
        "segments": segments,
        "members": start,
        "initial_members": initial,
        "events": [list(e) for e in events],
        "runs": runs,
        "summary": summary,
    }


# -- report -----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fmt(v: float | None, digits: int = 2, none: str = "∞") -> str:
    return none if v is None else f"{v:.{digits}f}"


def worst_cell(s: Mapping[str, Any]) -> str:
    """The worst max/min: '-' without a step to judge, '∞' when a member idled."""
    if not s["balance_steps"]:
        return "-"
    return fmt(s["balance_worst"])


def render_markdown(report: dict[str, Any]) -> str:
    p, m = report["parameters"], report["machine"]
    lines = [
        "# Movement comparison: fleet's assignment vs contiguous ranges, hash ring, round-robin",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['finished']}; {m['cpu_model']}, {m['cpu_count']} CPUs, Python {m['python']}, "
        f"{m['platform']}, fleet {m['fleet_revision']}; load average (1 min) "
        f"{m['load_average_1m_start']:.1f} before, {m['load_average_1m_end']:.1f} after; "
        f"{p['events']} events per sequence (seed {p['seed']}), {p['virtual_nodes']} virtual "
        f"nodes per member on the ring; {report['wall_s']:.1f} s in all.",
        "",
        "| S | N | strategy | moved | lower bound | moved / bound | moved / fleet's | new "
        "| max/min worst | max/min mean | idle steps | max/ceil worst | ms/step |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for cell in report["cells"]:
        for name, s in cell["summary"].items():
            lines.append(
                f"| {cell['segments']} | {cell['members']} | {name} | {s['moved']} | "
                f"{s['lower_bound']} | {fmt(s['moved_over_bound'], 2, '-')} | "
                f"{fmt(s['moved_over_fleet'], 2, '-')} | "
                f"{s['new']} | "
                f"{worst_cell(s)} | "
                f"{fmt(s['balance_mean'], 2, '-')} | {s['idle_steps']} | "
                f"{s['max_over_ceil_worst']:.2f} | {s['ms_per_step_mean']:.2f} |"
            )
    lines += [
        "",
        "S segments; N members at the start, then joins and leaves at random (seeded) within "
        "[N/2, 2N], the same sequence for every strategy; each strategy goes from its own "
        "previous result. **moved**: segments that had an owner before an event and a "
        "different one after, summed over the events. **lower bound**: the fewest any "
        "balanced assignment (every member floor or ceil of S/n) could have moved from that "
        "strategy's own previous state, summed (see `lower_bound` in `bench/strategies.py`); "
        "an unbalanced strategy (the hash ring) can move fewer, and its own unbalanced states "
        "raise its bound (rebalancing them would cost moves). **moved / fleet's**: against "
        "fleet's total over the same events. **new**: segments given out "
        "with no previous owner (the initial assignment), not moves. **max/min**: most over "
        "fewest segments of a member, over the steps with at least as many segments as "
        "members; ∞ when a member had none at some such step (counted in **idle steps**), the "
        "mean being over the other steps. **max/ceil**: most segments of a member over "
        "ceil(S/n), the most a balanced assignment gives anyone (1.00: balanced at the top; "
        "defined at every step, also with more members than segments). **ms/step**: mean wall "
        "time of the strategy's call (the maximum is in the JSON), not of the counting; the "
        "ring caches each member's and segment's hashes. Times vary with the machine's load.",
    ]
    return "\n".join(lines) + "\n"


def build_report(opts: Options, command: str, load_start: float) -> dict[str, Any]:
    started = time.monotonic()
    cells = [
        run_cell(segments, start, opts.events, opts.seed)
        for segments in opts.segments
        for start in opts.members
    ]
    wall = time.monotonic() - started
    return {
        "benchmark": "movement",
        "command": command,
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(wall, 1),
        "parameters": {
            "segments": list(opts.segments),
            "members": list(opts.members),
            "events": opts.events,
            "seed": opts.seed,
            "quick": opts.quick,
            "strategies": list(STRATEGIES),
            "virtual_nodes": 32,
        },
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "fleet_revision": git_revision(),
            "load_average_1m_start": load_start,
            "load_average_1m_end": round(os.getloadavg()[0], 2),
        },
        "cells": cells,
    }


# -- entry ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="S in {64, 256}, N in {4, 8}, 10 events: a few seconds (writes movement-quick.*)",
    )
    parser.add_argument("--seed", type=int, default=0, help="event sequence seed (default 0)")
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help="joins and leaves per sequence (default 50; 10 with --quick)",
    )
    add_out_argument(parser)
    args = parser.parse_args(argv)
    segments, members, events = QUICK if args.quick else FULL
    if args.events is not None:
        events = args.events
    if events < 1:
        parser.error(f"--events must be at least 1, got {events}")
    return Options(segments, members, events, args.seed, args.quick, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    command = shlex.join(["python", "bench/movement.py", *argv])
    try:
        report = build_report(opts, command, round(os.getloadavg()[0], 2))
    except BenchError as exc:
        print(f"movement: {exc}", file=sys.stderr)
        return 1
    stem = "movement-quick" if opts.quick else "movement"
    publish(report, render_markdown(report), opts.out, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
