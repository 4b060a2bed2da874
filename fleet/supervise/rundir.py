"""`.fleet/`, the run directory of `fleet up`: pid, endpoints, control socket, etcd data.

Other commands run from the same directory find the fleet here. Because `fleet up` may
run as root in a directory other users can write, the directory is a trust boundary:
it is created 0700, an existing one must be a real directory (not a symlink) owned by
us, and every file `fleet up` writes in it is opened relative to a descriptor of that
directory with O_NOFOLLOW, so nobody can point one of our writes at a file of theirs.

Two `fleet up` in one directory are kept apart by an exclusive `flock` on
`.fleet/lock`, taken before anything else is touched and held for the supervisor's
life: the loser exits without cleaning up anything (the files are the winner's), and
the winner removes its files only while it still holds the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

import psutil

from fleet.config import Config, ConfigError


class AlreadyRunning(Exception):
    """Another `fleet up` owns this directory."""


class RunDirError(ConfigError):
    """The run directory cannot be trusted (exit 2, one line)."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class RunDir:
    def __init__(self, root: Path | str = ".fleet") -> None:
        self.root = Path(root)
        self.pidfile = self.root / "fleet.pid"
        self.sock = self.root / "fleet.sock"
        self.info_file = self.root / "fleet.json"
        self.lock_file = self.root / "lock"
        self.crash_log = self.root / "crash.log"
        self.etcd_data = self.root / "etcd"
        self._dir_fd: int | None = None
        self._lock_fd: int | None = None

    # -- the owner's side (fleet up) --------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory 0700, or check an existing one; keep a descriptor of it."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.root, 0o700)
        try:
            st = os.lstat(self.root)
        except OSError as exc:
            raise RunDirError(f"{self.root}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise RunDirError(
                f"{self.root} is a symlink; fleet up keeps its pid, socket and etcd data there "
                "and does not follow links (remove it)"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise RunDirError(f"{self.root} exists and is not a directory")
        if st.st_uid != os.geteuid():
            raise RunDirError(
                f"{self.root} is owned by uid {st.st_uid}, not by this user (uid "
                f"{os.geteuid()}); fleet up uses only a run directory of its own"
            )
        fd = os.open(self.root, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
        if os.fstat(fd).st_ino != st.st_ino:  # swapped between the lstat and the open
            os.close(fd)
            raise RunDirError(f"{self.root} changed while fleet up was checking it")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
        self._dir_fd = fd

    def exposure(self) -> str | None:
        """A warning if others can write the directory that holds `.fleet` (no sticky
        bit): they can rename `.fleet` away and plant their own, which the paths the
        embedded etcd opens (data dir, log) would then follow."""
        parent = self.root.resolve().parent
        try:
            st = os.stat(parent)
        except OSError:
            return None
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if not writable or st.st_mode & stat.S_ISVTX:
            return None
        return (
            f"warning: {parent} is writable by other users; they could swap {self.root.name} "
            "under fleet up (run it from a directory only you can write)"
        )

    def lock(self) -> None:
        """Take `.fleet/lock` or raise AlreadyRunning; nothing else is touched first."""
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600, dir_fd=self._dir())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            other = self.running_pid()
            who = f" (pid {other})" if other is not None else ""
            raise AlreadyRunning(
                f"fleet up is already running in {self.root.resolve().parent}{who}; "
                "use fleet status, fleet scale or fleet down"
            ) from None
        self._lock_fd = fd

    def _dir(self) -> int:
        if self._dir_fd is None:
            raise RuntimeError("RunDir.prepare() first")
        return self._dir_fd

    def _write_file(self, name: str, text: str) -> None:
        """Write `name` whole (a reader never sees half a file), never through a link."""
        tmp = f".{name}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self._dir())
        fd = os.open(tmp, flags | os.O_EXCL, 0o600, dir_fd=self._dir())
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=self._dir(), dst_dir_fd=self._dir())

    def append_crash(self, text: str) -> None:
        fd = os.open(
            "crash.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o600,
            dir_fd=self._dir(),
        )  # fmt: skip
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def bind_path(self, name: str) -> str:
        """A path to `name` that goes through our directory descriptor, not through a
        `.fleet` that may have been swapped since (Linux); else the plain path."""
        via = f"/proc/self/fd/{self._dir()}/{name}"
        return via if os.path.isdir(f"/proc/self/fd/{self._dir()}") else str(self.root / name)

    def write(self, info: dict[str, Any]) -> None:
        self._write_file("fleet.json", json.dumps(info, indent=2))
        self._write_file("fleet.pid", f"{os.getpid()}\n")

    def clear(self) -> None:
        """Remove our files; only while we hold the lock (else they are not ours)."""
        if self._lock_fd is None or self._dir_fd is None:
            return
        for name in ("fleet.pid", "fleet.sock", "fleet.json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._dir_fd)

    def release(self) -> None:
        for fd in (self._lock_fd, self._dir_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock_fd = self._dir_fd = None

    # -- everyone else's side (ps, scale, status, ...) --------------------------------------

    def running_pid(self) -> int | None:
        """The pid of a live `fleet up` that owns this directory, else None."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            argv = proc.cmdline()
        except psutil.Error:
            return None
        # The pid may have been reused since a `fleet up` died without cleaning up.
        is_fleet_up = "up" in argv and any(arg.endswith("fleet") for arg in argv)
        return pid if is_fleet_up and pid != os.getpid() else None

    def read_info(self) -> dict[str, Any] | None:
        if self.running_pid() is None:
            return None
        try:
            info: dict[str, Any] = json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None


def with_local_etcd(cfg: Config) -> Config:
    """With no endpoint configured, in the directory of a `fleet up`: that fleet's etcd
    and name (`fleet status`, `fleet resize`); still none is a one-line error."""
    info = RunDir().read_info()
    if not cfg.etcd.endpoints and info:
        cfg = dataclasses.replace(
            cfg,
            name=cfg.name if "name" in cfg.explicit else info["name"],
            etcd=dataclasses.replace(cfg.etcd, endpoints=tuple(info["etcd"])),
        )
    if not cfg.etcd.endpoints:
        raise ConfigError("no etcd endpoint: pass --etcd URL, set FLEET_ETCD, or [etcd] endpoints")
    return cfg
