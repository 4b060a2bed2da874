"""Why a local etcd would not start, said in one line with the fix.

etcd reports a refused data dir or a busy port in its own log and exits 1; a user who
only sees "exited with status 1" (or a traceback) has to know to open `.fleet/etcd.log`
and to know what "invalid downgrade" means. The causes a first user actually meets are
few and stable across etcd 3.4 and 3.5, so they are recognised from the log tail of the
attempt that failed and turned into `EtcdStartError`, whose message names the cause and
the fix. Anything not recognised keeps the full log tail (embedded.py's RuntimeError).

Also here: which live etcd processes use a given data dir. etcd does not refuse a data
dir another etcd holds, it waits on the WAL lock forever (no log line at all), so a
second etcd on the same dir has to be detected from outside, and `fleet reset` must
never delete a data dir under a running etcd.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "EtcdStartError",
    "diagnose",
    "etcd_processes_using",
    "in_use_error",
    "last_attempt",
    "reset_hint",
]

# etcd's log is appended to across starts; embedded.py writes this marker before each.
START_MARKER = "fleet: starting "
_TAIL_BYTES = 256 * 1024
_BIND = re.compile(r"listen tcp (\S+):(\d+): bind: address already in use")
# Errors that mean "these files are not (or no longer) a data dir this etcd can open".
_DATA_DIR_SIGNS = (
    "not a directory",
    "wal:",
    "walpb:",
    "snap:",
    "failed to open database",
    "failed to recover",
    "failed to find database snapshot",
    "failed to open wal",
    "failed to read wal",
    "failed to create snapshot directory",
    "failed to list data directory",
    "crc mismatch",
    "unexpected eof",
    "invalid database",
    "file size too small",
)


class EtcdStartError(Exception):
    """etcd refused to start for a recognised reason; the message is one line: the cause,
    then the fix. The CLI prints it as is (exit 2: it is the local setup, not the network).
    """

    def __init__(self, cause: str, fix: str, *, port_clash: int | None = None) -> None:
        super().__init__(f"{cause}; {fix}")
        self.cause = cause
        self.fix = fix
        # The port etcd could not bind, when that is the cause: the only case where
        # picking other ports and trying again can help.
        self.port_clash = port_clash


@dataclass(frozen=True)
class _Entry:
    level: str
    raw: str  # etcd's own words: the error (else the msg) of a JSON line, or the line
    fields: dict[str, object]

    @property
    def text(self) -> str:
        """msg and error together, lower-case, for matching."""
        if not self.fields:
            return self.raw.lower()
        return f"{self.fields.get('msg', '')}: {self.fields.get('error', '')}".lower()


def last_attempt(log_path: Path) -> list[str]:
    """The log lines written since the last start marker (the attempt that just failed)."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(max(0, log_path.stat().st_size - _TAIL_BYTES))
            data = fh.read()
    except OSError:
        return []
    lines: deque[str] = deque()
    for line in data.decode("utf-8", errors="replace").splitlines():
        if line.startswith("=== ") and START_MARKER in line:
            lines.clear()
        else:
            lines.append(line)
    return list(lines)


def _entries(lines: list[str]) -> list[_Entry]:
    out = []
    for line in lines:
        fields: dict[str, object] = {}
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                fields = parsed
        if fields:
            level = str(fields.get("level", ""))
            raw = str(fields.get("error") or fields.get("msg") or "")
        else:  # capnslog lines ("... C | etcdmain: ...") and Go panics
            level = "fatal" if " C | " in line or line.startswith("panic:") else ""
            raw = line
        out.append(_Entry(level, raw, fields))
    return out


def reset_hint(data_dir: Path) -> str:
    """The command that discards `data_dir`: `fleet reset` for the default `.fleet/etcd`."""
    try:
        default = data_dir.resolve() == (Path.cwd() / ".fleet" / "etcd").resolve()
    except OSError:
        default = False
    return "`fleet reset`" if default else f"`fleet reset --data-dir {data_dir}`"


