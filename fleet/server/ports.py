"""Loopback ports for a local etcd: free ones, and whether a process holds one."""

from __future__ import annotations

import contextlib
import os
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a currently unused TCP port on `host` (bind to port 0).

    The port is not reserved once the probe socket closes; callers that lose the
    race (another process binds it first) must pick again.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(host: str, port: int) -> bool:
    """True if `port` can be bound on `host` right now (used to prefer 2379/2380)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option etcd (Go) sets, so TIME_WAIT leftovers don't count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a listening TCP socket on `port` (Linux /proc).

    Needed because ``/health`` answering on our endpoint does not prove that *our*
    etcd answered: another process may own the port, and our etcd is about to die
    of "address already in use". Returns None where /proc cannot tell (other OSes,
    permissions), and callers then trust the health check alone.
    """
    inodes: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as fh:
                next(fh, None)  # header
                for row in fh:
                    fields = row.split()
                    # fields: sl, local "HEXIP:HEXPORT", remote, state (0A = LISTEN), ..., inode
                    listening = len(fields) > 9 and fields[3] == "0A"
                    if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        if not inodes:
            return False
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(os.path.join(fd_dir, fd))
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return True
    except (OSError, ValueError):
        return None
    return False


def _url_host(host: str) -> str:
    """Bracket IPv6 literals, as URLs require."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
