"""The control socket of `fleet up` (ps, scale, restart, down) and its client.

`.fleet/fleet.sock` is a Unix socket (mode 0600, so only the owner can steer the
fleet). A request is one JSON object on one line, the answer is one JSON line.

The server lives inside the arbiter loop, so it must never wait on a client: every
connection is non-blocking and buffered in the loop's selector, a request must be
complete within `REQUEST_DEADLINE` and `MAX_REQUEST` bytes, an answer the client does
not read in time is dropped, and at most `MAX_CLIENTS` connections are open at once (a
new one evicts the oldest, so idle clients cannot lock the owner out).
Whatever a client sends (not JSON, JSON of the wrong shape, arguments of the wrong
type), and whatever the command then raises, the answer is ``{"ok": false, "error":
...}``; the fleet is never affected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.supervise.rundir import AlreadyRunning, RunDir, RunDirError

__all__ = ["AlreadyRunning", "ControlError", "ControlServer", "RunDir", "RunDirError", "request"]

log = logging.getLogger("fleet.supervise.control")

MAX_REQUEST = 64 * 1024
REQUEST_DEADLINE = 5.0
MAX_CLIENTS = 32
BUSY = "too many control clients"
ACCEPTS_PER_WAKE = 16

Dispatch = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """No fleet answers in this directory, or it refused the request."""


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""
    closed: bool = False


class ControlServer:
    """The listening socket and its connections, all driven by the arbiter's selector."""

    def __init__(
        self,
        path: Path,
        selector: selectors.BaseSelector,
        dispatch: Dispatch,
        bind_path: str | None = None,
    ) -> None:
        self.path = path
        self.selector = selector
        self.dispatch = dispatch
        target = bind_path or str(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(target)
        finally:
            os.umask(old)
        # Room for a burst of clients between two wake-ups of the loop (a full backlog
        # makes a client's connect fail at once with EAGAIN).
        self.sock.listen(socket.SOMAXCONN)
        self.sock.setblocking(False)
        self.conns: dict[int, _Conn] = {}
        selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _accept(self, _mask: int) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the client will retry
                log.debug("control accept: %s", exc)
                return
            conn.setblocking(False)
            if len(self.conns) >= MAX_CLIENTS:
                # Evict the oldest client rather than refuse the newest: a crowd of idle
                # connections (a stuck script, a hostile one) must not lock out `fleet ps`.
                # Only a client not yet answered: its request was never run, so it can
                # safely send it again (`request` does).
                waiting = [c for c in self.conns.values() if not c.outbox]
                if waiting:
                    oldest = min(waiting, key=lambda c: c.deadline)
                    with contextlib.suppress(OSError):
                        oldest.sock.send(_encode(_error(f"{BUSY}: dropped")))
                    self._drop(oldest)
            state = _Conn(conn, time.monotonic() + REQUEST_DEADLINE)
            self.conns[conn.fileno()] = state
            self.selector.register(conn, selectors.EVENT_READ, lambda m, c=state: self._io(c, m))

    def _io(self, conn: _Conn, mask: int) -> None:
        if conn.closed:
            return
        if mask & selectors.EVENT_READ and not conn.outbox:
            try:
                data = conn.sock.recv(MAX_REQUEST + 1)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self._drop(conn)
                return
            if data == b"":
                self._drop(conn)
                return
            if data:
                self._take(conn, data)
        if mask & selectors.EVENT_WRITE and conn.outbox:
            self._send(conn)

    def _take(self, conn: _Conn, data: bytes) -> None:
        end = data.find(b"\n")
        if end >= 0:
            conn.inbox += data[:end]
            self._reply(conn, self._answer(bytes(conn.inbox)))
            return
        conn.inbox += data
        if len(conn.inbox) > MAX_REQUEST:
            self._reply(conn, _error(f"request longer than {MAX_REQUEST} bytes"))

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return _error("not a JSON line")
        if not isinstance(request, dict):
            return _error(f"expected a JSON object, got {type(request).__name__}")
        try:
            return self.dispatch(request)
        except Exception as exc:  # a bug in a command must not reach the arbiter loop
            log.debug("control request %r failed", request, exc_info=True)
            return _error(f"internal error: {type(exc).__name__}: {exc}")

    def _reply(self, conn: _Conn, answer: dict[str, Any]) -> None:
        conn.outbox = _encode(answer)
        conn.inbox.clear()
        conn.deadline = time.monotonic() + REQUEST_DEADLINE
        self._send(conn)
        if not conn.closed:
            self.selector.modify(conn.sock, selectors.EVENT_WRITE, lambda m: self._io(conn, m))

    def _send(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if not conn.outbox:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def expire(self, now: float) -> None:
        """Give up on clients too slow to send their request or read their answer."""
        for conn in [c for c in self.conns.values() if now >= c.deadline]:
            if conn.outbox:
                self._drop(conn)
            else:
                self._reply(conn, _error(f"request not complete within {REQUEST_DEADLINE:g}s"))
                if not conn.closed:
                    self._drop(conn)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.sock)
        self.sock.close()


def _error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}


def _encode(answer: dict[str, Any]) -> bytes:
    return (json.dumps(answer) + "\n").encode()


def _connect(sock: socket.socket, path: str, until: float) -> None:
    """Connect, waiting out a full listen backlog: a Unix socket's connect with a timeout
    fails at once with EAGAIN while the backlog is full (others' connections queued
    faster than `fleet up`'s loop accepts them), which is busy, not gone."""
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= until:
                raise
            time.sleep(0.02)


def _exchange(run_dir: RunDir, message: dict[str, Any], until: float) -> bytes:
    """One connection: send the request line, read the answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(max(0.05, until - time.monotonic()))
        _connect(sock, str(run_dir.sock), until)
        sock.sendall((json.dumps(message) + "\n").encode())
        with sock.makefile("rb") as fh:
            return fh.readline()


def request(run_dir: RunDir, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the `fleet up` running in `run_dir`; its answer."""
    pid = run_dir.running_pid()
    if pid is None:
        raise ControlError(
            f"no fleet is running in {run_dir.root.resolve().parent} (start one with fleet up)"
        )
    until = time.monotonic() + timeout
    while True:
        try:
            line = _exchange(run_dir, message, until)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # Dropped before our request was read (a crowd of other clients): it never
            # ran, so sending it again is safe while there is time.
            if time.monotonic() < until:
                time.sleep(0.05)
                continue
            raise ControlError(
                f"fleet up (pid {pid}) did not answer on {run_dir.sock}: {exc}"
            ) from None
        except OSError as exc:
            raise ControlError(
                f"fleet up (pid {pid}) did not answer on {run_dir.sock}: {exc}"
            ) from None
        busy = line.startswith(b'{"ok": false, "error": "' + BUSY.encode())
        if busy and time.monotonic() < until:
            time.sleep(0.05)
            continue
        break
    try:
        answer: dict[str, Any] = json.loads(line)
    except ValueError:
        raise ControlError(f"fleet up (pid {pid}) sent an unreadable answer: {line!r}") from None
    if not answer.get("ok", False):
        raise ControlError(str(answer.get("error", "request refused")))
    return answer
