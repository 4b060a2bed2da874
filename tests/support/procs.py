"""Child processes for tests: spawn `python -m fleet ...`, and never leak one.

Every spawned process gets its own session (so signals aimed at it, and the
teardown SIGKILL of its group, never reach pytest) and a unique marker in its
environment. Teardown kills by process group, by descendant tree and by that
marker, because each alone misses something: a supervisor's embedded etcd runs in
a new session (escapes the group), and a child whose parent already died is
re-parented to init (escapes the tree); both still inherit the environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
SPAWN_TAG_ENV = "FLEET_TEST_SPAWN_TAG"
TAIL_LINES = 60


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """Last `lines` lines of a text file (or a note if it cannot be read)."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines)).rstrip("\n") or "(empty)"
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


@dataclass
class Proc:
    """A spawned `python -m fleet ...` process and its combined stdout/stderr log."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """Process id (also its process-group and session id)."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """True until the process has exited (a stopped process is alive)."""
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once exited (negative: killed by that signal), else None."""
        return self.popen.poll()

    def log(self) -> str:
        """Everything the process has written so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last `lines` lines of the log."""
        return tail(self.log_path, lines)

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send `sig` to the process (or, with group=True, to its whole group).

        No-op once the process has been reaped, so a late signal can never hit an
        unrelated process that reused the pid.
        """
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.popen.pid, sig)
            else:
                os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit and return the exit status.

        Raises:
            subprocess.TimeoutExpired: still running after `timeout` (with the log tail).
        """
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            exc.add_note(f"{self.name} (pid {self.pid}) log tail:\n{self.tail()}")
            raise

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited {self.returncode}"
        return f"Proc({self.name!r}, pid={self.pid}, {state})"


def _is_gone(proc: psutil.Process) -> bool:
    """Exited, or a zombie nobody will reap (a container's PID 1 may never reap)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def tagged_processes(tag: str, since: float = 0.0) -> list[psutil.Process]:
    """Live processes whose environment carries ``FLEET_TEST_SPAWN_TAG=tag``."""
    found: list[psutil.Process] = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "create_time"]):
        info = proc.info
        if info["pid"] == me or (info["create_time"] or 0.0) < since:
            continue
        try:
            if proc.environ().get(SPAWN_TAG_ENV) == tag and not _is_gone(proc):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _sigkill(proc: psutil.Process) -> None:
    """SIGCONT (a stopped process handles nothing else first) then SIGKILL."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


class Spawner:
    """Factory for `Proc`s (the `spawn` fixture) that kills them all at `kill_all()`."""

    def __init__(
        self,
        log_dir: Path,
        cwd: Path | None = None,
        on_spawn: Callable[[Proc], None] | None = None,
    ) -> None:
        """Logs go to `log_dir/<name>.log`; processes run in `cwd` (default `log_dir`).

        Running in a per-test directory keeps files a command writes relative to its
        working directory (e.g. `fleet up`'s `.fleet/`) out of the repository and
        apart from concurrently running tests.
        """
        self.log_dir = log_dir
        self.cwd = cwd if cwd is not None else log_dir
        self.tag = uuid.uuid4().hex
        self.procs: list[Proc] = []
        self._on_spawn = on_spawn
        self._names: set[str] = set()
        self._started_at = time.time()

    def env(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """The environment a spawned process gets (a None value unsets a variable).

        PYTHONPATH starts with the repository root so `python -m fleet` and
        `tests.support.*` handler specs resolve to this working tree.
        """
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        old_path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old_path if old_path else "")
        env[SPAWN_TAG_ENV] = self.tag
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def _unique_name(self, name: str) -> str:
        """`name`, or `name-2`, `name-3`... so two processes never share a log file."""
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = f"{name}-{n}"
        self._names.add(candidate)
        return candidate

    def __call__(
        self,
        args: Sequence[str],
        env: Mapping[str, str | None] | None = None,
        name: str = "proc",
        cwd: Path | None = None,
    ) -> Proc:
        """Start ``python -m fleet *args`` with stdout+stderr to ``<log_dir>/<name>.log``."""
        return self.command([sys.executable, "-m", "fleet", *args], env=env, name=name, cwd=cwd)

    def command(
        self,
        argv: Sequence[str],
        env: Mapping[str, str | None] | None = None,
        name: str = "proc",
        cwd: Path | None = None,
    ) -> Proc:
        """Start any command the same way (own session, log file, teardown kill)."""
        name = self._unique_name(name)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(env),
                cwd=cwd if cwd is not None else self.cwd,
                start_new_session=True,
                close_fds=True,
            )
        proc = Proc(name=name, popen=popen, log_path=log_path, args=list(argv))
        self.procs.append(proc)
        if self._on_spawn is not None:
            self._on_spawn(proc)
        return proc

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every spawned process, its group, its descendants, anything tagged.

        Repeats until nothing tagged is left (a supervisor may fork a replacement
        between our scan and our kill), then reaps our direct children.
        """
        for _round in range(5):
            victims: dict[int, psutil.Process] = {}
            for proc in self.procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    if proc.alive:
                        root = psutil.Process(proc.pid)
                        for child in root.children(recursive=True):
                            victims[child.pid] = child
            for p in tagged_processes(self.tag, since=self._started_at - 1.0):
                victims[p.pid] = p
            for proc in self.procs:
                # Signal the group only while our child is unreaped: until then its pid,
                # hence the group id, cannot be reused. Members of a reaped leader's
                # group are still found by their tag.
                if proc.popen.poll() is None:
                    for sig in (signal.SIGCONT, signal.SIGKILL):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(proc.pid, sig)
            for victim in victims.values():
                _sigkill(victim)
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not all(_is_gone(v) for v in victims.values()):
                time.sleep(0.02)
            if not victims and not tagged_processes(self.tag, since=self._started_at - 1.0):
                return
        leftover = tagged_processes(self.tag, since=self._started_at - 1.0)
        if leftover:
            raise RuntimeError(f"spawned processes survived SIGKILL: {leftover}")
