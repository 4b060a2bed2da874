"""`fleet supervisord-conf`: render `supervisord.conf.tmpl` for the workers of one host.

supervisord reads its file with Python's configparser (inline comments after a space:
` ;` and ` #`), expands `%(name)s` in most values, and splits `command` with shlex. So
every value written here is checked once, in `value()`: no control characters (a newline
would start a new key), no ` ;`/` #` (the rest would vanish as a comment), '%' doubled;
commands are shlex-quoted word by word first. Paths are made absolute here, because
supervisord resolves relative ones against its own working directory, not the user's.
The rendered file names the config file (--config) and never holds a secret: the
caller passes the secrets it knows and rendering refuses if one of them ends up inside.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.config import ConfigError

TEMPLATE_NAME = "supervisord.conf.tmpl"
BEGIN_SLOT = ";; begin slot"
END_SLOT = ";; end slot"
WORKER_PROGRAM = "fleet-worker-"  # program name of slot i: fleet-worker-<i>
LISTENER = "fleet-monitor"
SOCKET_NAME = "supervisor.sock"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus its terminating NUL (Linux)
START_RETRIES = 3
_COMMENT = re.compile(r"(?:^|\s)[;#]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def default_template() -> Path:
    """The template shipped in this package (the repository root's
    `supervisord.conf.tmpl` is a link to it, so a wheel install has it too)."""
    return Path(__file__).with_name(TEMPLATE_NAME)


def value(text: str, what: str, *, strip_ok: bool = False, expanded: int = 1) -> str:
    """`text` as a supervisord value that reads back as exactly `text`. `expanded`: how
    many times supervisord %-expands the key (twice for a program's *_logfile)."""
    if _CONTROL.search(text):
        raise ConfigError(f"{what} = {text!r}: control characters (newline, tab...) cannot "
                          "be written to a supervisord file")
    if _COMMENT.search(text):
        raise ConfigError(f"{what} = {text!r}: ';' or '#' at the start or after a space "
                          "would start a comment in a supervisord file")
    if not strip_ok and text != text.strip():
        raise ConfigError(f"{what} = {text!r}: leading or trailing spaces would be lost "
                          "in a supervisord file")
    return text.replace("%", "%" * 2**expanded)


def command(argv: Sequence[str], what: str) -> str:
    """A supervisord `command` value: shlex words, no shell, '%' doubled."""
    return value(" ".join(shlex.quote(arg) for arg in argv), what, strip_ok=True)


@dataclass(frozen=True)
class Plan:
    """Everything the file depends on; all paths absolute."""

    workers: int
    host_id: str
    python: str
    run_dir: Path
    directory: Path
    worker_flags: tuple[str, ...]  # passed to every `fleet worker` (ids are added per slot)
    listener_flags: tuple[str, ...]  # passed to `fleet supervisord-listener`
    graceful_timeout: float
    etcd_timeout: float
    user: str | None = None

    @property
    def socket(self) -> Path:
        return self.run_dir / SOCKET_NAME

    @property
    def startsecs(self) -> int:
        """Imports plus the first contact with etcd (which fails after etcd.timeout):
        a worker that dies within this never got going, and is a failed start."""
        return max(5, math.ceil(self.etcd_timeout) + 2)

    @property
    def stopwaitsecs(self) -> int:
        """Longer than the worker's own graceful stop, so supervisord's SIGKILL only
        comes for a worker that did not stop by itself."""
        return math.ceil(self.graceful_timeout) + 10

    def member_id(self, slot: int) -> str:
        return f"{self.host_id}-{slot}"


def _split(template: str, path: str) -> tuple[str, str, str]:
    lines = template.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.startswith(BEGIN_SLOT)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END_SLOT)]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise ConfigError(
            f"template {path}: expected one '{BEGIN_SLOT}' line, then one '{END_SLOT}' line"
        )
    b, e = begins[0], ends[0]
    return "".join(lines[:b]), "".join(lines[b + 1 : e]), "".join(lines[e + 1 :])


def _fill(part: string.Template, mapping: dict[str, str], path: str) -> str:
    try:
        return part.substitute(mapping)
    except KeyError as exc:
        known = ", ".join(sorted(mapping))
        raise ConfigError(
            f"template {path} uses ${{{exc.args[0]}}}; known names: {known}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"template {path}: {exc} (write a literal '$' as '$$')") from None


def render(plan: Plan, template: str, *, path: str = TEMPLATE_NAME,
           secrets: Sequence[str] = ()) -> str:
    """The supervisord file for `plan`. Raises ConfigError (one line) on a value that
    cannot be written safely, a socket path that is too long, or a secret inside."""
    for name, p in (("--run-dir", plan.run_dir), ("directory", plan.directory),
                    ("python", Path(plan.python))):
        if not p.is_absolute():
            raise ConfigError(f"{name} = {str(p)!r}: must be an absolute path")
    sock = str(plan.socket)
    if len(os.fsencode(sock)) > SUN_PATH_MAX:
        raise ConfigError(
            f"--run-dir {str(plan.run_dir)!r}: the socket path {sock!r} is longer than the "
            f"{SUN_PATH_MAX} bytes a unix socket allows; pick a shorter --run-dir"
        )
    user = f"user = {value(plan.user, '--user')}" if plan.user else ""
    common = {
        "generated": f"Rendered for {plan.workers} worker(s) of host id {plan.host_id}.",
        "socket": value(sock, "socket path"),
        "run_dir": value(str(plan.run_dir), "--run-dir"),
        "log_dir": value(str(plan.run_dir), "--run-dir", expanded=2),
        "directory": value(str(plan.directory), "working directory"),
        "user": user,
        "buffer_size": str(max(64, 4 * plan.workers)),
        "listener_command": command(
            [plan.python, "-m", "fleet", "supervisord-listener", *plan.listener_flags,
             "--host-id", plan.host_id],
            "listener command",
        ),
        "startsecs": str(plan.startsecs),
        "startretries": str(START_RETRIES),
        "stopwaitsecs": str(plan.stopwaitsecs),
        "workers": str(plan.workers),
    }
    head, block, tail = (string.Template(p) for p in _split(template, path))
    out = [_fill(head, common, path)]
    for slot in range(plan.workers):
        argv = [plan.python, "-m", "fleet", "worker", *plan.worker_flags,
                "--id", plan.member_id(slot)]
        mapping = {**common, "slot": str(slot),
                   "worker_command": command(argv, f"worker {slot} command")}
        out.append(_fill(block, mapping, path))
    out.append(_fill(tail, common, path))
    text = "".join(out)
    for secret in secrets:
        if secret and secret in text:
            raise ConfigError(
                "refusing to render: a configured secret (etcd.password) would appear in the "
                "supervisord file; keep credentials in the --config file only"
            )
    return text


def write(text: str, output: Path) -> None:
    """Write atomically with mode 0600 (the file is not secret, but it is an
    instruction to run commands: nobody else should be able to change it)."""
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
