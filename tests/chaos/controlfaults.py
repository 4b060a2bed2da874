"""The chaos fault aimed at `fleet up`'s control plane: a hostile control client.

`hostile_control`
    For a few seconds, several clients abuse the control socket at once: one dribbles a
    request a byte at a time, others send malformed requests (not JSON, not an object,
    arguments of the wrong type), one sends an oversized request with no newline, and a
    crowd opens more connections than the supervisor serves at once and sits on them.
    Meanwhile a well-behaved `ps` must keep being answered within a few seconds, and
    `fleet up` must stay up: a frozen or dead arbiter reaps, respawns and revokes nothing,
    which the rest of the run would then show as stalled segments. A malformed request
    must get an error answer, not a dropped connection.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import TYPE_CHECKING

from fleet.supervise.control import request

if TYPE_CHECKING:
    from tests.chaos.faults import FaultRecord, Injector, Planned

MALFORMED = (
    b"not json at all\n",
    b"[1, 2, 3]\n",
    b'{"cmd": "restart", "slot": [0]}\n',
    b'{"cmd": "scale", "workers": "many"}\n',
    b'{"cmd": "scale", "workers": true}\n',
    b'{"cmd": 7}\n',
    b"\xff\xfe\n",
)
CROWD = 48  # more than the supervisor serves at once
PS_LIMIT = 5.0  # a `ps` slower than this under abuse means the arbiter was held up


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(path)
    return sock


def hostile_control(injector: Injector, planned: Planned, record: FaultRecord) -> None:
    path = str(injector.cluster.run_dir.sock)
    injector._begin(record, f"control socket {path}", seconds=planned.seconds)
    stop = threading.Event()
    answers: list[bytes] = []
    lock = threading.Lock()

    def dribble() -> None:
        with contextlib.suppress(OSError), _connect(path) as sock:
            for byte in b'{"cmd": "ps"}\n' * 50:
                if stop.wait(0.2):
                    return
                sock.sendall(bytes([byte]))

    def malformed() -> None:
        while not stop.is_set():
            for line in MALFORMED:
                with contextlib.suppress(OSError), _connect(path) as sock:
                    sock.sendall(line)
                    reply = sock.makefile("rb").readline()
                    with lock:
                        answers.append(reply)
                if stop.wait(0.05):
                    return

    def oversized() -> None:
        with contextlib.suppress(OSError), _connect(path) as sock:
            chunk = b"x" * 65536
            for _ in range(32):  # 2 MiB, no newline
                if stop.is_set():
                    return
                sock.sendall(chunk)

    crowd: list[socket.socket] = []

    def sit() -> None:
        for _ in range(CROWD):
            with contextlib.suppress(OSError):
                crowd.append(_connect(path))

    threads = [threading.Thread(target=f, daemon=True) for f in (dribble, malformed, oversized, sit)]
    for t in threads:
        t.start()
    slowest, answered, failed = 0.0, 0, []
    until = time.monotonic() + planned.seconds
    try:
        while time.monotonic() < until and not injector.stop.is_set():
            sent = time.monotonic()
            try:
                request(injector.cluster.run_dir, {"cmd": "ps"}, timeout=PS_LIMIT + 5.0)
                answered += 1
            except Exception as exc:  # noqa: BLE001 - recorded, judged below
                failed.append(f"{type(exc).__name__}: {exc}")
            slowest = max(slowest, time.monotonic() - sent)
            injector.stop.wait(0.3)
    finally:
        stop.set()
        for sock in crowd:
            with contextlib.suppress(OSError):
                sock.close()
        for t in threads:
            t.join(timeout=10)
    with lock:
        replies = list(answers)
    refused = sum(1 for r in replies if r and json.loads(r).get("ok") is False)
    injector._end(
        record,
        ps_answered=answered,
        ps_failed=len(failed),
        slowest_ps=round(slowest, 3),
        malformed_sent=len(replies),
        malformed_refused=refused,
    )
    problems = []
    if failed or not answered:
        problems.append(f"ps failed under abuse: {failed[:3]}")
    if slowest > PS_LIMIT:
        problems.append(f"a ps took {slowest:.1f} s under abuse (limit {PS_LIMIT:g} s)")
    if replies and refused != len(replies):
        problems.append(f"{len(replies) - refused} malformed requests not refused")
    if problems:
        raise AssertionError("; ".join(problems))
