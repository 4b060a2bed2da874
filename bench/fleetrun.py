"""`fleet up` as a benchmark runs it: started in a fresh directory, read, stopped.

`FleetUp` runs ``python -m fleet up --log-format json`` (embedded etcd on free ports,
this checkout on PYTHONPATH, no FLEET_* of the caller's) in a temporary directory,
exactly as a user would; it reads the supervisor's own lines (the summary line, each
child's exit, with the `ts` of each), asks the control socket for `ps` and `scale`,
watches etcd through an `observe.Observer`, and stops everything with `fleet down`,
killing whatever is left. Every process it starts carries a tag in its environment, so
`leftovers()` finds even one that left the process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from common import (
    REPO_ROOT,
    BenchError,
    alive,
    describe,
    kill_all,
    tagged_processes,
    tail,
)
from observe import Done, Observer, Waiter, parse_json_line
from stats import ms

from fleet.supervise.control import ControlError, RunDir, request

Row = dict[str, Any]

TAG_ENV = "FLEET_BENCH_TAG"
STEP_TIMEOUT = 120.0  # cold start, convergence, recovery (respawn backoff caps at 30 s)
DOWN_TIMEOUT = 90.0  # `fleet down`: graceful_timeout (30 s) plus margin
OUTPUT_TAIL_LINES = 40
POLL = 0.02
SUMMARY = re.compile(
    r"(?P<ready>\d+)/(?P<workers>\d+) workers ready, "
    r"(?P<owned>\d+)/(?P<segments>\d+) segments owned(?:, \d+ failing)?, "
    r"leader (?P<leader>\S+), (?P<took>[\d.]+) s\s*$"
)
EXITED = re.compile(r"^w(?P<slot>\d+) exited: (?P<how>.*)$")


@dataclass(frozen=True)
class UpOptions:
    workers: int
    segments: int
    lease_ttl: int = 10
    interval: float = 0.5
    handler: str = "fleet.demo:handle"


def up_args(o: UpOptions) -> list[str]:
    return [
        "up",
        "--workers", str(o.workers),
        "--segments", str(o.segments),
        "--lease-ttl", str(o.lease_ttl),
        "--interval", f"{o.interval:g}",
        "--handler", o.handler,
    ]  # fmt: skip


def shown_command(o: UpOptions) -> str:
    """The `fleet up` command as a user would type it (we add `--log-format json`)."""
    return shlex.join(["fleet", *up_args(o)])


@dataclass(frozen=True)
class Said:
    """One line of the supervisor's own, with its `ts` (time.time() of `fleet up`)."""

    ts: float
    msg: str


