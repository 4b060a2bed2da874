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
never delete a data dir under a running etcd. And who an etcd (or any process holding a
port) is: the etcd of a `fleet up` or a `fleet etcd` in some directory, another etcd, or
another program, so a fallback to another port can say why (issue 10, item 14), and
`fleet up` can use the `fleet etcd` already serving its data dir (item 4).
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil

from fleet.server.ports import holder_pid

__all__ = [
    "EtcdOwner",
    "EtcdStartError",
    "busy_note",
    "describe_etcd",
    "diagnose",
    "etcd_processes_using",
    "fleet_subcommand",
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
        where = f" in {proc.cwd()}"
    except (psutil.Error, OSError):
        where = ""
    owner = describe_etcd(proc)
    urls = owner.urls
    at = f" serving {urls}" if urls else ""
    who = (
        f"the etcd of {owner.kind} (pid {owner.kind_pid})"
        if owner.kind
        else "not one of a running fleet up or fleet etcd"
    )
    return EtcdStartError(
        f"{data_dir} is in use by another etcd (pid {proc.pid}{at}, started{where}; {who})",
        f"stop it, or use it instead of starting one: --etcd {urls or 'URL'}",
    )


def fleet_subcommand(argv: list[str]) -> str | None:
    """The fleet command a process runs (``up``, ``etcd``, ...), from its argv, else None.

    Covers the console script (``.../python .../bin/fleet up``) and ``python -m fleet up``.
    """
    for i, arg in enumerate(argv[:-1]):
        if os.path.basename(arg) == "fleet":
            return argv[i + 1]
    return None


@dataclass(frozen=True)
class EtcdOwner:
    """What is known about a live etcd process: where it serves, and whose it is."""

    pid: int
    urls: str | None  # its --listen-client-urls (as given: comma-separated)
    data_dir: str | None  # absolute
    kind: str | None  # "fleet up" or "fleet etcd" when its parent is one, else None
    kind_pid: int | None  # that parent's pid

    @property
    def run_dir(self) -> str | None:
        """The directory whose `.fleet/etcd` it serves, if it does."""
        if self.data_dir is None:
            return None
        path = Path(self.data_dir)
        return str(path.parent.parent) if path.parts[-2:] == (".fleet", "etcd") else None

    @property
    def endpoint(self) -> str | None:
        """The first client URL, the one a client would be given."""
        return self.urls.split(",")[0] if self.urls else None


def describe_etcd(proc: psutil.Process) -> EtcdOwner:
    """Who `proc` (an etcd) serves for: a `fleet up` or `fleet etcd` is its parent (an etcd
    left behind by a dead one has been re-parented and is just an etcd)."""
    try:
        argv = proc.cmdline()
        arg = _flag(argv, "data-dir")
        data_dir = None
        if arg is not None:
            path = arg if os.path.isabs(arg) else os.path.join(proc.cwd(), arg)
            data_dir = os.path.realpath(path)
    except (psutil.Error, OSError):
        return EtcdOwner(proc.pid, None, None, None, None)
    urls = _flag(argv, "listen-client-urls") or _flag(argv, "advertise-client-urls")
    kind = kind_pid = None
    try:
        parent = proc.parent()
        command = fleet_subcommand(parent.cmdline()) if parent is not None else None
        if parent is not None and command in ("up", "etcd"):
            kind, kind_pid = f"fleet {command}", parent.pid
    except (psutil.Error, OSError):
        pass
    return EtcdOwner(proc.pid, urls, data_dir, kind, kind_pid)


def _holder(pid: int | None) -> str | None:
    """Who process `pid` is, for a `port N busy (...)` note; None if unknown."""
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
        name = proc.name()
    except (psutil.Error, OSError):
        return None
    if argv and os.path.basename(argv[0]) == "etcd":
        owner = describe_etcd(proc)
        if owner.kind and owner.run_dir:
            return f"{owner.kind} in {owner.run_dir}"
        if owner.run_dir:
            return f"fleet in {owner.run_dir}"
        if owner.kind:
            return f"{owner.kind} pid {owner.kind_pid}, data in {owner.data_dir}"
        return f"etcd pid {pid}"
    return f"pid {pid} {name}"


def busy_note(ports: list[int]) -> str | None:
    """``port 2379 busy (fleet up in /other/dir)`` for preferred ports another process
    holds, naming the holder as precisely as /proc allows; None for no ports.

    Ports with the same holder share one clause (``ports 2379, 2380 busy (...)``)."""
    if not ports:
        return None
    clauses: dict[str | None, list[int]] = {}
    for port in ports:
        clauses.setdefault(_holder(holder_pid(port)), []).append(port)
    parts = []
    for who, held in clauses.items():
        numbers = ", ".join(str(p) for p in held)
        text = f"port {numbers} busy" if len(held) == 1 else f"ports {numbers} busy"
        parts.append(f"{text} ({who})" if who else text)
    return "; ".join(parts)
