"""Logging: one line per event, prefixed with the member id; text or JSON lines.

A traceback stays with its event: in JSON it is one field (`exc`) of the event's line; in
text it follows the line as Python prints it, each line indented by `INDENT`, so a reader
sees where it ends and `fleet up` gives every line its slot's prefix.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

INDENT = "    "
# `log_level` (config, `--log-level`, FLEET_LOG_LEVEL) -> logging's level. INFO is the
# lifecycle (joins, leaves, leaders, assignments, decisions, a summary per period); what
# happens per call is DEBUG, so a terminal stays readable (issue 9).
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def plural(n: int, word: str) -> str:
    """`1 worker`, `8 workers`, `1,024 segments`: lines for people."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def level_of(name: str) -> int:
    """The logging level of a `log_level` value (config.py has checked it)."""
    return LEVELS[name]


def _indented(text: str) -> str:
    """`text` as lines after a log line, each indented (split at newlines only)."""
    return "".join(f"\n{INDENT}{line}" for line in text.rstrip("\n").split("\n"))


class TextFormatter(logging.Formatter):
    def __init__(self, member_id: str) -> None:
        super().__init__()
        self.member_id = member_id

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = f"{record.levelname:<7}"
        line = f"{stamp}.{int(record.msecs):03d} {self.member_id} {level} {record.getMessage()}"
        if record.exc_info:
            line += _indented(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, member_id: str) -> None:
        super().__init__()
        self.member_id = member_id

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": round(record.created, 3),
            "member": self.member_id,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, separators=(",", ":"))


def setup(
    member_id: str,
    fmt: str = "text",
    level: int | str = logging.INFO,
    stream: TextIO | None = None,
) -> None:
    """Route every fleet log record to one stream in the chosen format, from `level`
    (a logging level or a `log_level` name) up."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(member_id) if fmt == "json" else TextFormatter(member_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_of(level) if isinstance(level, str) else level)
    logging.getLogger("grpc").setLevel(logging.ERROR)
