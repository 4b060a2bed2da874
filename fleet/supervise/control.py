"""The run directory of `fleet up` and its control socket.

`fleet up` records what other commands run from the same directory need under
`.fleet/`: its pid, its etcd endpoints and a Unix socket (mode 0600, so only the
owner can steer the fleet). A request is one JSON line, the answer is one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil


class ControlError(Exception):
    """No fleet answers in this directory, or it refused the request."""


class RunDir:
    def __init__(self, root: Path | str = ".fleet") -> None:
        self.root = Path(root)
        self.pidfile = self.root / "fleet.pid"
        self.sock = self.root / "fleet.sock"
        self.info_file = self.root / "fleet.json"
        self.etcd_data = self.root / "etcd"

    def running_pid(self) -> int | None:
        """The pid of a live `fleet up` that owns this directory, else None."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            argv = proc.cmdline()
        except psutil.Error:
            return None
        # The pid may have been reused since a `fleet up` died without cleaning up.
        is_fleet_up = "up" in argv and any(arg.endswith("fleet") for arg in argv)
        return pid if is_fleet_up and pid != os.getpid() else None

    def write(self, info: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.info_file.write_text(json.dumps(info, indent=2))
        self.pidfile.write_text(f"{os.getpid()}\n")

    def read_info(self) -> dict[str, Any] | None:
        if self.running_pid() is None:
            return None
        try:
            info: dict[str, Any] = json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return None
        return info

    def clear(self) -> None:
        for path in (self.pidfile, self.sock, self.info_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class ControlServer:
    """A non-blocking listening socket the supervisor's select loop polls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_one(self, dispatch: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Answer one pending request; a slow or broken client is dropped, never waited on."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                line = conn.makefile("rb").readline(65536)
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
                answer = dispatch(request)
            except (OSError, ValueError) as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall((json.dumps(answer) + "\n").encode())

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(run_dir: RunDir, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the `fleet up` running in `run_dir`; its answer."""
    pid = run_dir.running_pid()
    if pid is None:
        raise ControlError(
            f"no fleet is running in {run_dir.root.resolve().parent} (start one with fleet up)"
        )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(run_dir.sock))
            sock.sendall((json.dumps(message) + "\n").encode())
            line = sock.makefile("rb").readline()
    except OSError as exc:
        raise ControlError(
            f"fleet up (pid {pid}) did not answer on {run_dir.sock}: {exc}"
        ) from None
    try:
        answer: dict[str, Any] = json.loads(line)
    except ValueError:
        raise ControlError(f"fleet up (pid {pid}) sent an unreadable answer: {line!r}") from None
    if not answer.get("ok", False):
        raise ControlError(str(answer.get("error", "request refused")))
    return answer
