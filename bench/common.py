"""What the benchmark scripts in this directory share.

Imported as ``common`` by scripts run as ``python bench/<name>.py`` (Python puts the
script's directory first on ``sys.path``). Importing it puts this checkout on
``sys.path`` too, so import it before anything from ``fleet``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
# Measure the fleet in this checkout (as the processes we start do, through PYTHONPATH),
# never a copy installed elsewhere.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fleet.server.embedded import find_etcd_binary  # noqa: E402

Status = dict[str, Any]  # what `fleet.coord.status.collect` returns (`fleet status --json`)
Rank = Callable[[Sequence[float], float], float]  # (values, q) -> the q-quantile
Quantiles = Sequence[tuple[str, float]]  # (name, q): ("median", 0.5) -> "median_ms"

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class BenchError(Exception):
    """A step did not complete (timeout, a process died): the run's numbers are void."""


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file, or why there are none."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines)).rstrip("\n") or "(empty)"
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


# -- signals ----------------------------------------------------------------------------


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """SIGTERM/SIGHUP take the same way out as Ctrl-C: through every `finally`. SIGINT
    too, explicitly: a shell starts background jobs with it ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


def ignore_stop_signals() -> None:
    """From here on a second Ctrl-C (or SIGTERM, SIGHUP) must not cut the cleanup short."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# -- processes --------------------------------------------------------------------------


def tagged_processes(env_var: str, tag: str) -> list[psutil.Process]:
    """Live processes (other than this one) whose environment has `env_var` = `tag`."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(env_var) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def describe(proc: psutil.Process) -> str:
    """The start of its command line and its pid (raises `psutil.Error` once it is gone)."""
    return f"{' '.join(proc.cmdline()[:4])} (pid {proc.pid})"


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGCONT (in case it is stopped) and SIGKILL each one; wait up to 10 s for them."""
    for proc in procs:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
    psutil.wait_procs(procs, timeout=10)


def fail_on_leftovers(leftovers: Sequence[str]) -> None:
    """The promise of every benchmark: nothing it started outlives it, whatever happened."""
    if leftovers:
        raise AssertionError(f"processes left running after cleanup: {leftovers}")


# -- the machine ------------------------------------------------------------------------


