"""Run every benchmark, write one results file and regenerate docs/benchmarks.md.

``python bench/run.py [--quick | --smoke] [--out DIR] [--docs DIR] [--only NAMES]`` runs,
each as its own process (``python bench/<name>.py``, so each one's cleanup and leak check
stand alone): the movement comparison, cold start, kill -9 under ``fleet up`` (non-leader
and leader kills), handoff between plain workers (SIGTERM, join, kill -9 against the
TTL), join and leave under ``fleet up`` at two sizes (8 x 64 and 64 x 4096; 16 x 256 with
``--quick``), the footprint and the keepalive round trip under a commit flood (not in
``--smoke``). Full mode: 20 trials wherever a trial repeats, and a long
while (the TTL-bound kills alone take minutes); ``--quick``: a few trials each, under
3 minutes on a quiet 2-core machine; ``--smoke``: 2 workers x 8 segments, one trial each
(what the test suite runs).

Writes ``<out>/<YYYY-MM-DD>.json`` (``-quick``/``-smoke`` added in those modes, so a quick
run never replaces the day's full one): the machine, the versions, the command, and every
benchmark's full report. Regenerates ``<docs>/benchmarks.md`` with the tables and, when
matplotlib is installed (``pip install -e '.[bench]'``), PNG charts in
``<docs>/benchmarks/``. A benchmark that fails is reported (exit 1) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import REPO_ROOT, cpu_seconds, load_average, machine, shlex_command, tail
from report import write_docs

BENCH = REPO_ROOT / "bench"
MODES = ("full", "quick", "smoke")
TIMEOUTS = {"full": 3600.0, "quick": 300.0, "smoke": 240.0}


@dataclass(frozen=True)
class Bench:
    """One run of one script: its name in the results, the script, arguments per mode
    (None: not run in that mode), and the stem of the report it writes per mode."""

    name: str
    script: str
    args: dict[str, list[str] | None]
    stems: dict[str, str]


PLAN: list[Bench] = [
    Bench(
        "movement", "movement.py",
        {"full": [], "quick": ["--quick"], "smoke": ["--quick"]},
        {"full": "movement", "quick": "movement-quick", "smoke": "movement-quick"},
    ),
    Bench(
        "coldstart", "coldstart.py",
        {"full": ["--trials", "20"], "quick": ["--trials", "2"], "smoke": ["--smoke"]},
        {"full": "coldstart-8x64", "quick": "coldstart-8x64", "smoke": "coldstart-2x8"},
    ),
    Bench(
        "failover", "failover.py",
        {
            "full": ["--kills", "20", "--leader-kills", "20"],
            "quick": ["--kills", "4", "--leader-kills", "3"],
            "smoke": ["--smoke"],
        },
        {"full": "failover", "quick": "failover", "smoke": "failover"},
    ),
    Bench(
        "handoff", "handoff.py",
        {
            "full": ["--workers", "8", "--rounds", "20", "--kill9", "20", "--interval", "0.5"],
            "quick": ["--workers", "8", "--rounds", "4", "--kill9", "2", "--lease-ttl", "3",
                      "--interval", "0.5"],
            "smoke": ["--smoke", "--interval", "0.5"],
        },
        {"full": "handoff-8w", "quick": "handoff-8w", "smoke": "handoff-2w"},
    ),
    Bench(
        "join", "scale.py",
        {
            "full": ["--trials", "20"],
            "quick": ["--trials", "3", "--window", "2"],
            "smoke": ["--smoke"],
        },
        {"full": "scale-8x64", "quick": "scale-8x64", "smoke": "scale-2x8"},
    ),
    Bench(
        "scale", "scale.py",
        {
            "full": ["--workers", "64", "--segments", "4096", "--trials", "3", "--window", "5"],
            "quick": ["--workers", "16", "--segments", "256", "--trials", "1", "--window", "2"],
            "smoke": None,
        },
        {"full": "scale-64x4096", "quick": "scale-16x256", "smoke": ""},
    ),
    Bench(
        "footprint", "footprint.py",
        {
            "full": ["--window", "60"],
            "quick": ["--window", "4", "--import-runs", "3"],
            "smoke": ["--smoke"],
        },
        {"full": "footprint-8x64", "quick": "footprint-8x64", "smoke": "footprint-2x8"},
    ),
    Bench(
        "keepalive", "keepalive.py",
        {"full": [], "quick": ["--quick"], "smoke": None},
        {"full": "keepalive", "quick": "keepalive", "smoke": ""},
    ),
]  # fmt: skip


def run_one(bench: Bench, mode: str, raw_dir: Path) -> dict[str, Any]:
    """Run one benchmark as a child process; its report, or why there is none."""
    args = bench.args[mode]
    assert args is not None
    cmd = [sys.executable, str(BENCH / bench.script), *args, "--out", str(raw_dir)]
    log = raw_dir / f"{bench.name}.log"
    t0 = time.monotonic()
    cpu0 = cpu_seconds(resource.RUSAGE_CHILDREN)
    status: int | str
    with log.open("wb") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            status = child.wait(timeout=TIMEOUTS[mode])
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)  # its own cleanup stops what it started
            try:
                code = child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
                code = child.wait()
            status = f"timeout after {TIMEOUTS[mode]:.0f} s (exit {code})"
        except KeyboardInterrupt:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=120)
            raise
    result: dict[str, Any] = {
        "command": shlex_command(bench.script, args),
        "seconds": round(time.monotonic() - t0, 1),
        # CPU time of the benchmark and all it started (every process is reaped by then):
        # with the wall time, how busy the machine was with this run rather than others.
        "cpu_s": round(cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0, 1),
        "exit": status,
    }
    path = raw_dir / f"{bench.stems[mode]}.json"
    if status == 0 and path.exists():
        result["report"] = json.loads(path.read_text())
    else:
        result["error"] = tail(log, 25)
    return result


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a few trials each: < 3 minutes")
    group.add_argument("--smoke", action="store_true", help="2 workers x 8 segments, 1 trial")
    parser.add_argument(
        "--out", type=Path, default=BENCH / "results", help="results directory (bench/results)"
    )
    parser.add_argument(
        "--docs", type=Path, default=REPO_ROOT / "docs",
        help="where benchmarks.md and benchmarks/*.png go (docs)",
    )  # fmt: skip
    parser.add_argument(
        "--render", type=Path, metavar="RESULTS",
        help="run nothing: regenerate the docs from this results file",
    )  # fmt: skip
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {','.join(b.name for b in PLAN)}"
    )
    args = parser.parse_args(argv)
    names = {b.name for b in PLAN}
    args.only = [n for n in args.only.split(",") if n]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: expected some of {','.join(sorted(names))}")
    args.mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render is not None:
        try:
            results = json.loads(args.render.read_text())
        except (OSError, ValueError) as exc:
            print(f"run.py: --render {args.render}: {exc}", file=sys.stderr)
            return 2
        _, notes = write_docs(results, args.docs)
        for note in notes:
            print(note)
        print(f"wrote {args.docs / 'benchmarks.md'} from {args.render}")
        return 0
    mode = args.mode
    started = datetime.now(UTC)
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d"),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "mode": mode,
        "command": shlex_command("run.py", argv),
        "machine": {**machine(), "load_average_start": load_average()},
        "benches": {},
    }
    plan = [b for b in PLAN if b.args[mode] is not None and (not args.only or b.name in args.only)]
    with tempfile.TemporaryDirectory(prefix="fleet-bench-run-") as tmp:
        raw_dir = Path(tmp)
        for bench in plan:
            print(f"{bench.name}: running {shlex_command(bench.script, bench.args[mode] or [])}",
                  flush=True)  # fmt: skip
            one = run_one(bench, mode, raw_dir)
            results["benches"][bench.name] = one
            status = "ok" if "report" in one else f"FAILED (exit {one['exit']})"
            print(f"{bench.name}: {status} in {one['seconds']:.0f} s ({one['cpu_s']:.0f} s CPU)",
                  flush=True)  # fmt: skip
            if "error" in one:
                print(one["error"], file=sys.stderr, flush=True)
    results["machine"]["load_average_end"] = load_average()
    results["wall_s"] = round(time.monotonic() - t0, 1)
    suffix = "" if mode == "full" else f"-{mode}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{results['date']}{suffix}.json"
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    tmp_path.replace(path)
    headline, notes = write_docs(results, args.docs)
    print("\n" + "\n".join(headline))
    for note in notes:
        print(note)
    print(f"\nwrote {path} and {args.docs / 'benchmarks.md'} in {results['wall_s']:.0f} s")
    failed = [n for n, r in results["benches"].items() if "report" not in r]
    if failed:
        print(f"run.py: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
