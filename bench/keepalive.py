"""Benchmark: lease keepalive round trip, idle and under a checkpoint commit flood (issue 11).

Starts one real etcd (`fleet.server.embedded.EmbeddedEtcd`, free ports) and, in this
process, one `Etcd` client, as a worker has one. The **flood**: ``--threads`` threads
(default 16) commit ``--value-bytes`` (1 KiB) checkpoints of ``--segments`` (64) segments
back to back, each a real fenced commit (`fleet.coord.ownership.commit`, a guarded txn)
through that client, as a worker's runners do. Meanwhile one thread sends ``--samples``
LeaseKeepAlive calls (`Etcd.keepalive`, the call `Session` makes), one every ``--pace``
seconds, and times each round trip. Each is measured idle and under the flood, for each
channel the keepalive can take:

* ``data``: the same client as the commits (one gRPC channel, one HTTP/2 connection):
  how every keepalive went before issue 11;
* ``session``: the client `fleet.coord.session.Session` uses for its lease calls
  (`Session.client`: since issue 11 the liveness channel of `Etcd.liveness()`, a
  connection of its own; in a checkout without it, the data client, so ``session`` then
  measures the same thing as ``data``);
* ``process``: a client in another process (no client, connection or GIL shared with the
  flood): what etcd itself adds under the flood, the floor for the other two.

``--rounds`` repeats the four phases in turn (samples pooled), so a load change on a
shared machine does not fall on one phase only. Also recorded: commits/s and commit
latency, keepalive failures, and the TCP connections this process held to etcd in each
phase (one shared, or two). Writes ``<out>/keepalive.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
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
    tail,
)
from flood import Flood
from stats import summarize

from fleet.coord.etcd import Etcd, EtcdError
from fleet.coord.keys import Keys
from fleet.coord.session import Session
from fleet.server.embedded import EmbeddedEtcd

KEYS = Keys("/bench", "keepalive")
CHANNELS = ("data", "session", "process")
LOADS = ("idle", "flood")
WARMUP_CALLS = 5


@dataclass(frozen=True)
class Options:
    samples: int
    pace: float
    threads: int
    segments: int
    value_bytes: int
    rounds: int
    out: Path


def session_client(etcd: Etcd) -> tuple[Etcd, bool]:
    """The client `Session` sends its keepalives over, and whether it is not `etcd`."""
    session = Session(etcd, 30)
    client = getattr(session, "client", etcd)
    return client, client is not etcd


def connections(port: int) -> int:
    """TCP connections this process holds to etcd's client port."""
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def sample(client: Etcd, lease: int, opts: Options) -> tuple[list[float], int]:
    """`opts.samples` keepalive round trips in seconds, and how many calls failed."""
    times: list[float] = []
    failures = 0
    for _ in range(opts.samples):
        t0 = time.perf_counter()
        try:
            ttl = client.keepalive(lease)
        except EtcdError:
            failures += 1
            continue
        times.append(time.perf_counter() - t0)
        if ttl <= 0:
            raise BenchError(f"lease {lease:x} expired during the benchmark")
        time.sleep(opts.pace)
    return times, failures


