"""A handler whose worker's main loop fails with an exception nobody expected, while one
of its handler calls hangs, and whose interpreter teardown would hang too (as gRPC's can).

Only `fleet worker` leaving through `os._exit` gets this process out; the watchdog must
still be watching the hung call meanwhile. Used by tests/test_core_hardening.py.
"""

from __future__ import annotations

import atexit
import threading
import time
from typing import Any

from fleet.work import incarnation

_calling = threading.Event()
_original = incarnation.Incarnation._report


def _failing_report(self: Any) -> None:
    _original(self)
    if _calling.is_set():
        raise RuntimeError("an unexpected failure in the worker's main loop")


incarnation.Incarnation._report = _failing_report  # type: ignore[method-assign]
atexit.register(lambda: time.sleep(3600))


def handle(ctx: Any) -> None:
    _calling.set()
    time.sleep(3600)
