"""Signals for the arbiter: handlers only queue, the loop acts (gunicorn's self-pipe).

A handler runs between two bytecodes of whatever the loop was doing, so it must not
act itself: it appends the signal to a queue and writes a byte to a pipe the loop's
selector watches, which wakes the loop at once. The one exception is the start-up
phase (waiting for the embedded etcd's health, up to 30 s), which has no loop yet:
there a stop signal raises `StartupInterrupted` so `fleet up` stops at once.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
from types import FrameType

NAMES = ("TERM", "INT", "QUIT", "TTIN", "TTOU", "HUP", "CHLD")
_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class StartupInterrupted(Exception):
    """A stop signal arrived before the loop ran."""


class SignalQueue:
    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.wake_r, self.wake_w = os.pipe()
        self.pending: list[int] = []
        self.interrupt_startup = False

    def install(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.drain)
        for name in NAMES:
            signal.signal(getattr(signal, f"SIG{name}"), self._handler)

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        if self.interrupt_startup and signum in _STOPS:
            raise StartupInterrupted()
        self.pending.append(signum)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b".")

    def drain(self, _mask: int = 0) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self.wake_r, 4096)

    def take(self) -> list[str]:
        """The queued signals' names (``term``, ``ttin``, ...), oldest first."""
        names = []
        while self.pending:
            names.append(signal.Signals(self.pending.pop(0)).name[3:].lower())
        return names

    def close(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
