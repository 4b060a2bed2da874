"""`fleet ps`, `fleet scale`, `fleet restart`, `fleet down`: the commands that talk to the
`fleet up` running in this directory over its control socket (`fleet.supervise.control`).

No etcd and no gRPC imported here: `fleet ps` answers from the supervisor's own view.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import psutil

from fleet.cliparser import EXIT_OK, UsageError
from fleet.logs import plural
from fleet.supervise.control import RunDir, request


def cmd_ps(args: argparse.Namespace) -> int:
    answer = request(RunDir(), {"cmd": "ps"})
    if args.json:
        print(json.dumps(answer["slots"], indent=2))
        return EXIT_OK
    print(f"fleet up pid {answer['pid']}, {plural(answer['workers'], 'worker')}")
    server = answer.get("etcd_server")
    if server and server.get("fleet_etcd_pid"):  # a `fleet etcd` fleet up uses, not keeps
        print(
            f"etcd  pid {server['pid'] or '-'} {server['state']} at {server['endpoint']} "
            f"(fleet etcd pid {server['fleet_etcd_pid']}; fleet up does not restart or stop it)"
        )
    elif server:  # the embedded etcd `fleet up` supervises (absent for an external cluster)
        last = f", last exit {server['last_exit']}" if server.get("last_exit") else ""
        print(
            f"etcd  pid {server['pid'] or '-'} {server['state']} at {server['endpoint']}, "
            f"restarts {server['restarts']}{last}"
        )
    print(
        f"{'SLOT':<5} {'MEMBER':<24} {'STATE':<9} {'PID':>7} {'UPTIME':>8} {'RESTARTS':>8} "
        f"{'HB AGE':>6} {'RSS MB':>7} {'OWNED':>5} {'FAILING':>7} {'OLDEST':>6}  LAST EXIT"
    )
    for row in answer["slots"]:

        def show(value: object, fmt: str = "") -> str:
            return "-" if value is None else format(value, fmt)

        print(
            f"{row['slot']:<5} {row['member']:<24} {row['state']:<9} {show(row['pid']):>7} "
            f"{show(row['uptime'], '.1f'):>8} {row['restarts']:>8} "
            f"{show(row['heartbeat_age'], '.1f'):>6} {show(row['rss_mb'], '.0f'):>7} "
            f"{show(row.get('owned')):>5} {show(row.get('failing')):>7} "
            f"{show(row.get('oldest_call')):>6}  {row['last_exit'] or ''}"
        )
    _print_failing_slots(answer["slots"])
    return EXIT_OK


def _print_failing_slots(rows: list[dict[str, Any]]) -> None:
    """Under the ps table, one line per failing segment the heartbeats listed."""
    from fleet.coord.health import Failing, failing_lines

    for row in rows:
        entries = row.get("failing_segments") or []
        listed = [f for f in (Failing.from_json(e) for e in entries) if f is not None]
        failing = row.get("failing")
        count = failing if isinstance(failing, int) else len(listed)
        for line in failing_lines(f"w{row['slot']}", listed, count):
            print(line)


# How long `fleet scale` / `fleet restart` wait at most (a rolling restart of many slots
# waits for each new worker to own its share).
WAIT_LIMIT = 3600.0


def cmd_scale(args: argparse.Namespace) -> int:
    from fleet.supervise.waiting import wait_scaled

    text = str(args.workers)
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise UsageError(f"scale: workers = {text!r}: expected an integer from 1 to 1024")
    run_dir = RunDir()
    before = len(request(run_dir, {"cmd": "ps"})["slots"])
    request(run_dir, {"cmd": "scale", "workers": int(text)})
    print(f"scaling {before} -> {int(text)} workers", flush=True)
    if args.no_wait:
        return EXIT_OK
    return wait_scaled(run_dir, int(text), sys.stdout, WAIT_LIMIT)


def cmd_restart(args: argparse.Namespace) -> int:
    from fleet.supervise.waiting import wait_restarted

    slot = args.slot
    if slot is not None and not str(slot).isdigit():
        raise UsageError(f"restart: --slot {slot!r}: expected a slot number")
    run_dir = RunDir()
    rows = request(run_dir, {"cmd": "ps"})["slots"]
    target = int(slot) if slot is not None else None
    request(run_dir, {"cmd": "restart", "slot": target})
    chosen = [r for r in rows if target is None or r["slot"] == target]
    print(f"rolling restart of {len(chosen)} slot(s), one at a time", flush=True)
    if args.no_wait:
        return EXIT_OK
    return wait_restarted(run_dir, chosen, sys.stdout, WAIT_LIMIT)


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = RunDir()
    if run_dir.running_pid() is None:
        # Idempotent, like `docker compose down`: nothing to stop is not an error.
        print(f"nothing running in {run_dir.root.resolve().parent}")
        return EXIT_OK
    started = time.monotonic()
    pid = request(run_dir, {"cmd": "down"})["pid"]
    print(f"stopping fleet up (pid {pid})", flush=True)
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    print(f"stopped in {time.monotonic() - started:.1f} s")
    return EXIT_OK
