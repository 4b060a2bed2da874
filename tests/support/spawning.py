"""A handler whose calls start a helper process that outlives them (issue 7, item 3).

Each ownership (segment, token) starts one helper, in the worker's process group, that
appends ``<pid> <segment> <monotonic time>`` to ``$FLEET_TEST_GRANDCHILD_DIR/helpers.log``
every 20 ms until it is killed: the subprocess a real handler starts (a converter, a
shell pipeline) and that keeps writing after its worker died. Each call also appends
``<segment> <token> <member> <monotonic time>`` to ``calls.log`` in the same directory,
so a test can compare the helper's last write with the new owner's first call.
``time.monotonic()`` is one clock for every process on a Linux host.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet import SegmentContext

DIR_ENV = "FLEET_TEST_GRANDCHILD_DIR"

_HELPER = """
import os, sys, time
path, segment = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
while True:
    os.write(fd, f"{os.getpid()} {segment} {time.monotonic()}\\n".encode())
    time.sleep(0.02)
"""

_lock = threading.Lock()
_started: dict[tuple[int, int], subprocess.Popen[bytes]] = {}


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def handle(ctx: SegmentContext) -> None:
    """Record the call, make sure this ownership's helper runs, work a little."""
    directory = Path(os.environ[DIR_ENV])
    _append(
        directory / "calls.log", f"{ctx.segment} {ctx.token} {ctx.member_id} {time.monotonic()}\n"
    )
    with _lock:
        if (ctx.segment, ctx.token) not in _started:
            _started[(ctx.segment, ctx.token)] = subprocess.Popen(
                [sys.executable, "-c", _HELPER, str(directory / "helpers.log"), str(ctx.segment)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    ctx.stopping.wait(0.05)
