"""A fleet without a supervisor: an embedded etcd and plain `fleet worker` processes.

What `bench/handoff.py` measures needs workers nobody babysits: a graceful stop is a
SIGTERM to the process itself, and a kill -9 is noticed only when etcd expires the
lease (the TTL), since no supervisor is there to revoke it. Every process started here
carries a tag in its environment, and `close()` kills them all, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from common import REPO_ROOT, BenchError, describe, kill_all, tagged_processes, tail
from observe import Done, Observer, Waiter

from fleet.server.embedded import EmbeddedEtcd

TAG_ENV = "FLEET_BENCH_TAG"
LOG_TAIL_LINES = 30
STEP_TIMEOUT = 60.0


@dataclass
class Worker:
    """One `fleet worker` process; a thread records the moment (time.time()) it exits."""

    member_id: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    exited_at: float | None = None

    def __post_init__(self) -> None:
        threading.Thread(target=self._reap, name=f"reap-{self.member_id}", daemon=True).start()

    def _reap(self) -> None:
        self.popen.wait()
        self.exited_at = time.time()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals, *, group: bool = False) -> None:
        """Signal the process (or its group); a no-op once it has been reaped."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """Its exit status and when it exited."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"{self.member_id} still running {timeout:.0f} s after the signal; log tail:\n"
                f"{tail(self.log_path, LOG_TAIL_LINES)}"
            ) from None
        while self.exited_at is None:  # the reaper stamps it right after wait()
            time.sleep(0.001)
        return code, self.exited_at


@dataclass
class Fleet:
    """An etcd, the workers started against it, and an observer. `close()` kills all."""

    tmp: Path
    segments: int
    lease_ttl: int
    interval: str
    handler: str = "fleet.demo:handle"
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    workers: dict[str, Worker] = field(default_factory=dict)  # expected to be running
    started: list[Worker] = field(default_factory=list)  # every worker ever spawned
    observer: Observer | None = None

    def __post_init__(self) -> None:
        os.environ[TAG_ENV] = self.tag  # inherited by etcd too
        (self.tmp / "logs").mkdir()
        self.server = EmbeddedEtcd(self.tmp / "etcd", log_path=self.tmp / "logs" / "etcd.log")

    @property
    def endpoint(self) -> str:
        return str(self.server.endpoint)

    @property
    def obs(self) -> Observer:
        if self.observer is None:
            raise BenchError("etcd is not started")
        return self.observer

    def start_etcd(self) -> None:
        self.server.start()
        self.observer = Observer(self.endpoint)

    def spawn(self, member_id: str) -> Worker:
        """Start `python -m fleet worker` for `member_id` in its own session."""
        log_path = self.tmp / "logs" / f"{member_id}.{len(self.started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env[TAG_ENV] = self.tag
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        cmd = [
            sys.executable, "-m", "fleet", "worker",
            "--etcd", self.endpoint,
            "--id", member_id,
            "--segments", str(self.segments),
            "--interval", self.interval,
            "--lease-ttl", str(self.lease_ttl),
            "--handler", self.handler,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,  # no ./fleet.toml of the caller's
                env=env,
                start_new_session=True,
            )
        worker = Worker(member_id, popen, log_path)
        self.started.append(worker)
        self.workers[member_id] = worker
        return worker

    def retire(self, member_id: str) -> Worker:
        """Stop expecting `member_id` to run (before signalling it)."""
        return self.workers.pop(member_id)

    def check_alive(self) -> None:
        for worker in self.workers.values():
            if not worker.alive:
                raise BenchError(
                    f"worker {worker.member_id} (pid {worker.pid}) exited unexpectedly with "
                    f"status {worker.popen.returncode}; log tail:\n"
                    f"{tail(worker.log_path, LOG_TAIL_LINES)}"
                )

    def wait(self, what: str, done: Done | Waiter, timeout: float = STEP_TIMEOUT) -> float:
        return self.obs.wait(what, done, timeout, self.check_alive)

    def close(self) -> list[str]:
        """Kill every process started here; return those still found running afterwards."""
        if self.observer is not None:
            self.observer.close()
        for worker in self.started:
            worker.signal(signal.SIGCONT, group=True)
            worker.signal(signal.SIGKILL, group=True)
        for worker in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.popen.wait(timeout=10)
        with contextlib.suppress(RuntimeError):
            self.server.kill()
        # Anything else with our tag (say, a worker spawned just as Ctrl-C arrived, before
        # it was recorded) goes the same way.
        kill_all(tagged_processes(TAG_ENV, self.tag))
        return self.leftovers()

    def leftovers(self) -> list[str]:
        """Our processes still alive: unreaped children, plus anything carrying our tag."""
        found = [f"{w.member_id} (pid {w.pid})" for w in self.started if w.popen.poll() is None]
        if self.server.running:
            found.append(f"etcd (pid {self.server.pid})")
        for proc in tagged_processes(TAG_ENV, self.tag):
            with contextlib.suppress(psutil.Error):
                found.append(describe(proc))
        return found

    def log_tails(self) -> str:
        logs = [w.log_path for w in self.started[-4:]] + [self.tmp / "logs" / "etcd.log"]
        return "\n".join(f"--- {path.name}\n{tail(path, LOG_TAIL_LINES)}" for path in logs)