class Probe:
    """Keepalives from a process of its own (this script with ``--probe``), on demand."""

    def __init__(self, endpoint: str, opts: Options) -> None:
        cmd = [sys.executable, __file__, "--probe", endpoint, "--samples", str(opts.samples)]
        self.popen = subprocess.Popen(
            [*cmd, "--pace", str(opts.pace)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        if self._line() != "ready":
            raise BenchError("the probe process did not start")

    def _line(self) -> str:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise BenchError(f"the probe process exited (status {self.popen.poll()})")
        return line.strip()

    def sample(self) -> tuple[list[float], int]:
        assert self.popen.stdin is not None
        self.popen.stdin.write("go\n")
        self.popen.stdin.flush()
        got = json.loads(self._line())
        return got["times"], got["failures"]

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait(10)


def probe_main(endpoint: str, opts: Options) -> int:
    """The ``--probe`` child: one lease; a batch of keepalives per ``go`` line on stdin."""
    etcd = Etcd([endpoint])
    try:
        lease, _ = etcd.grant(60)
        for _ in range(WARMUP_CALLS):
            etcd.keepalive(lease)
        print("ready", flush=True)
        for _line in sys.stdin:
            times, failures = sample(etcd, lease, opts)
            print(json.dumps({"times": times, "failures": failures}), flush=True)
    finally:
        etcd.close()
    return 0


Sampler = Callable[[], tuple[list[float], int]]


def phase(
    etcd: Etcd, measure_once: Sampler, port: int, opts: Options, flooded: bool
) -> dict[str, Any]:
    flood = Flood(etcd, KEYS, opts) if flooded else None
    if flood is not None:
        flood.start()
        time.sleep(0.5)  # every flood thread has its calls in flight
    t0 = time.monotonic()
    try:
        held = connections(port)
        times, failures = measure_once()
    finally:
        if flood is not None:
            flood.finish()
    wall = time.monotonic() - t0
    result: dict[str, Any] = {
        "keepalive_s": [round(t, 6) for t in times],
        "failures": failures,
        "connections": held,
        "wall_s": round(wall, 2),
    }
    if flood is not None:
        result["commits"] = len(flood.latencies)
        result["commit_s"] = flood.latencies
        result["commit_errors"] = flood.errors
    return result


def measure(server: EmbeddedEtcd, opts: Options, probes: list[Probe]) -> dict[str, Any]:
    server.start()
    port = int(server.endpoint.rsplit(":", 1)[1])
    etcd = Etcd([server.endpoint])
    try:
        session, own = session_client(etcd)
        samplers: dict[str, Sampler] = {}
        for name, client in (("data", etcd), ("session", session)):
            lease, _ = client.grant(60)
            for _ in range(WARMUP_CALLS):  # the first call of a channel connects it
                client.keepalive(lease)
            samplers[name] = functools.partial(sample, client, lease, opts)
        probes.append(Probe(server.endpoint, opts))
        samplers["process"] = probes[0].sample
        raw: dict[str, Any] = {f"{c}/{lo}": [] for c in CHANNELS for lo in LOADS}
        for round_no in range(opts.rounds):
            for channel in CHANNELS:
                for load in LOADS:
                    one = phase(etcd, samplers[channel], port, opts, load == "flood")
                    one["round"] = round_no
                    raw[f"{channel}/{load}"].append(one)
                    s = summarize(t * 1000 for t in one["keepalive_s"])
                    print(
                        f"round {round_no} {channel:7s} {load:5s}: keepalive median "
                        f"{s['median_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms"
                        + (f"; {one['commits'] / one['wall_s']:.0f} commits/s"
                           if "commits" in one else ""),
                        flush=True,
                    )  # fmt: skip
        return {"session_channel_own": own, "phases": raw}
    finally:
        etcd.close()


def summary(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, runs in raw["phases"].items():
        times = [t * 1000 for r in runs for t in r["keepalive_s"]]
        row: dict[str, Any] = {
            "keepalive": summarize(times),
            "failures": sum(r["failures"] for r in runs),
            "connections": max(r["connections"] for r in runs),
        }
        if any("commits" in r for r in runs):
            wall = sum(r["wall_s"] for r in runs)
            row["commits_per_s"] = round(sum(r["commits"] for r in runs) / wall)
            row["commit"] = summarize(t * 1000 for r in runs for t in r["commit_s"])
            row["commit_errors"] = sum(r["commit_errors"] for r in runs)
        out[key] = row
    return out


def render_markdown(report: dict[str, Any]) -> str:
    p, m, s = report["parameters"], report["machine"], report["summary"]
    own = report["raw"]["session_channel_own"]
    lines = [
        "# Keepalive round trip, idle and under a commit flood",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['finished']}; {machine_line(m)}; load average {m['load_average_start']} "
        f"before, {m['load_average_end']} after. {p['samples']} keepalives per phase and "
        f"round, one every {p['pace'] * 1000:g} ms, {p['rounds']} round(s); flood: "
        f"{p['threads']} threads committing {p['value_bytes']} B checkpoints of "
        f"{p['segments']} segments back to back through the data client.",
        "",
        "| keepalive over | load | n | median ms | p90 ms | p99 ms | max ms | failed "
        "| connections | commits/s | commit median ms | commit p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for channel in CHANNELS:
        for load in LOADS:
            row = s[f"{channel}/{load}"]
            k = row["keepalive"]
            c = row.get("commit")
            label = {
                "data": "data client",
                "session": f"Session's client ({'own channel' if own else 'the data client'})",
                "process": "another process",
            }[channel]
            lines.append(
                f"| {label} | {load} | {k['n']} | {k['median_ms']} | {k['p90_ms']} | "
                f"{k['p99_ms']} | {k['max_ms']} | {row['failures']} | {row['connections']} | "
                f"{row.get('commits_per_s', '-')} | {c['median_ms'] if c else '-'} | "
                f"{c['p99_ms'] if c else '-'} |"
            )
    lines += [
        "",
        "Nearest-rank percentiles. `connections`: TCP connections the flooding process held "
        "to etcd during the phase (1: its keepalives and commits share one HTTP/2 "
        "connection; the other process's own connection is not counted).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> tuple[Options, str | None]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="keepalives per phase (300)")
    parser.add_argument("--pace", type=float, default=0.02, help="s between keepalives (0.02)")
    parser.add_argument("--threads", type=int, default=16, help="flood threads (16)")
    parser.add_argument("--segments", type=int, default=64, help="flood segments (64)")
    parser.add_argument("--value-bytes", type=int, default=1024, help="checkpoint size (1024)")
    parser.add_argument("--rounds", type=int, default=2, help="times each phase runs (2)")
    parser.add_argument("--quick", action="store_true", help="100 samples, 1 round (about 20 s)")
    parser.add_argument("--probe", metavar="ENDPOINT", help=argparse.SUPPRESS)  # the child
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.rounds = 100, 1
    if min(args.samples, args.threads, args.segments, args.value_bytes, args.rounds) < 1:
        parser.error("--samples, --threads, --segments, --value-bytes, --rounds must be >= 1")
    if args.pace < 0 or args.segments < args.threads:
        parser.error("--pace must be >= 0 and --segments at least --threads")
    opts = Options(
        args.samples, args.pace, args.threads, args.segments, args.value_bytes, args.rounds,
        args.out,
    )  # fmt: skip
    return opts, args.probe


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, probe = parse_args(argv)
    if probe is not None:
        return probe_main(probe, opts)
    host = {**machine(), "load_average_start": load_average()}
    meter = CpuMeter()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-keepalive-") as tmpdir:
        log_path = Path(tmpdir) / "etcd.log"
        server = EmbeddedEtcd(Path(tmpdir) / "etcd", log_path=log_path)

        probes: list[Probe] = []

        def cleanup() -> list[str]:
            for one in probes:
                with contextlib.suppress(Exception):
                    one.close()
            with contextlib.suppress(RuntimeError):
                server.kill()
            pids = [server.pid, *(p.popen.pid for p in probes)]
            return [f"pid {pid}" for pid in pids if pid and _running(pid)]

        context: Callable[[], str] = lambda: f"etcd log:\n{tail(log_path, 20)}"  # noqa: E731
        code, raw = guarded("keepalive", lambda: measure(server, opts, probes), cleanup, context)
    if code != 0:
        return code
    report: dict[str, Any] = {
        "benchmark": "keepalive",
        "command": shlex_command("keepalive.py", argv),
        "finished": finished(),
        "parameters": {
            "samples": opts.samples,
            "pace": opts.pace,
            "threads": opts.threads,
            "segments": opts.segments,
            "value_bytes": opts.value_bytes,
            "rounds": opts.rounds,
            "percentiles": "nearest-rank",
        },
        "machine": {**host, "load_average_end": load_average()},
        "summary": summary(raw),
        "cpu": meter.result(),
        "raw": raw,
    }
    for runs in raw["phases"].values():  # every commit's latency: summarized, not kept
        for run in runs:
            run.pop("commit_s", None)
    publish(report, render_markdown(report), opts.out, "keepalive")
    return 0


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
