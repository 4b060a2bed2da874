"""Looking at a local etcd from outside: one HTTP health probe, and the tail of its log.

Plain HTTP and file reads only, no etcd client: `fleet up` probes the embedded etcd
(and a `fleet etcd` it finds) before the client library is needed, and startup errors
quote the log without importing gRPC.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

LOG_TAIL_LINES = 40


def tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """Last `lines` lines of a log file, or a note saying why there are none."""
    if path is None:
        return "(no log_path was given, so etcd's output went to /dev/null)"
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines)).rstrip("\n") or "(log is empty)"
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def healthy_at(endpoint: str, timeout: float = 1.0) -> bool:
    """One ``GET /health`` probe of `endpoint`; any error or non-"true" answer is False.

    Bypasses proxy environment variables: an HTTP_PROXY must not intercept a request
    to a loopback etcd.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{endpoint}/health", timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8", errors="replace"))
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return isinstance(body, dict) and body.get("health") == "true"