def diagnose(lines: list[str], data_dir: Path, binary: str) -> EtcdStartError | None:
    """The recognised cause of a failed start in `lines` (one attempt's log), else None."""
    entries = _entries(lines)
    fatal = [e for e in entries if e.level in ("fatal", "panic", "error")]
    reset = reset_hint(data_dir)
    tokens_note = "(this discards the fleet's checkpoints, and fencing tokens start again)"
    for entry in entries:
        if "invalid downgrade" in entry.text:
            server = entry.fields.get("current-server-version", "this etcd")
            cluster = entry.fields.get("determined-cluster-version", "a newer version")
            return EtcdStartError(
                f"etcd {server} ({binary}) cannot open {data_dir}: it was written by etcd "
                f"{cluster}, and etcd never downgrades a data dir",
                f"run it with etcd {cluster} again (FLEET_ETCD_BINARY=/path/to/etcd), or "
                f"discard the data with {reset} {tokens_note}",
            )
    for entry in entries:
        match = _BIND.search(entry.text)
        if match:
            host, port = match.group(1), int(match.group(2))
            return EtcdStartError(
                f"etcd cannot listen on {host}:{port}: address already in use",
                "stop what holds that port (another etcd or `fleet etcd`?), or choose another "
                "(`fleet etcd --port P`; FLEET_EMBEDDED_PORT=0 for any free port)",
                port_clash=port,
            )
    for entry in fatal or entries:
        if "permission denied" in entry.text:
            return EtcdStartError(
                f"etcd cannot use {data_dir}: permission denied ({_detail(entry)})",
                f"make {data_dir} owned and writable by the user running fleet "
                f"(uid {os.geteuid()}), or discard it with {reset}",
            )
    for entry in fatal:
        if any(sign in entry.text for sign in _DATA_DIR_SIGNS):
            return EtcdStartError(
                f"{data_dir} is not a usable etcd data dir ({_detail(entry)})",
                f"discard it with {reset} {tokens_note}",
            )
    return None


def _detail(entry: _Entry) -> str:
    """etcd's own words for the error, short enough for one line."""
    text = " ".join(entry.raw.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _flag(argv: list[str], name: str) -> str | None:
    """The value of etcd flag `name` in `argv` (Go flags: -x v, --x v, -x=v, --x=v)."""
    for i, arg in enumerate(argv):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
        for prefix in (f"--{name}=", f"-{name}="):
            if arg.startswith(prefix):
                return arg[len(prefix) :]
    return None


def etcd_processes_using(data_dir: Path, exclude: int | None = None) -> list[psutil.Process]:
    """Live etcd processes whose --data-dir is `data_dir` (relative ones resolved
    against their working directory). A process we may not inspect is skipped."""
    target = os.path.realpath(data_dir)
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
            if not argv or os.path.basename(argv[0]) != "etcd" or proc.pid == exclude:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            arg = _flag(argv, "data-dir")
            if arg is None:  # etcd's own default: <name>.etcd in its working directory
                arg = f"{_flag(argv, 'name') or 'default'}.etcd"
            path = arg if os.path.isabs(arg) else os.path.join(proc.cwd(), arg)
            if os.path.realpath(path) == target:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def in_use_error(data_dir: Path, proc: psutil.Process) -> EtcdStartError:
    """The error for a data dir another live etcd holds, naming it and where it serves."""
    try:
        argv = proc.cmdline()
        where = f" in {proc.cwd()}"
    except (psutil.Error, OSError):
        argv, where = [], ""
    urls = _flag(argv, "listen-client-urls") or _flag(argv, "advertise-client-urls")
    at = f" serving {urls}" if urls else ""
    return EtcdStartError(
        f"{data_dir} is in use by another etcd (pid {proc.pid}{at}, started{where}; "
        "a `fleet etcd`?)",
        f"stop it, or use it instead of starting one: --etcd {urls or 'URL'}",
    )