def cpu_seconds(who: int) -> float:
    """CPU time of this process (RUSAGE_SELF) or of its reaped children (RUSAGE_CHILDREN)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """How busy the CPUs were over the run: in all, by the fleet, by this poller.

    The rest is what other programs took: numbers from a run on a busy machine are not
    comparable to one on an idle machine.
    """

    wall: float = field(default_factory=time.monotonic)
    poller: float = field(default_factory=lambda: cpu_seconds(resource.RUSAGE_SELF))
    children: float = field(default_factory=lambda: cpu_seconds(resource.RUSAGE_CHILDREN))

    def __post_init__(self) -> None:
        psutil.cpu_percent(interval=None)  # the next call reports the average since now

    def result(self) -> dict[str, float]:
        """Call once every process the run started has been reaped, so their CPU time is
        counted (the fleet's: etcd and the workers; this process's: mostly status reads)."""
        wall = time.monotonic() - self.wall
        capacity = wall * (os.cpu_count() or 1)
        fleet = cpu_seconds(resource.RUSAGE_CHILDREN) - self.children
        poller = cpu_seconds(resource.RUSAGE_SELF) - self.poller
        return {
            "wall_s": round(wall, 1),
            "busy_percent_all": round(psutil.cpu_percent(interval=None), 1),
            "busy_percent_fleet": round(100.0 * fleet / capacity, 1),
            "busy_percent_poller": round(100.0 * poller / capacity, 1),
        }


def etcd_version() -> dict[str, str]:
    binary = find_etcd_binary()
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"binary": binary, "version": f"unknown ({exc})"}
    version = next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if "etcd Version" in line),
        out.strip() or "unknown",
    )
    return {"binary": binary, "version": version}


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "fleet") else "")


def machine() -> dict[str, Any]:
    """What the numbers were measured on (each script adds the load average its way)."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "etcd": etcd_version(),
        "fleet_revision": git_revision(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """`machine()` in a few words, for the markdown report."""
    return (
        f"{m['cpu_count']} CPUs, Python {m['python']}, etcd {m['etcd']['version']}, "
        f"fleet {m['fleet_revision']}"
    )


# -- summary and reports ----------------------------------------------------------------


def summarize(values: Iterable[float | None], rank: Rank, quantiles: Quantiles) -> dict[str, Any]:
    """n, the `quantiles` (as `<name>_ms`) and max of the values present, to 0.1 ms."""
    present = [v for v in values if v is not None]
    if not present:
        return {"n": 0, **{f"{name}_ms": None for name, _ in quantiles}, "max_ms": None}
    return {
        "n": len(present),
        **{f"{name}_ms": round(rank(present, q), 1) for name, q in quantiles},
        "max_ms": round(max(present), 1),
    }


def period_summary(seconds: Sequence[float], rank: Rank) -> dict[str, float | None]:
    """Median and p90 in ms, to 0.01 ms, of read periods given in seconds (None if none)."""
    values = [s * 1000.0 for s in seconds]
    if not values:
        return {"median": None, "p90": None}
    return {"median": round(rank(values, 0.5), 2), "p90": round(rank(values, 0.9), 2)}


def cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def summary_table(
    metrics: Sequence[tuple[str, str, str]], summary: dict[str, Any], quantiles: Quantiles
) -> list[str]:
    """The markdown table of `summarize` results, one row per (key, label, what is timed)."""
    names = [name for name, _ in quantiles] + ["max"]
    lines = [
        "| metric | n | " + "".join(f"{name} ms | " for name in names) + "timed |",
        "| --- | ---: | " + "---: | " * len(names) + "--- |",
    ]
    for key, label, timed in metrics:
        s = summary[key]
        cells = "".join(f"{cell(s[f'{name}_ms'])} | " for name in names)
        lines.append(f"| {label} | {s['n']} | {cells}{timed} |")
    return lines


def publish(report: dict[str, Any], markdown: str, out: Path, stem: str) -> None:
    """Write `<out>/<stem>.json` and `<out>/<stem>.md` (each by rename), print the table."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{stem}.json", out / f"{stem}.md")
    contents = (json.dumps(report, indent=2) + "\n", markdown)
    for path, text in zip(paths, contents, strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    print(f"\n{markdown}\nwrote {paths[0]} and {paths[1]}")


# -- command line -----------------------------------------------------------------------


def bench_parser(
    doc: str | None, *, workers: int, rounds: tuple[str, int, str]
) -> argparse.ArgumentParser:
    """A parser (described by the first line of `doc`) with --workers, --segments, the
    round count `rounds` = (flag, default, what one round is) and --lease-ttl."""
    flag, default, what = rounds
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument(
        "--workers", type=int, default=workers, help=f"fleet size (default {workers})"
    )
    parser.add_argument("--segments", type=int, default=64, help="segment count (default 64)")
    parser.add_argument(flag, type=int, default=default, help=f"{what} (default {default})")
    parser.add_argument(
        "--lease-ttl", type=int, default=10, help="worker lease TTL in seconds (default 10)"
    )
    return parser


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "bench" / "results", help="results directory"
    )


def check_fleet_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, rounds_flag: str
) -> None:
    """Exit with a usage error unless the options of `bench_parser` make a run possible."""
    if args.workers < 2:
        parser.error("--workers must be at least 2 (someone must take the segments over)")
    if args.segments < args.workers:
        parser.error("--segments must be at least --workers")
    rounds = getattr(args, rounds_flag.removeprefix("--").replace("-", "_"))
    if rounds < 1 or args.lease_ttl < 1:
        parser.error(f"{rounds_flag} and --lease-ttl must be at least 1")
