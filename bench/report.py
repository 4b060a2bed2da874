"""docs/benchmarks.md from the results of `bench/run.py`: the headline, the growth from
the small to the large fleet, and each benchmark's own tables, with charts when
matplotlib is installed. Pure formatting of the results dictionary (no measuring).

Every table carries a caption naming the machine, the date, the versions (fleet
revision, etcd, Python) and the command that produced it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import machine_line
from stats import cell

Results = dict[str, Any]
CHARTS_MISSING = "matplotlib is not installed (`pip install -e '.[bench]'`): tables only, no charts"

# (label, bench, summary key): one row of the headline, median and p99 in ms
HEADLINE: list[tuple[str, str, str]] = [
    ("kill -9 of a non-leader under `fleet up` -> all its segments owned", "failover",
     "acquired_follower"),
    ("  -> and each one's first call", "failover", "first_call_follower"),
    ("kill -9 of the leader under `fleet up` -> all its segments owned", "failover",
     "acquired_leader"),
    ("  -> and each one's first call", "failover", "first_call_leader"),
    ("kill -9 without a supervisor (lease TTL) -> all owned", "handoff", "kill9_acquired"),
    ("graceful handoff: SIGTERM -> all its segments owned", "handoff", "acquired"),
    ("  -> and each one's first call", "handoff", "first_call"),
    ("leave: `fleet scale N-1` -> its segments owned", "join", "leave_acquired"),
    ("join: `fleet scale N+1` -> settled", "join", "join_settled"),
    ("  of which the rebalance (member key -> settled)", "join", "join_rebalance"),
    ("cold start: `fleet up` -> settled, etcd included", "coldstart", "settled"),
]  # fmt: skip

# (label, summary key or a function of the report): the growth table
GROWTH: list[tuple[str, str | Callable[[dict[str, Any]], float | None]]] = [
    ("cold start -> settled, ms", "cold_start"),
    ("join -> settled, ms", "join_settled"),
    ("join rebalance, ms", "join_rebalance"),
    ("leave -> its segments owned, ms", "leave_acquired"),
    ("etcd requests per join", lambda r: r["etcd"]["join_requests_net_median"]),
    ("etcd requests per leave", lambda r: r["etcd"]["leave_requests_net_median"]),
    ("acquires per segment at cold start",
     lambda r: r["raw"]["cold_start"]["acquires_per_segment"]),
]  # fmt: skip

SECTIONS = [
    ("failover", "failover", "kill -9 under `fleet up`"),
    ("handoff", "handoff", "Graceful handoff, join and kill -9 between plain workers"),
    ("join", "scale", "Join and leave under `fleet up`"),
    ("scale", "scale", "Join and leave, larger fleet"),
    ("coldstart", "coldstart", "Cold start"),
    ("footprint", "footprint", "Footprint"),
    ("keepalive", "keepalive", "Keepalive round trip under a commit flood"),
    ("movement", "movement", "Segments moved: fleet vs other strategies"),
]


def report_of(results: Results, name: str) -> dict[str, Any] | None:
    bench = results["benches"].get(name)
    return bench.get("report") if bench else None


def caption(results: Results, command: str | None = None) -> str:
    m = results["machine"]
    return (
        f"_{results['started']}; {machine_line(m)}; load average {m['load_average_start']} "
        f"before the run, {m.get('load_average_end', '?')} after; "
        f"`{command or results['command']}` ({results['mode']} mode)._"
    )


def headline(results: Results) -> list[str]:
    lines = [
        "| measure | fleet | n | median ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for label, bench, key in HEADLINE:
        rep = report_of(results, bench)
        s = rep["summary"].get(key) if rep else None
        if rep is None or s is None:
            lines.append(f"| {label} | - | - | not measured | - |")
            continue
        p = rep["parameters"]
        setup = f"{p['workers']} x {p['segments']}, TTL {p.get('lease_ttl', 10)} s"
        lines.append(
            f"| {label} | {setup} | {s['n']} | {cell(s['median_ms'])} | {cell(s['p99_ms'])} |"
        )
    lines += steps_line(results) + extras(results)
    return lines


def steps_line(results: Results) -> list[str]:
    rep = report_of(results, "failover")
    if rep is None:
        return []
    s = rep["summary"]
    parts = [
        f"{label} {cell(s[key]['median_ms'])}"
        for key, label, _ in _module("failover").STEP_METRICS
        if key in s
    ]
    return ["", "kill -9 under `fleet up`, each step alone (median ms): " + "; ".join(parts) + "."]


def extras(results: Results) -> list[str]:
    out = []
    cold = report_of(results, "coldstart")
    if cold is not None:
        a = cold["acquires"]
        out.append(
            f"Acquires per segment during a cold start (target 1.0): mean "
            f"{a['per_segment_mean']:.2f}, worst {a['per_segment_worst']:.2f}."
        )
    foot = report_of(results, "footprint")
    if foot is not None:
        idle = foot["raw"]["phases"][0]
        w, e = idle["worker_median"], idle["etcd_per_worker_per_min"]
        imp = foot["raw"]["imports"]
        out.append(
            f"Idle worker: {w['rss_mib']} MiB RSS ({w['uss_mib']} MiB its own), "
            f"{w['threads']:g} threads; supervisor {idle['processes']['supervisor']['rss_mib']} "
            f"MiB; etcd traffic per worker and minute {e['bytes_in']} B in, {e['bytes_out']} B "
            f"out ({e['keepalives']} keepalives); `import fleet.work.worker` {imp['import_ms']} ms."
        )
    return [""] + out if out else []


def growth(results: Results) -> list[str]:
    small, large = report_of(results, "join"), report_of(results, "scale")
    if small is None or large is None:
        return ["Not measured (both scale runs are needed)."]

    def size(r: dict[str, Any]) -> str:
        return f"{r['parameters']['workers']} x {r['parameters']['segments']}"

    def value(
        r: dict[str, Any], how: str | Callable[[dict[str, Any]], float | None]
    ) -> float | None:
        if callable(how):
            return how(r)
        s = r["summary"].get(how)
        return s["median_ms"] if s else None

    lines = [f"| median | {size(small)} | {size(large)} | growth |", "| --- | ---: | ---: | ---: |"]
    for label, how in GROWTH:
        a, b = value(small, how), value(large, how)
        ratio = f"x{b / a:.1f}" if a and b is not None else "-"
        lines.append(f"| {label} | {cell(a)} | {cell(b)} | {ratio} |")
    return lines


def _module(name: str) -> Any:
    return importlib.import_module(name)


def section(results: Results, name: str, module: str) -> list[str]:
    bench = results["benches"].get(name)
    if bench is None:
        return ["Not run in this mode."]
    rep = bench.get("report")
    if rep is None:
        return [f"Failed (exit {bench['exit']}):", "", "```", bench.get("error", ""), "```"]
    # As run.py ran it (its --out was a temporary directory).
    text = _module(module).render_markdown({**rep, "command": bench["command"]})
    body = text.split("\n", 1)[1] if text.startswith("# ") else text  # our own heading
    return [body.strip()]


TARGETS = Path(__file__).with_name("targets.md")


def targets() -> list[str]:
    """The issue's targets against what was measured, and what would close each gap:
    written by hand in bench/targets.md (the judgement is not generated), kept beside
    the numbers it talks about."""
    if not TARGETS.exists():
        return []
    return [TARGETS.read_text(encoding="utf-8").strip(), ""]


def render(results: Results, charts: dict[str, str], chart_note: str | None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py` (see [bench/README.md](../bench/README.md)); the raw "
        f"numbers are in `bench/results/{results['date']}"
        f"{'' if results['mode'] == 'full' else '-' + results['mode']}.json`. "
        "Numbers depend heavily on the machine and on what else runs on it: each table says "
        "where and when it was measured, with the load average.",
        "",
        caption(results),
        "",
        "## Headline",
        "",
        *headline(results),
        "",
        caption(results),
        "",
        *targets(),
        "## Growth from the small to the large fleet",
        "",
        *growth(results),
        "",
        caption(results),
        "",
    ]
    if chart_note:
        lines += [chart_note, ""]
    for name, title in (
        ("steps", "kill -9 under fleet up, step by step"),
        ("distributions", "distributions"),
        ("growth", "growth"),
        ("movement", "movement"),
    ):
        if name in charts:
            lines += [f"![{title}]({charts[name]})", ""]
    for name, module, title in SECTIONS:
        lines += [f"## {title}", "", *section(results, name, module), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_docs(results: Results, docs: Path) -> tuple[list[str], list[str]]:
    """Write `<docs>/benchmarks.md` (and the charts); the headline table and notes."""
    docs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    try:
        import charts as charts_mod  # matplotlib inside
    except ImportError:
        charts: dict[str, str] = {}
        chart_note: str | None = CHARTS_MISSING
        notes.append(f"run.py: {CHARTS_MISSING}")
    else:
        charts = charts_mod.draw(results, docs / "benchmarks")
        charts = {k: f"benchmarks/{v}" for k, v in charts.items()}
        chart_note = None
    path = docs / "benchmarks.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(results, charts, chart_note), encoding="utf-8")
    tmp.replace(path)
    return headline(results), notes
