"""Handlers that misbehave towards their supervisor (issue 12): each does its trick once
per process, then works quietly like a trivial handler.

- ``closing``: points fds 1 and 2 at /dev/null (a handler that daemonizes or ``dup2``s its
  output away): the supervisor sees EOF on a live child's output pipe.
- ``long_line``: writes ``$FLEET_TEST_LONG_BYTES`` (default 200000) bytes of ``x`` without a
  newline, then ``\\r`` progress updates, never a newline.
- ``bad_status``: writes status lines of the wrong shape to the supervisor pipe
  (``FLEET_SUPERVISOR_FD``): JSON that is not an object, wrong field types, garbage.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet import SegmentContext

_lock = threading.Lock()
_done: set[str] = set()


def _once(name: str) -> bool:
    with _lock:
        if name in _done:
            return False
        _done.add(name)
        return True


def closing(ctx: SegmentContext) -> None:
    if _once("closing"):
        print("closing my output now", flush=True)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    ctx.stopping.wait(0.05)


def long_line(ctx: SegmentContext) -> None:
    if _once("long_line"):
        size = int(os.environ.get("FLEET_TEST_LONG_BYTES", "200000"))
        sys.stdout.write("x" * size)
        sys.stdout.flush()
        for pct in range(0, 101, 10):
            sys.stdout.write(f"\rprogress {pct}%")
            sys.stdout.flush()
    ctx.stopping.wait(0.05)


BAD_STATUS_LINES = (
    b"[1, 2, 3]\n",
    b'"ready"\n',
    b"null\n",
    b'{"ready": true, "lease": "not-a-number"}\n',
    b'{"ready": true, "lease": [1]}\n',
    b'{"hb": true, "owned": "x", "assigned": {"a": 1}, "segments": "many"}\n',
    b'{"hb": true, "owned": 1e999, "segments": -5}\n',
    b"\xff\xfe garbage \x00\n",
    b"{" + b'"pad": "' + b"y" * 100_000 + b'"}\n',
)


def bad_status(ctx: SegmentContext) -> None:
    if _once("bad_status"):
        fd = int(os.environ["FLEET_SUPERVISOR_FD"])
        os.set_blocking(fd, True)
        for line in BAD_STATUS_LINES:
            os.write(fd, line)
        os.set_blocking(fd, False)
    ctx.stopping.wait(0.05)