@dataclass
class FleetUp:
    opts: UpOptions
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    popen: subprocess.Popen[bytes] | None = None
    observer: Observer | None = None
    said: list[Said] = field(default_factory=list)
    started_at: float = 0.0  # time.time() just before the spawn
    settled_at: float = 0.0  # when `up_and_settled` saw it settled
    _offset: int = 0
    _partial: bytes = b""

    def __post_init__(self) -> None:
        self.cwd = Path(tempfile.mkdtemp(prefix="fleet-bench-"))

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.cwd / ".fleet")

    @property
    def out_path(self) -> Path:
        return self.cwd / "fleet-up.out"

    def env(self) -> dict[str, str]:
        # No FLEET_* of the caller's (say FLEET_ETCD, which would skip the embedded etcd).
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update({"FLEET_EMBEDDED_PORT": "0", "PYTHONPATH": str(REPO_ROOT), TAG_ENV: self.tag})
        return env

    def command(self) -> list[str]:
        return [sys.executable, "-m", "fleet", *up_args(self.opts), "--log-format", "json"]

    # -- starting -----------------------------------------------------------------------

    def start(self) -> float:
        """Spawn `fleet up`; the time.time() just before."""
        with self.out_path.open("wb") as out:
            self.started_at = time.time()
            self.popen = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env(),
                start_new_session=True,
            )
        return self.started_at

    def connect(self, *, from_start: bool = False, timeout: float = STEP_TIMEOUT) -> float:
        """Wait for `.fleet/fleet.json` (etcd is up); watch the etcd it names. The time
        the file was seen."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(OSError, ValueError, KeyError):
                info = json.loads(self.run_dir.info_file.read_text())
                endpoint = str(info["etcd"][0])
                seen = time.time()
                self.observer = Observer(endpoint, from_start=from_start)
                return seen
            if time.monotonic() >= deadline:
                raise BenchError(f"no {self.run_dir.info_file} within {timeout:.0f} s")
            time.sleep(POLL / 4)

    @property
    def obs(self) -> Observer:
        if self.observer is None:
            raise BenchError("not connected to the fleet's etcd")
        return self.observer

    @property
    def endpoint(self) -> str:
        return self.obs.endpoint

    # -- reading --------------------------------------------------------------------------

    def check_alive(self) -> None:
        assert self.popen is not None
        code = self.popen.poll()
        if code is not None:
            raise BenchError(
                f"fleet up (pid {self.popen.pid}) exited unexpectedly with status {code}; "
                f"output tail:\n{self.output_tail()}"
            )

    def output_tail(self) -> str:
        return tail(self.out_path, OUTPUT_TAIL_LINES)

    def pump(self) -> None:
        """Read the new lines of `fleet up`'s output; keep the supervisor's own."""
        try:
            with self.out_path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            if b'"member":"fleet"' not in raw:
                continue
            line = parse_json_line(raw.decode(errors="replace"))
            if line is not None and line.get("member") == "fleet":
                self.said.append(Said(float(line.get("ts", 0.0)), str(line.get("msg", ""))))

    def summary_after(self, t: float, timeout: float) -> tuple[Said, float] | None:
        """The first summary line stamped after `t` (and the X s it reports)."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            for said in self.said:
                match = SUMMARY.search(said.msg)
                if said.ts >= t and match:
                    return said, float(match["took"])
            if time.monotonic() >= deadline:
                return None
            self.check_alive()
            time.sleep(POLL)

    def exit_after(self, t: float, slot: int, timeout: float = 5.0) -> Said | None:
        """The supervisor's "w<slot> exited: ..." line stamped after `t`: when it reaped."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            for said in self.said:
                match = EXITED.match(said.msg)
                if said.ts >= t and match and int(match["slot"]) == slot:
                    return said
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL)

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = request(self.run_dir, req)
        except ControlError as exc:
            raise BenchError(f"fleet up refused {req}: {exc}") from None
        return answer

    def slots(self) -> list[Row]:
        rows: list[Row] = self.ask({"cmd": "ps"})["slots"]
        return rows

    def scale(self, workers: int) -> float:
        """`fleet scale N --no-wait` over the control socket; the time.time() before."""
        t = time.time()
        self.ask({"cmd": "scale", "workers": workers})
        return t

    def wait(self, what: str, done: Done | Waiter, timeout: float = STEP_TIMEOUT) -> float:
        """`Observer.wait`, failing at once if `fleet up` dies meanwhile."""
        return self.obs.wait(what, done, timeout, self.check_alive, lambda: "")

    def wait_slots(self, what: str, done: Any, timeout: float = STEP_TIMEOUT) -> list[Row]:
        """Poll `ps` until `done(rows)`; the rows."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(BenchError):
                rows = self.slots()
                if done(rows):
                    return rows
            if time.monotonic() >= deadline:
                raise BenchError(f"{what}: not reached within {timeout:.0f} s")
            time.sleep(POLL * 2.5)

    def up_and_settled(self, *, from_start: bool = False) -> dict[str, Any]:
        """Start, wait until every slot is READY and etcd shows the fleet settled: the
        cold start, each step in ms from the spawn."""
        t0 = self.start()
        t_etcd = self.connect(from_start=from_start)
        n = self.opts.workers
        rows = self.wait_slots("cold start: fleet ps answers", lambda rs: len(rs) == n)
        members = {str(r["member"]) for r in rows}  # named before their worker runs
        # Two CPUs start 64 workers (half a CPU-second of imports each) and hand out 4096
        # segments: give a large fleet the time it needs before calling it stuck.
        timeout = STEP_TIMEOUT + 2.0 * n + 0.02 * self.opts.segments
        settled = self.wait("cold start: settled", lambda o: o.settled(members), timeout)
        self.settled_at = settled
        self.wait_slots("cold start: every slot READY", all_ready, timeout)
        summary = self.summary_after(t0, 30.0)
        return {
            "etcd_ready_ms": ms(t_etcd - t0),
            "settled_ms": ms(settled - t0),
            "summary_line_ms": ms(summary[0].ts - t0) if summary else None,
            "supervisor_reported_s": summary[1] if summary else None,
            "members": sorted(members),
        }

    # -- stopping -------------------------------------------------------------------------

    def known(self) -> list[psutil.Process]:
        """Everything of the fleet we know of: `fleet up`, its descendants, tagged ones."""
        procs: dict[int, psutil.Process] = {p.pid: p for p in tagged_processes(TAG_ENV, self.tag)}
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(psutil.Error):
                up = psutil.Process(self.popen.pid)
                procs[up.pid] = up
                for child in up.children(recursive=True):
                    procs[child.pid] = child
        return list(procs.values())

    def leftovers(self) -> list[str]:
        found = []
        for proc in self.known():
            with contextlib.suppress(psutil.Error):
                if alive(proc):
                    found.append(describe(proc))
        return sorted(found)

    def stop(self) -> dict[str, Any]:
        """`fleet down`, then SIGKILL whatever is left; what happened."""
        result: dict[str, Any] = {"down_exit": None, "down_ms": None, "killed": []}
        if self.observer is not None:
            self.observer.close()
            self.observer = None
        before = self.known()
        if self.popen is not None and self.popen.poll() is None:
            t0 = time.monotonic()
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "fleet", "down"],
                    cwd=self.cwd,
                    env=self.env(),
                    capture_output=True,
                    text=True,
                    timeout=DOWN_TIMEOUT,
                    check=False,
                )
                result["down_exit"] = done.returncode
                if done.returncode != 0:
                    result["down_error"] = (done.stderr or done.stdout).strip()
            except subprocess.TimeoutExpired:
                result["down_exit"] = "timeout"
            if result["down_exit"] == 0:  # it returns once `fleet up` has exited
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=10)
            result["down_ms"] = ms(time.monotonic() - t0)
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            result["killed"].append(f"process group {self.popen.pid}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)
        strays = [p for p in {*before, *self.known()} if alive(p)]
        result["killed"] += [f"pid {proc.pid}" for proc in strays]
        kill_all(strays)
        if self.popen is not None:
            result["up_exit"] = self.popen.poll()
        return result

    def close(self) -> list[str]:
        """Stop (if not yet), remove the directory; what is still running."""
        self.stop()
        left = self.leftovers()
        shutil.rmtree(self.cwd, ignore_errors=True)
        return left


def all_ready(rows: list[Row]) -> bool:
    return bool(rows) and all(r["state"] == "READY" for r in rows)


@dataclass
class Fleets:
    """Every `FleetUp` a benchmark started, so one cleanup stops them all."""

    started: list[FleetUp] = field(default_factory=list)

    def new(self, opts: UpOptions) -> FleetUp:
        fleet = FleetUp(opts)
        self.started.append(fleet)
        return fleet

    def close(self) -> list[str]:
        left: list[str] = []
        for fleet in self.started:
            left += fleet.close()
        return left

    def context(self) -> str:
        """The output tail of the last fleet, for a failed step's message."""
        if not self.started:
            return ""
        return f"--- fleet up output\n{self.started[-1].output_tail()}"
