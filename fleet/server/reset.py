"""`fleet reset`: discard a local etcd's data dir, safely.

The embedded etcd's data (`.fleet/etcd`) is the one thing a user may have to throw away
by hand: after running a newer etcd on it (etcd never downgrades a data dir), or when
it is corrupt. `rm -rf` under a running etcd or `fleet up` breaks that fleet in ways
that look like etcd bugs, and it silently restarts every fencing token, so this command
refuses while anything uses the data, asks first, and says what restarts.

Why the refusals are this strict: the data dir holds the checkpoints, and the fencing
tokens are etcd revisions. A fresh data dir starts its revisions again near 1, so a
store outside etcd that keeps "the highest token that wrote here" (examples/
fenced_sqlite.py) would refuse every new owner until it is reset as well.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path
from typing import TextIO

from fleet.server.diagnose import etcd_processes_using
from fleet.supervise.rundir import AlreadyRunning, RunDir

__all__ = ["ResetRefused", "TOKENS_WARNING", "reset"]

# What an etcd data dir holds at its top: etcd creates only `member/`.
_ETCD_ENTRIES = {"member"}

TOKENS_WARNING = (
    "fencing tokens start again from low numbers on the new etcd data: a store outside "
    "etcd that fences writes with tokens (like examples/fenced_sqlite.py's database) must "
    "be reset too, or it will refuse every new owner's writes"
)


class ResetRefused(Exception):
    """`fleet reset` will not delete (one line, exit 2): something uses the data, the
    user did not confirm, or the path does not look like an etcd data dir."""


def _describe(path: Path) -> str | None:
    """Why `path` is not safe to delete as an etcd data dir, or None if it is."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink (fleet reset does not follow links; remove it yourself)"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    foreign = sorted(set(os.listdir(path)) - _ETCD_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        return f"{path} does not look like an etcd data dir (it holds {shown})"
    return None


def _confirm(question: str, stdin: TextIO, out: TextIO) -> bool:
    print(f"{question} [y/N] ", end="", file=out, flush=True)
    answer = stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def reset(
    data_dir: Path,
    *,
    yes: bool,
    run_dir: RunDir | None = None,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> int:
    """Remove `data_dir` and its `<data_dir>.log`; 0 when done or nothing to do.

    `run_dir` (the `.fleet/` of this directory) is checked and locked when `data_dir` is
    its etcd data: while the lock is held no `fleet up` can start on the data we delete.

    Raises:
        ResetRefused: a `fleet up` or an etcd uses the data, no confirmation, or the
            path is not an etcd data dir (a mistyped --data-dir must not delete a home).
    """
    stdin = stdin if stdin is not None else sys.stdin
    out = out if out is not None else sys.stdout
    run_dir = run_dir if run_dir is not None else RunDir()
    log = data_dir.with_name(data_dir.name + ".log")
    ours = os.path.abspath(data_dir) == os.path.abspath(run_dir.etcd_data)
    if not os.path.lexists(data_dir):
        removed_log = _remove_log(log)
        print(f"nothing to reset: {data_dir} does not exist{removed_log}", file=out)
        return 0
    if ours:
        pid = run_dir.running_pid()
        if pid is not None:
            raise ResetRefused(
                f"reset: fleet up (pid {pid}) is running in {Path.cwd()} on {data_dir}; "
                "stop it first (fleet down)"
            )
    else:  # only fleet's own run directory may hold anything else than etcd's files
        problem = _describe(data_dir)
        if problem is not None:
            raise ResetRefused(f"reset: {problem}; not deleting it")
    _refuse_if_etcd_runs(data_dir)
    if not yes:
        if not _is_terminal(stdin):
            raise ResetRefused(
                f"reset: would delete {data_dir} (every checkpoint; fencing tokens restart); "
                "pass --yes to confirm (stdin is not a terminal)"
            )
        print(f"warning: {TOKENS_WARNING}.", file=out)
        if not _confirm(f"Delete {data_dir} and every checkpoint in it?", stdin, out):
            raise ResetRefused("reset: not confirmed; nothing deleted")
    try:
        if ours:
            run_dir.prepare()
            try:
                run_dir.lock()  # a fleet up starting now loses the lock race, touches nothing
            except AlreadyRunning:
                raise ResetRefused(
                    f"reset: a fleet up is starting in {Path.cwd()}; stop it first (fleet down)"
                ) from None
        _refuse_if_etcd_runs(data_dir)  # again: one may have started while we asked
        if os.path.isdir(data_dir) and not os.path.islink(data_dir):
            shutil.rmtree(data_dir)
        else:
            os.unlink(data_dir)
        removed_log = _remove_log(log)
    finally:
        if ours:
            run_dir.release()
    print(f"removed {data_dir}{removed_log}", file=out)
    print(f"warning: {TOKENS_WARNING}.", file=out)
    return 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, OSError):  # closed
        return False


def _refuse_if_etcd_runs(data_dir: Path) -> None:
    users = etcd_processes_using(data_dir)
    if users:
        raise ResetRefused(
            f"reset: etcd (pid {users[0].pid}) is running on {data_dir}; stop it first "
            "(Ctrl-C its `fleet etcd`)"
        )


def _remove_log(log: Path) -> str:
    try:
        if os.path.isfile(log) and not os.path.islink(log):
            os.unlink(log)
            return f" and {log}"
    except OSError:
        pass
    return ""
