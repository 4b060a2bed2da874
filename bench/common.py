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
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class BenchError(Exception):
    """A step did not complete (timeout, a process died): the run's numbers are void."""


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


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (each script adds the load average its way)."""
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "etcd": etcd_version(),
        "fleet_revision": git_revision(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """`machine()` in a few words, for the markdown report."""
    where = f"{m['hostname']} ({m['cpu_model']}, " if "hostname" in m else "("
    memory = f", {m['memory_gib']} GiB" if "memory_gib" in m else ""
    return (
        f"{where}{m['cpu_count']} CPUs{memory}), Python {m['python']}, "
        f"etcd {m['etcd']['version']}, fleet {m['fleet_revision']}"
    )


def load_average() -> str:
    """The 1/5/15-minute load averages, as `uptime` shows them."""
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def shlex_command(script: str, argv: Sequence[str]) -> str:
    """How this benchmark was invoked, for the report."""
    return shlex.join(["python", f"bench/{script}", *argv])


def finished() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def guarded(
    name: str,
    body: Callable[[], Any],
    cleanup: Callable[[], list[str]],
    context: Callable[[], str] = lambda: "",
) -> tuple[int, Any]:
    """Run `body` so that whatever happens (a failed step, Ctrl-C, SIGTERM) `cleanup`
    runs to the end and nothing is left running: (exit code, what `body` returned).

    A `BenchError` is one line naming the step, then `context()` (log tails); exit 1.
    Ctrl-C/SIGTERM/SIGHUP: exit 130. `cleanup` returns what it found still running.
    """
    stop_on_signals()
    code, result = 1, None
    try:
        result = body()
        code = 0
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        extra = context()
        if extra:
            print(extra, file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; stopping what it started", file=sys.stderr)
        code = 130
    finally:
        ignore_stop_signals()  # a second Ctrl-C must not cut the cleanup short
        leftovers = cleanup()
    fail_on_leftovers(leftovers)
    return code, result


# -- reports ----------------------------------------------------------------------------


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
