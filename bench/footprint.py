"""Benchmark: what a settled fleet costs the host and etcd, and what importing a worker costs.

For each handler interval of ``--intervals`` (default ``3600,0.5``: idle, where each
segment's handler runs once when acquired, and busy, the demo committing every 0.5 s per
segment) it starts ``fleet up --workers N --segments S``, waits until settled, stops
watching etcd itself, and over ``--window`` seconds reads, per process (psutil,
``/proc/<pid>/io``): resident and unique memory, threads, open files, CPU, and the bytes
read and written (pipes and sockets included) of every worker, the supervisor and etcd;
and etcd's own counters (``/metrics``): gRPC bytes in and out, keepalive messages, watch
messages sent and requests by method, per worker and minute. Then the import cost:
``python -X importtime -c "import fleet.work.worker"`` (its largest entries) and the wall
time of that import against ``python -c pass``.

Writes ``<out>/footprint-<N>x<S>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from common import (
    REPO_ROOT,
    BenchError,
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
from observe import delta, scrape

MIB = 2**20


@dataclass(frozen=True)
class Options:
    workers: int
    segments: int
    intervals: tuple[float, ...]
    window: float
    import_runs: int
    out: Path


def sample(pid: int) -> dict[str, Any]:
    proc = psutil.Process(pid)
    with proc.oneshot():
        mem = proc.memory_full_info()
        io = proc.io_counters()
        cpu = proc.cpu_times()
        return {
            "rss": mem.rss,
            "uss": mem.uss,
            "threads": proc.num_threads(),
            "fds": proc.num_fds(),
            "cpu_s": cpu.user + cpu.system,
            "rchar": io.read_chars,
            "wchar": io.write_chars,
        }


def per_process(before: dict[str, Any], after: dict[str, Any], window: float) -> dict[str, Any]:
    per_min = 60.0 / window
    return {
        "rss_mib": round(after["rss"] / MIB, 1),
        "uss_mib": round(after["uss"] / MIB, 1),
        "threads": after["threads"],
        "fds": after["fds"],
        "cpu_percent": round(100.0 * (after["cpu_s"] - before["cpu_s"]) / window, 2),
        "read_kib_per_min": round((after["rchar"] - before["rchar"]) * per_min / 1024, 1),
        "write_kib_per_min": round((after["wchar"] - before["wchar"]) * per_min / 1024, 1),
    }


def pids(fleet: FleetUp) -> dict[str, int]:
    answer = fleet.ask({"cmd": "ps"})
    found = {f"worker {r['slot']}": int(r["pid"]) for r in answer["slots"]}
    assert fleet.popen is not None
    found["supervisor"] = fleet.popen.pid
    server = answer.get("etcd_server") or {}
    if server.get("pid"):
        found["etcd"] = int(server["pid"])
    return found


def phase(fleets: Fleets, opts: Options, interval: float) -> dict[str, Any]:
    fleet = fleets.new(UpOptions(opts.workers, opts.segments, interval=interval))
    cold = fleet.up_and_settled()
    endpoint = fleet.endpoint
    fleet.obs.close()  # our own watch must not count as the fleet's traffic
    fleet.observer = None
    time.sleep(min(2.0, opts.window))  # the first calls after the acquires settle down
    who = pids(fleet)
    try:
        before = {name: sample(pid) for name, pid in who.items()}
        m0, t0 = scrape(endpoint), time.monotonic()
        time.sleep(opts.window)
        after = {name: sample(pid) for name, pid in who.items()}
        m1, t1 = scrape(endpoint), time.monotonic()
    except psutil.Error as exc:
        raise BenchError(f"a process of the fleet went away while measured: {exc}") from None
    window = t1 - t0
    procs = {name: per_process(before[name], after[name], window) for name in who}
    moved = delta(m1, m0)
    per_worker_min = 60.0 / window / opts.workers
    workers = [v for k, v in procs.items() if k.startswith("worker")]

    def med(key: str) -> float:
        return round(float(statistics.median(w[key] for w in workers)), 2)

    result = {
        "interval": interval,
        "cold_start_settled_ms": cold["settled_ms"],
        "window_s": round(window, 2),
        "processes": procs,
        "worker_median": {k: med(k) for k in workers[0]},
        "etcd_per_worker_per_min": {
            "bytes_in": round(moved.get("bytes_in", 0.0) * per_worker_min),
            "bytes_out": round(moved.get("bytes_out", 0.0) * per_worker_min),
            "keepalives": round(moved.get("messages_in:LeaseKeepAlive", 0.0) * per_worker_min, 1),
            "watch_messages_out": round(moved.get("messages_out:Watch", 0.0) * per_worker_min, 1),
            "requests": {
                k.split(":", 1)[1]: round(v * per_worker_min, 1)
                for k, v in moved.items()
                if k.startswith("requests:")
            },
        },
        "shutdown": fleet.stop(),
    }
    return result


def import_cost(runs: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PYTHONSTARTUP", None)

    def wall(code: str) -> float:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=REPO_ROOT)
        return time.monotonic() - t0

    bare = [wall("pass") for _ in range(runs)]
    full = [wall("import fleet.work.worker") for _ in range(runs)]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import fleet.work.worker"],
        env=env, capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )  # fmt: skip
    entries: list[dict[str, Any]] = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, cumulative, raw_name = line[len("import time:") :].split("|")
        name = raw_name.strip()
        depth = (len(raw_name) - len(raw_name.lstrip()) - 1) // 2  # two spaces a level
        entries.append({"module": name, "depth": depth, "self_ms": int(self_us) / 1000,
                        "cumulative_ms": int(cumulative) / 1000})  # fmt: skip
    packages: dict[str, list[float]] = {}
    for e in entries:
        packages.setdefault(e["module"].split(".")[0], []).append(e["self_ms"])
    by_package = sorted(
        (
            {"package": k, "self_ms": round(sum(v), 1), "modules": len(v)}
            for k, v in packages.items()
        ),
        key=lambda p: -p["self_ms"],
    )
    by_self = sorted(entries, key=lambda e: -e["self_ms"])
    total = next((e for e in entries if e["module"] == "fleet.work.worker"), None)
    return {
        "python_startup_ms": round(statistics.median(bare) * 1000, 1),
        "with_import_ms": round(statistics.median(full) * 1000, 1),
        "import_ms": round((statistics.median(full) - statistics.median(bare)) * 1000, 1),
        "importtime_total_ms": total["cumulative_ms"] if total else None,
        "modules": len(entries),
        "packages": by_package[:10],
        "top_self": by_self[:10],
        "runs": runs,
    }


def measure(fleets: Fleets, opts: Options) -> dict[str, Any]:
    phases = []
    for interval in opts.intervals:
        p = phase(fleets, opts, interval)
        phases.append(p)
        w = p["worker_median"]
        e = p["etcd_per_worker_per_min"]
        print(
            f"interval {interval:g}: worker RSS {w['rss_mib']} MiB, {w['threads']} threads, "
            f"CPU {w['cpu_percent']}%; etcd bytes per worker per minute in {e['bytes_in']}, "
            f"out {e['bytes_out']}",
            flush=True,
        )
    imports = import_cost(opts.import_runs)
    print(f"import fleet.work.worker: {imports['import_ms']} ms", flush=True)
    return {"phases": phases, "imports": imports}


def render_markdown(report: dict[str, Any]) -> str:
    p, m, raw = report["parameters"], report["machine"], report["raw"]
    lines = [
        f"# Footprint: fleet up, {p['workers']} workers, {p['segments']} segments",
        "",
        f"Command: `{report['command']}` (fleet: `{report['fleet_up_command']}`, each interval)",
        "",
        f"{report['finished']}; {machine_line(m)}; load average {m['load_average_start']} "
        f"before, {m['load_average_end']} after; {p['window_s']:g} s measuring window.",
        "",
        "| interval | worker RSS MiB | USS MiB | threads | fds | CPU % | supervisor RSS MiB "
        "| etcd RSS MiB | etcd bytes in/out per worker-min | keepalives per worker-min "
        "| watch msgs per worker-min |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ph in raw["phases"]:
        w, e, procs = ph["worker_median"], ph["etcd_per_worker_per_min"], ph["processes"]
        etcd_rss = procs.get("etcd", {}).get("rss_mib", "-")
        lines.append(
            f"| {ph['interval']:g} s | {w['rss_mib']} | {w['uss_mib']} | {w['threads']:g} | "
            f"{w['fds']:g} | {w['cpu_percent']} | {procs['supervisor']['rss_mib']} | "
            f"{etcd_rss} | {e['bytes_in']} / {e['bytes_out']} | {e['keepalives']} | "
            f"{e['watch_messages_out']} |"
        )
    imp = raw["imports"]
    lines += [
        "",
        "Worker values are the median over the workers; bytes per worker-minute are etcd's "
        "gRPC totals over the window divided by the workers (the supervisor's client is "
        "idle); a worker's `/proc/<pid>/io` (pipes to the supervisor included) is in the JSON.",
        "",
        f"Import: `python -c 'import fleet.work.worker'` takes {imp['with_import_ms']} ms "
        f"against {imp['python_startup_ms']} ms for `python -c pass` (median of "
        f"{imp['runs']}): {imp['import_ms']} ms for {imp['modules']} modules. Where it goes "
        "(`-X importtime` self times, summed per top-level package, and the slowest modules):",
        "",
        "| package | self ms | modules | slowest module | self ms |",
        "| --- | ---: | ---: | --- | ---: |",
        *(
            f"| `{a['package']}` | {a['self_ms']:.1f} | {a['modules']} | `{b['module']}` "
            f"| {b['self_ms']:.1f} |"
            for a, b in zip(imp["packages"], imp["top_self"], strict=False)
        ),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=8, help="fleet size (default 8)")
    parser.add_argument("--segments", type=int, default=64, help="segment count (default 64)")
    parser.add_argument(
        "--intervals", default="3600,0.5", help="handler intervals, one fleet each (3600,0.5)"
    )
    parser.add_argument("--window", type=float, default=60.0, help="measuring window, s (60)")
    parser.add_argument("--import-runs", type=int, default=5, help="import timings (default 5)")
    parser.add_argument(
        "--smoke", action="store_true", help="2 workers, 8 segments, idle only, 2 s, 1 import"
    )
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.segments, args.intervals = 2, 8, "3600"
        args.window, args.import_runs = 2.0, 1
    try:
        intervals = tuple(float(v) for v in args.intervals.split(","))
    except ValueError:
        parser.error(f"--intervals {args.intervals!r}: expected numbers separated by commas")
    if any(v <= 0 for v in intervals) or args.window <= 0 or args.import_runs < 1:
        parser.error("intervals and --window must be positive, --import-runs at least 1")
    if args.workers < 1 or args.segments < args.workers:
        parser.error("need --workers >= 1 and --segments >= --workers")
    return Options(args.workers, args.segments, intervals, args.window, args.import_runs, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    host = {**machine(), "load_average_start": load_average()}
    fleets = Fleets()
    code, raw = guarded("footprint", lambda: measure(fleets, opts), fleets.close, fleets.context)
    if code != 0:
        return code
    report: dict[str, Any] = {
        "benchmark": "footprint",
        "command": shlex_command("footprint.py", argv),
        "fleet_up_command": shown_command(
            UpOptions(opts.workers, opts.segments, interval=opts.intervals[0])
        ),
        "finished": finished(),
        "parameters": {
            "workers": opts.workers,
            "segments": opts.segments,
            "intervals": list(opts.intervals),
            "window_s": opts.window,
        },
        "machine": {**host, "load_average_end": load_average()},
        "raw": raw,
    }
    stem = f"footprint-{opts.workers}x{opts.segments}"
    publish(report, render_markdown(report), opts.out, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
