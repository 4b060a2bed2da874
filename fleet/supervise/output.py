"""Everything `fleet up` prints on its stdout: its own lines and its children's, one format.

Text (the default) is for a terminal and grep: a child's line gets its slot's prefix
(`w3 | ...`), a supervisor line `fleet | ...`.

JSON (`log_format = "json"`) is for a log shipper or `jq`: every line is one JSON object,
whoever printed it.
- A child's line that is a JSON object (a worker's `fleet.logs.JsonFormatter` record)
  passes through with `"slot"` added. Its text is kept (fields, order, spelling) and the
  slot spliced in before the closing brace; it is re-encoded only when it must be: it
  has a `"slot"` of its own (ours wins), or a character some line reader splits at (a
  raw CR between tokens, U+2028 in a string).
- Any other child line (a user's `print`, a C library's stderr, a piece of a line cut at
  MAX_LINE, a traceback Python printed itself, the watchdog's last words) is wrapped:
  `{"ts", "member", "slot", "level", "stream": "output", "msg"}`. stdout and stderr share
  one pipe, so the stream cannot be told apart; the level can, roughly: the lines of a
  traceback or a stack dump, and fleet's own `fleet: ...` error lines, are "error".
- A supervisor line is `{"ts", "member": "fleet", "level", "logger": "fleet.supervise",
  "msg"}`: the field names of `JsonFormatter`, so one query reads every line.

One object writes all of it, under a lock: the revoker's thread reports too, and no line
may be cut into another. A closed stdout (`fleet up | head -3`) costs the line, never the
fleet: OSError and ValueError of a write are dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from fleet.logs import LEVELS, level_of

LOGGER = "fleet.supervise"
# Characters a line reader may split at (universal newlines, str.splitlines) that valid
# JSON can hold raw: a CR between tokens, these inside strings.
_BREAKS = re.compile("[\r\x85\u2028\u2029]")
_TRACEBACK_STARTS = (
    "Traceback (most recent call last):",
    "Exception Group Traceback (most recent call last):",
)
_DUMP_STARTS = (  # faulthandler (a hung worker's stacks, SIGUSR1) and fatal errors
    "Fatal Python error:",
    "Current thread 0x",
    "Thread 0x",
    "Stack (most recent call first):",
)
_ERROR_LINES = (
    "fleet: ",  # fleet's one-line errors, the watchdog's last words
    "During handling of the above exception",
    "The above exception was the direct cause",
    "Exception in thread ",
    "Exception ignored in",
)


class Say(Protocol):
    """How the supervisor's parts print a line of their own (`Output.supervisor_line`)."""

    def __call__(self, text: str, level: str = "info") -> None: ...


def _compact(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(text: str) -> dict[str, Any] | None:
    """`text` as a strict JSON object (no NaN or Infinity), else None."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def with_slot(text: str, slot: int) -> str | None:
    """A child's line that is a JSON object, with `"slot": slot` added; else None."""
    obj = _json_object(text)
    if obj is None:
        return None
    if "slot" in obj or _BREAKS.search(text):
        try:
            return _compact({**obj, "slot": slot})
        except ValueError:  # a number beyond a float (1e999): not ours to respell
            return None
    body = text.strip()[:-1].rstrip()  # valid JSON: only JSON whitespace around it
    comma = "" if body.endswith("{") else ","
    return f'{body}{comma}"slot":{slot}}}'


def plain_level(text: str, inside: str | None) -> tuple[str, str | None]:
    """The level of one plain output line, and what the next line is inside of.

    `inside` is None, "traceback" (it ends with its first unindented line, the
    exception's) or "dump" (faulthandler's stacks: they end before theirs)."""
    if text.lstrip(" +|").startswith(_TRACEBACK_STARTS):
        return "error", "traceback"
    if text.startswith(_DUMP_STARTS):
        return "error", "dump"
    if inside is not None and (not text.strip() or text[0].isspace()):
        return "error", inside
    if inside == "traceback":
        return "error", None  # "ValueError: ...", the traceback's last line
    if text.startswith(_ERROR_LINES):
        return "error", None
    return "info", None


class Output:
    """`fleet up`'s stdout in the configured format (`fmt`: "text" or "json")."""

    def __init__(
        self,
        out: TextIO,
        fmt: str = "text",
        member_prefix: str | None = None,
        clock: Callable[[], float] = time.time,
        level: str = "info",
    ) -> None:
        """`member_prefix`: slot i's member id is `<member_prefix>-<i>` (`w<i>` without).
        `level`: the `log_level`; a supervisor line below it is not printed (a child's
        lines are filtered by the child, which gets the same level)."""
        self.out = out
        self.level = level_of(level)
        self.json = fmt == "json"
        self.member_prefix = member_prefix
        self.clock = clock
        self._lock = threading.Lock()
        self._inside: dict[int, str | None] = {}  # per slot, see `plain_level`

    def member(self, slot: int) -> str:
        return f"{self.member_prefix}-{slot}" if self.member_prefix else f"w{slot}"

    def supervisor_line(self, text: str, level: str = "info") -> None:
        """One line of the supervisor's own (`Supervisor._say`)."""
        if LEVELS.get(level, logging.ERROR) < self.level:
            return
        if self.json:
            line = _compact(
                {"ts": self._now(), "member": "fleet", "level": level, "logger": LOGGER,
                 "msg": text}
            )  # fmt: skip
        else:
            line = f"fleet | {text}"
        self._write(line + "\n")

    def child_lines(self, slot: int, lines: Sequence[bytes]) -> None:
        """Complete lines (or MAX_LINE pieces) of slot `slot`'s output, passed on."""
        if not lines:
            return
        with self._lock:
            if self.json:
                text = "".join(self._child_json(slot, ln.decode(errors="replace")) for ln in lines)
            else:
                text = "".join(f"w{slot} | {ln.decode(errors='replace')}\n" for ln in lines)
            self._write_locked(text)

    def _child_json(self, slot: int, text: str) -> str:
        passed = with_slot(text, slot)
        if passed is not None:
            # Another thread's log record can land between a traceback's lines (one
            # pipe, two writers): it neither ends the traceback nor belongs to it.
            return passed + "\n"
        level, self._inside[slot] = plain_level(text, self._inside.get(slot))
        record = {
            "ts": self._now(), "member": self.member(slot), "slot": slot, "level": level,
            "stream": "output", "msg": text,
        }  # fmt: skip
        return _compact(record) + "\n"

    def _now(self) -> float:
        return round(self.clock(), 3)

    def _write(self, text: str) -> None:
        with self._lock:
            self._write_locked(text)

    def _write_locked(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # our stdout is gone: drop it
            self.out.write(text)
            self.out.flush()
